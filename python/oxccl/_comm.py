"""The communicator: OxCCL's Rust ``Communicator`` for Python."""

from __future__ import annotations

import enum
import json
from types import TracebackType
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

from . import _oxccl
from ._buffers import Buf, current_stream, describe, gpu_of, hold
from .errors import InvalidArgumentError, UnsupportedError

__all__ = ["Communicator", "Work", "Group", "Explain", "ReduceOp"]


class ReduceOp(str, enum.Enum):
    """Reduction operators (strings work too: ``"sum"``)."""

    SUM = "sum"
    PROD = "prod"
    MIN = "min"
    MAX = "max"
    AVG = "avg"


OpLike = Union[ReduceOp, str]
_NONE: Buf = (0, 0, "uint8")


def _op(op: OpLike) -> str:
    name = op.value if isinstance(op, ReduceOp) else str(op).lower()
    if name not in ("sum", "prod", "min", "max", "avg"):
        raise InvalidArgumentError(
            f"unknown reduce op {op!r} (expected sum, prod, min, max or avg)"
        )
    return name


def _copy(buf: Any) -> Any:
    """A contiguous copy of ``buf`` (numpy or torch; a buffer-protocol object as numpy)."""
    if hasattr(buf, "clone") and hasattr(buf, "data_ptr"):
        return buf.clone()
    import numpy as np

    return np.array(buf, copy=True)


class Explain(Dict[str, Any]):
    """What :meth:`Communicator.explain` returns: a dict (the JSON form: ``rank``, ``world``,
    ``hosts``, ``peers`` with each link's transport and why); ``str()`` gives the text form."""

    def __init__(self, data: Dict[str, Any], text: str) -> None:
        super().__init__(data)
        self._text = text

    def __str__(self) -> str:
        return self._text


class Work:
    """A queued operation (from a ``*_async`` call). It keeps its buffers alive until done.

    ``wait()`` blocks until it completes (the communicator's deadline bounds it) and returns
    the output buffer; ``wait(timeout)`` returns ``None`` if it is still running then;
    ``test()`` never blocks. Errors are raised by ``wait`` and ``test``.
    """

    def __init__(self, native: Any, result: Any) -> None:
        self._native = native
        self._result = result

    def wait(self, timeout: Optional[float] = None) -> Any:
        if self._native.wait(timeout):
            return self._result
        return None

    def test(self) -> bool:
        return bool(self._native.test())

    def is_completed(self) -> bool:
        """Same as :meth:`test` (torch's name)."""
        return self.test()


class Group:
    """Sends and receives posted together, as ``ncclGroupStart``/``ncclGroupEnd``: two ranks
    that send to each other in one group do not deadlock, whatever the order. Use it as a
    context manager; the operations run when the block ends::

        with comm.group() as g:
            g.send(x, peer=1)
            g.recv(y, peer=1)
    """

    def __init__(self, comm: Communicator, timeout: Optional[float]) -> None:
        self._comm = comm
        self._timeout = timeout
        self._ops: List[Tuple[bool, Buf, int]] = []
        self._keep: List[Any] = []

    def send(self, buf: Any, peer: int) -> Group:
        try:
            self._ops.append((True, describe(buf, writable=False, what="group send"), peer))
        finally:
            self._keep.extend(hold(buf))
        return self

    def recv(self, buf: Any, peer: int) -> Group:
        try:
            self._ops.append((False, describe(buf, writable=True, what="group recv"), peer))
        finally:
            self._keep.extend(hold(buf))
        return self

    def run(self) -> None:
        """Posts everything and waits until all of it is done."""
        ops, self._ops = self._ops, []
        try:
            gpu = gpu_of(*(b for _, b, _ in ops))
            if gpu is not None:
                # The group runs now, on the host: the stream's work that wrote the tensors
                # must be done first.
                import torch

                torch.cuda.current_stream(gpu).synchronize()
            self._comm._native.group(ops, self._timeout)
        finally:
            self._keep.clear()

    def __enter__(self) -> Group:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is None:
            self.run()


class Communicator:
    """A group of ranks (processes) that run collectives together.

    ``Communicator(rank, world_size, store)`` meets the other ranks through the rendezvous
    store at ``store`` (``"host:port"``, ``"tcp://host:port"``, ``"file:///shared/dir"``);
    rank 0 hosts a TCP store there unless ``store_hosted`` says someone else does.
    :meth:`from_env` reads what ``oxccl launch``, torchrun, srun or mpirun set.

    Buffers are numpy arrays, torch CPU tensors or anything with the buffer protocol,
    contiguous; they are used in place, never copied. Calls without ``out`` work in place.
    Every blocking call releases the GIL and ends by the communicator's deadline
    (``OXCCL_TIMEOUT``, :attr:`timeout`) or its own ``timeout=`` (seconds); Ctrl-C aborts the
    communicator and raises ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: str,
        *,
        store_hosted: bool = False,
        timeout: Optional[float] = None,
        _native: Any = None,
    ) -> None:
        if _native is None:
            _native = _oxccl.Comm.create(rank, world_size, store, store_hosted, timeout)
        self._native = _native

    @classmethod
    def from_env(cls) -> Communicator:
        """The communicator of every rank, from the launcher's environment."""
        return cls._wrap(_oxccl.Comm.from_env())

    @classmethod
    def _wrap(cls, native: Any) -> Communicator:
        c = cls.__new__(cls)
        c._native = native
        return c

    # --- what it is -------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return int(self._native.rank)

    @property
    def world_size(self) -> int:
        return int(self._native.world_size)

    @property
    def timeout(self) -> float:
        """The deadline of every blocking call, in seconds."""
        return float(self._native.timeout)

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._native.set_timeout(float(seconds))

    @property
    def traffic_class(self) -> str:
        return str(self._native.traffic_class)

    @property
    def aborted(self) -> bool:
        """True once aborted or failed: every later call raises :class:`AbortedError`."""
        return bool(self._native.aborted)

    def explain(self) -> Explain:
        """Each peer link's transport and why it was chosen."""
        return Explain(json.loads(self._native.explain_json()), self._native.explain_text())

    def __repr__(self) -> str:
        return f"<oxccl.Communicator rank {self.rank} of {self.world_size} ({self.traffic_class})>"

    # --- collectives ------------------------------------------------------------------

    def _in_flight(self, native: Any, result: Any) -> Any:
        """Keeps the work of a call queued on a CUDA stream until it has ended (it holds the
        tensors), dropping the ones that have; returns ``result``."""
        pending: List[Any] = [w for w in getattr(self, "_stream_works", []) if not w.test()]
        pending.append(native)
        self._stream_works = pending
        return result

    def _run(
        self,
        name: str,
        send: Any,
        recv: Any,
        *,
        op: Optional[OpLike] = None,
        root: int = 0,
        counts: Optional[Tuple[List[int], List[int]]] = None,
        roots: Optional[List[int]] = None,
        timeout: Optional[float] = None,
        asynchronous: bool = False,
        send_is_input: bool = True,
        recv_is_output: bool = True,
    ) -> Any:
        out_what = f"{name} buffer" if send is recv else f"{name} output"
        try:
            r = (
                describe(recv, writable=True, what=out_what)
                if recv is not None and recv_is_output
                else _NONE
            )
            if send is recv and r is not _NONE:
                s = r  # in place: the same memory
            else:
                s = (
                    describe(send, writable=False, what=f"{name} input")
                    if send is not None and send_is_input
                    else _NONE
                )
        finally:
            keep = hold(send, recv)
        if s is _NONE and r is not _NONE:
            s = (0, 0, r[2])
        if r is _NONE and s is not _NONE:
            r = (0, 0, s[2])
        reduce = _op(op) if op is not None else None
        gpu = gpu_of(s, r)
        if gpu is not None:
            # CUDA tensors: queued on torch's current stream (as torch's NCCL backend does):
            # later work on the stream sees the result; the Work says when it has ended.
            native = self._native.submit_on_stream(
                name, s, r, keep, current_stream(gpu), reduce, root, counts, roots=roots
            )
            result = recv if recv is not None else send
            return Work(native, result) if asynchronous else self._in_flight(native, result)
        if asynchronous:
            native = self._native.submit(name, s, r, keep, reduce, root, counts, roots=roots)
            return Work(native, recv if recv is not None else send)
        if timeout is not None:
            self._native.call(name, s, r, reduce, root, counts, float(timeout), roots=roots)
        else:
            self._native.call(name, s, r, reduce, root, counts, roots=roots)
        del keep  # the buffers (and their exports) were held until here
        return recv if recv is not None else send

    def all_reduce(
        self,
        buf: Any,
        op: OpLike = ReduceOp.SUM,
        *,
        out: Any = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """Every rank gets ``op`` over all ranks' ``buf``: in ``buf`` (in place), or in ``out``
        of the same length. Returns the output."""
        return self._run("all_reduce", buf, buf if out is None else out, op=op, timeout=timeout)

    def broadcast(
        self, buf: Any, root: int, *, out: Any = None, timeout: Optional[float] = None
    ) -> Any:
        """``root``'s ``buf`` into every rank's ``buf`` (or ``out``)."""
        is_root = self.rank == root
        return self._run(
            "broadcast",
            buf,
            buf if out is None else out,
            root=root,
            timeout=timeout,
            send_is_input=is_root,
        )

    def broadcast_from_roots(
        self, buf: Any, roots: Sequence[int], *, out: Any = None, timeout: Optional[float] = None
    ) -> Any:
        """The data every rank in ``roots`` holds in ``buf`` (the same on each) into every
        rank's ``buf`` (or ``out``), every root sending a share: the buffer is cut into
        stripes, each root sends its own, and the receivers relay them to each other (an RL
        weight refit, where every trainer rank holds the new weights). When the roots span
        several hosts, one root per host sends. Every rank passes the same ``roots`` in the
        same order; ``explain()`` shows the stripes of the last call."""
        rs = [int(r) for r in roots]
        return self._run(
            "broadcast_from_roots",
            buf,
            buf if out is None else out,
            roots=rs,
            timeout=timeout,
            send_is_input=self.rank in rs,
        )

    def reduce(
        self,
        buf: Any,
        root: int,
        op: OpLike = ReduceOp.SUM,
        *,
        out: Any = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """``op`` over every rank's ``buf`` into ``root``'s ``buf`` (or ``out``); other ranks'
        buffers are only read."""
        is_root = self.rank == root
        return self._run(
            "reduce",
            buf,
            buf if out is None else out,
            op=op,
            root=root,
            timeout=timeout,
            recv_is_output=is_root,
        )

    def all_gather(self, buf: Any, out: Any, *, timeout: Optional[float] = None) -> Any:
        """Every rank's ``buf`` into everyone's ``out`` (``world_size`` blocks, block k from
        rank k)."""
        return self._run("all_gather", buf, out, timeout=timeout)

    def reduce_scatter(
        self, buf: Any, out: Any, op: OpLike = ReduceOp.SUM, *, timeout: Optional[float] = None
    ) -> Any:
        """Block k of ``op`` over every rank's ``buf`` (``world_size`` blocks) into rank k's
        ``out``."""
        return self._run("reduce_scatter", buf, out, op=op, timeout=timeout)

    def all_to_all(self, buf: Any, out: Any, *, timeout: Optional[float] = None) -> Any:
        """Block k of ``buf`` to rank k; block k of ``out`` from rank k."""
        return self._run("all_to_all", buf, out, timeout=timeout)

    def all_to_all_v(
        self,
        buf: Any,
        send_counts: Sequence[int],
        out: Any,
        recv_counts: Sequence[int],
        *,
        timeout: Optional[float] = None,
    ) -> Any:
        """``send_counts[k]`` elements to rank k, packed in rank order; ``recv_counts[k]`` from
        rank k into ``out``, likewise."""
        counts = ([int(c) for c in send_counts], [int(c) for c in recv_counts])
        return self._run("all_to_all_v", buf, out, counts=counts, timeout=timeout)

    def all_to_all_v_dynamic(
        self,
        buf: Any,
        send_counts: Sequence[int],
        out: Any,
        *,
        timeout: Optional[float] = None,
    ) -> List[int]:
        """:meth:`all_to_all_v` when the receivers do not know their counts (a MoE dispatch):
        ``send_counts[k]`` elements of ``buf`` to rank k, packed in rank order; the blocks
        this rank receives land packed in rank order at the start of ``out``, which only
        needs to be large enough. Returns the receive counts. Each block travels right
        behind its count: one exchange instead of an all_to_all of the counts and then
        all_to_all_v. If ``out`` is too small, everything is still received and dropped,
        and ``InvalidArgumentError`` says how much arrived."""
        try:
            s = describe(buf, writable=False, what="all_to_all_v_dynamic input")
            r = describe(out, writable=True, what="all_to_all_v_dynamic output")
        finally:
            keep = hold(buf, out)
        counts = [int(c) for c in send_counts]
        if timeout is not None:
            got = self._native.all_to_all_v_dynamic(s, counts, r, float(timeout))
        else:
            got = self._native.all_to_all_v_dynamic(s, counts, r)
        del keep
        return [int(x) for x in got]

    def all_gather_in_place(self, buf: Any, *, timeout: Optional[float] = None) -> Any:
        """:meth:`all_gather` in place: block ``rank`` of ``buf`` (``world_size`` equal
        blocks) is this rank's input; every block is filled."""
        own = self._block(buf, "all_gather_in_place")
        return self._run("all_gather", own, buf, timeout=timeout)

    def reduce_scatter_in_place(
        self, buf: Any, op: OpLike = ReduceOp.SUM, *, timeout: Optional[float] = None
    ) -> Any:
        """:meth:`reduce_scatter` in place: the result lands in block ``rank`` of ``buf``."""
        own = self._block(buf, "reduce_scatter_in_place")
        self._run("reduce_scatter", buf, own, op=op, timeout=timeout)
        return own

    def all_to_all_in_place(self, buf: Any, *, timeout: Optional[float] = None) -> Any:
        """:meth:`all_to_all` in place (the input is copied once)."""
        return self._run("all_to_all", _copy(buf), buf, timeout=timeout)

    def _block(self, buf: Any, what: str) -> Any:
        """Block ``rank`` of ``buf``, as a view of the same memory."""
        if not hasattr(buf, "__array_interface__") and not hasattr(buf, "data_ptr"):
            buf = memoryview(buf)  # slicing a bytearray or array.array copies; a view does not
        n = len(buf)
        if n % self.world_size:
            raise InvalidArgumentError(
                f"{what}: {n} elements do not split into {self.world_size} equal blocks"
            )
        k = n // self.world_size
        return buf[self.rank * k : (self.rank + 1) * k]

    def barrier(self, *, timeout: Optional[float] = None) -> None:
        """Returns once every rank has entered it."""
        self._run("barrier", None, None, timeout=timeout)

    # Queued forms: each returns a Work whose wait() returns the output.

    def all_reduce_async(self, buf: Any, op: OpLike = ReduceOp.SUM, *, out: Any = None) -> Work:
        return self._run("all_reduce", buf, buf if out is None else out, op=op, asynchronous=True)  # type: ignore[no-any-return]

    def broadcast_async(self, buf: Any, root: int, *, out: Any = None) -> Work:
        is_root = self.rank == root
        return self._run(  # type: ignore[no-any-return]
            "broadcast",
            buf,
            buf if out is None else out,
            root=root,
            asynchronous=True,
            send_is_input=is_root,
        )

    def broadcast_from_roots_async(
        self, buf: Any, roots: Sequence[int], *, out: Any = None
    ) -> Work:
        rs = [int(r) for r in roots]
        return self._run(  # type: ignore[no-any-return]
            "broadcast_from_roots",
            buf,
            buf if out is None else out,
            roots=rs,
            asynchronous=True,
            send_is_input=self.rank in rs,
        )

    def reduce_async(
        self, buf: Any, root: int, op: OpLike = ReduceOp.SUM, *, out: Any = None
    ) -> Work:
        is_root = self.rank == root
        return self._run(  # type: ignore[no-any-return]
            "reduce",
            buf,
            buf if out is None else out,
            op=op,
            root=root,
            asynchronous=True,
            recv_is_output=is_root,
        )

    def all_gather_async(self, buf: Any, out: Any) -> Work:
        return self._run("all_gather", buf, out, asynchronous=True)  # type: ignore[no-any-return]

    def reduce_scatter_async(self, buf: Any, out: Any, op: OpLike = ReduceOp.SUM) -> Work:
        return self._run("reduce_scatter", buf, out, op=op, asynchronous=True)  # type: ignore[no-any-return]

    def all_to_all_async(self, buf: Any, out: Any) -> Work:
        return self._run("all_to_all", buf, out, asynchronous=True)  # type: ignore[no-any-return]

    def all_to_all_v_async(
        self, buf: Any, send_counts: Sequence[int], out: Any, recv_counts: Sequence[int]
    ) -> Work:
        counts = ([int(c) for c in send_counts], [int(c) for c in recv_counts])
        return self._run("all_to_all_v", buf, out, counts=counts, asynchronous=True)  # type: ignore[no-any-return]

    def barrier_async(self) -> Work:
        return self._run("barrier", None, None, asynchronous=True)  # type: ignore[no-any-return]

    # --- point to point ---------------------------------------------------------------

    def _p2p(
        self,
        send: bool,
        buf: Any,
        peer: int,
        timeout: Optional[float],
        asynchronous: bool,
        tag: int,
    ) -> Any:
        if not isinstance(tag, int) or not 0 <= tag < 2**32:
            raise InvalidArgumentError(f"a tag is an integer from 0 to 2**32 - 1, not {tag!r}")
        try:
            b = describe(buf, writable=not send, what="send" if send else "recv")
        finally:
            keep = hold(buf)
        gpu = gpu_of(b)
        if gpu is not None:
            if tag != 0:
                raise UnsupportedError("a tag on a send or receive of a CUDA tensor: not yet")
            native = self._native.p2p_on_stream(send, b, peer, keep, current_stream(gpu))
            return Work(native, buf) if asynchronous else self._in_flight(native, buf)
        if asynchronous:
            return Work(self._native.p2p_async(send, b, peer, keep, tag), buf)
        self._native.p2p(send, b, peer, timeout, tag)
        del keep
        return buf

    # Tags: sends and receives between two ranks match in call order, as NCCL's do; a tag
    # travels with its message and the receive checks it, so tags posted in a different
    # order on the two sides raise InvalidUsageError naming both, instead of swapping data.

    def send(self, buf: Any, peer: int, *, timeout: Optional[float] = None, tag: int = 0) -> None:
        """Sends ``buf`` to ``peer``, which receives into a buffer of the same size (and the
        same ``tag``: messages match in call order, and the receive checks the tag)."""
        self._p2p(True, buf, peer, timeout, False, tag)

    def recv(self, buf: Any, peer: int, *, timeout: Optional[float] = None, tag: int = 0) -> Any:
        """Receives from ``peer`` into ``buf`` (the message must be exactly its size, and
        carry ``tag``)."""
        return self._p2p(False, buf, peer, timeout, False, tag)

    def send_async(self, buf: Any, peer: int, *, tag: int = 0) -> Work:
        """Non-blocking send: progresses on its own (a receive posted before it on the peer
        does not deadlock); order is kept per peer and direction."""
        return self._p2p(True, buf, peer, None, True, tag)  # type: ignore[no-any-return]

    def recv_async(self, buf: Any, peer: int, *, tag: int = 0) -> Work:
        """Non-blocking receive into ``buf``; ``wait()`` returns it."""
        return self._p2p(False, buf, peer, None, True, tag)  # type: ignore[no-any-return]

    def group(self, *, timeout: Optional[float] = None) -> Group:
        """Sends and receives posted together (see :class:`Group`)."""
        return Group(self, timeout)

    # --- making and ending ------------------------------------------------------------

    def split(
        self, color: Optional[int], key: int = 0, *, traffic_class: Optional[str] = None
    ) -> Optional[Communicator]:
        """Ranks passing the same ``color`` form a new communicator, ordered by ``key``
        (``None``: take no part, get ``None``). ``traffic_class`` (``gradient``,
        ``expert_all_to_all``, ``pipeline_stage``, ``weight_refit``, ``bulk``) sets its NIC
        budget class; by default it keeps this one's."""
        if color is not None and color < 0:
            color = None  # MPI_UNDEFINED and NCCL_SPLIT_NOCOLOR are negative: no part
        native = self._native.split(color, key, traffic_class)
        return None if native is None else Communicator._wrap(native)

    def shrink(self, excluded: Sequence[int]) -> Communicator:
        """A communicator of every rank but ``excluded`` (after a loss); every survivor names
        the same ranks."""
        return Communicator._wrap(self._native.shrink([int(r) for r in excluded]))

    def abort(self) -> None:
        """Ends every operation in flight, and every later one, with :class:`AbortedError`.
        Never blocks; any thread may call it."""
        self._native.abort()

    def close(self) -> None:
        """The orderly end: every rank calls it when done."""
        self._native.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if exc_type is not None:
            self.abort()
        self.close()
