"""The torch.distributed backend ``"oxccl"``.

``import oxccl.torch`` registers it; then, under torchrun (or any launcher torch supports)::

    import torch.distributed as dist
    import oxccl.torch  # noqa: F401

    dist.init_process_group("oxccl")
    dist.all_reduce(t)  # CPU tensors

Ranks meet through the c10d store torch hands the backend (no extra port). Groups made with
``dist.new_group(ranks, pg_options=oxccl.torch.Options(traffic_class="weight_refit"))``
get that NIC budget class. Every call runs on OxCCL's progress thread and returns a
``Work``; ``async_op=False`` calls wait on it. Non-blocking ``isend``/``irecv`` progress
independently (two ranks that each post ``irecv`` before ``isend`` do not deadlock).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _oxccl
from ._buffers import current_stream, describe, gpu_of

__all__ = ["Options", "ProcessGroupOxccl", "BACKEND"]

BACKEND = "oxccl"


@dataclass
class Options:
    """Options of an OxCCL process group (``pg_options`` of ``init_process_group`` and
    ``new_group``): its traffic class (``gradient``, ``expert_all_to_all``,
    ``pipeline_stage``, ``weight_refit``, ``bulk``; default ``OXCCL_CLASS``)."""

    traffic_class: Optional[str] = None


_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.PRODUCT: "prod",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.AVG: "avg",
}


def _op(opts: Any) -> str:
    op = getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    for k, v in _OPS.items():
        if op == k:
            return v
    raise ValueError(f"OxCCL has no reduce op {op} (it has SUM, PRODUCT, MIN, MAX, AVG)")


def _root(opts: Any) -> int:
    return int(getattr(opts, "rootRank", 0)) if opts is not None else 0


def _buf(t: torch.Tensor, *, out: bool) -> Any:
    return describe(t, writable=out, what="output" if out else "input")


class _Work(dist.Work):
    """A torch Work over one or more OxCCL operations; ``after`` runs once they completed
    (copies into the caller's tensors)."""

    def __init__(
        self,
        natives: List[Any],
        result: List[torch.Tensor],
        after: Optional[Callable[[], None]] = None,
    ) -> None:
        super().__init__()
        self._natives = natives
        self._result = result
        self._after = after
        self._lock = threading.Lock()
        self._done = False

    def _finish(self) -> None:
        with self._lock:
            if self._done:
                return
            for n in self._natives:
                n.wait()
            if self._after is not None:
                self._after()
            self._done = True

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        """Waits for completion (``timeout`` > 0: at most that long, then raises
        ``TimeoutError``, as c10d's Works do)."""
        if timeout and timeout.total_seconds() > 0:
            limit = timeout.total_seconds()
            start = time.monotonic()
            for n in self._natives:
                left = limit - (time.monotonic() - start)
                if left <= 0 or not n.wait(left):
                    raise TimeoutError(f"the operation did not complete within {timeout}")
        self._finish()
        return True

    def is_completed(self) -> bool:
        if self._done:
            return True
        if all(n.test() for n in self._natives):
            self._finish()
            return True
        return False

    def is_success(self) -> bool:
        return self.is_completed()

    def result(self) -> List[torch.Tensor]:
        self._finish()
        return self._result

    def get_future(self) -> torch.futures.Future[List[torch.Tensor]]:
        """A future completed (by one helper thread) when the operation is. On failure it
        holds the error as C++ code reads it too: DDP's backward then raises, where a
        future set with ``set_exception`` would hand C++ an exception object for tensors."""
        src: torch.futures.Future[Any] = torch.futures.Future()
        _completer().put((self, src))
        return src.then(_unwrap)


_COMPLETER: Optional[queue.SimpleQueue[Tuple[_Work, Any]]] = None
_COMPLETER_LOCK = threading.Lock()


def _completer() -> queue.SimpleQueue[Tuple[_Work, Any]]:
    """One thread completes the futures of every Work in turn (operations of a group finish
    in call order), instead of a thread per future (DDP asks for one per bucket)."""
    global _COMPLETER
    with _COMPLETER_LOCK:
        if _COMPLETER is None:
            q: queue.SimpleQueue[Tuple[_Work, Any]] = queue.SimpleQueue()

            def run() -> None:
                while True:
                    work, fut = q.get()
                    try:
                        work._finish()
                        fut.set_result(work._result)
                    except Exception as e:  # raised again by _unwrap, in the chained future
                        fut.set_result(_Failed(e))

            threading.Thread(target=run, name="oxccl-futures", daemon=True).start()
            _COMPLETER = q
        return _COMPLETER


class _Failed:
    """An operation's error, carried to ``_unwrap``."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _unwrap(fut: torch.futures.Future[Any]) -> Any:
    """The chained future's value: the tensors, or the error raised (torch then marks that
    future failed, for C++ and Python waiters alike)."""
    v = fut.value()
    if isinstance(v, _Failed):
        raise v.error
    return v


def _done(result: List[torch.Tensor]) -> _Work:
    return _Work([], result)


class ProcessGroupOxccl(dist.ProcessGroup):
    """A torch process group whose collectives run on an OxCCL communicator."""

    def __init__(self, comm: Any, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self._comm = comm

    # -- helpers ---------------------------------------------------------------------------

    def _check(self, tensors: List[torch.Tensor], *, out: bool) -> None:
        """Every tensor's checks before any operation is posted (a bad one further down a
        list must not leave the rank out of step with its peers)."""
        for t in tensors:
            _buf(t, out=out)

    def _submit(
        self,
        name: str,
        send: torch.Tensor,
        recv: torch.Tensor,
        keep: Any,
        reduce: Optional[str] = None,
        root: int = 0,
        counts: Any = None,
    ) -> Any:
        s = _buf(send, out=False)
        r = _buf(recv, out=True)
        gpu = gpu_of(s, r)
        if gpu is not None:
            # CUDA tensors: queued on the current stream, as torch's NCCL backend does.
            stream = current_stream(gpu)
            return self._comm.submit_on_stream(name, s, r, keep, stream, reduce, root, counts)
        return self._comm.submit(name, s, r, keep, reduce, root, counts)

    def _p2p(self, send: bool, t: torch.Tensor, peer: int, tag: int) -> Any:
        if not 0 <= tag < 2**32:
            raise ValueError(f"OxCCL's tags are from 0 to 2**32 - 1, not {tag}")
        b = _buf(t, out=not send)
        gpu = gpu_of(b)
        if gpu is not None:
            if tag != 0:
                raise ValueError("OxCCL: a tag on a send or receive of a CUDA tensor: not yet")
            return self._comm.p2p_on_stream(send, b, peer, t, current_stream(gpu))
        return self._comm.p2p_async(send, b, peer, t, tag)

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    # This group is its own backend for CPU tensors (batch_isend_irecv asks): without
    # coalescing support, torch posts each isend/irecv on its own, and they progress
    # independently here.
    supports_coalescing = False

    def _get_backend(self, device: Any) -> ProcessGroupOxccl:
        return self

    @property
    def comm(self) -> Any:
        """The OxCCL communicator (native) behind this group."""
        return self._comm

    # -- collectives -----------------------------------------------------------------------

    def allreduce(self, tensors: List[torch.Tensor], opts: Any = None) -> _Work:
        op = _op(opts)
        self._check(tensors, out=True)
        works = [self._submit("all_reduce", t, t, t, op) for t in tensors]
        return _Work(works, tensors)

    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts: Any = None) -> _Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: List[torch.Tensor], opts: Any = None) -> _Work:
        root = _root(opts)
        self._check(tensors, out=True)
        works = [self._submit("broadcast", t, t, t, None, root) for t in tensors]
        return _Work(works, tensors)

    def reduce(self, tensors: List[torch.Tensor], opts: Any = None) -> _Work:
        root = _root(opts)
        self._check(tensors, out=True)
        works = [self._submit("reduce", t, t, t, _op(opts), root) for t in tensors]
        return _Work(works, tensors)

    def all_gather_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> _Work:
        return _Work([self._submit("all_gather", input, output, (input, output))], [output])

    _allgather_base = all_gather_single

    def allgather(
        self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None
    ) -> _Work:
        works, afters = [], []
        for outs in outputs:
            if len(outs) != self.size():
                raise ValueError(
                    f"all_gather needs {self.size()} output tensors, one per rank, not {len(outs)}"
                )
        for outs, inp in zip(outputs, inputs):
            flat = torch.empty(inp.numel() * len(outs), dtype=inp.dtype)
            works.append(self._submit("all_gather", inp, flat, (inp, flat)))
            afters.append((outs, flat))

        def copy() -> None:
            for outs, flat in afters:
                for i, o in enumerate(outs):
                    o.copy_(flat[i * o.numel() : (i + 1) * o.numel()].view_as(o))

        return _Work(works, [o for outs in outputs for o in outs], copy)

    def all_gather_single_coalesced(
        self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None
    ) -> _Work:
        self._check(inputs, out=False)
        self._check(outputs, out=True)
        works = [self._submit("all_gather", i, o, (i, o)) for o, i in zip(outputs, inputs)]
        return _Work(works, outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def reduce_scatter_single_coalesced(
        self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None
    ) -> _Work:
        op = _op(opts)
        self._check(inputs, out=False)
        self._check(outputs, out=True)
        works = [self._submit("reduce_scatter", i, o, (i, o), op) for o, i in zip(outputs, inputs)]
        return _Work(works, outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def allgather_coalesced(
        self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None
    ) -> _Work:
        return self.allgather(outputs, inputs, opts)

    def recv_anysource(self, tensors: List[torch.Tensor], tag: int = 0) -> _Work:
        raise NotImplementedError("OxCCL receives from a named rank only (no any-source receive)")

    def reduce_scatter_single(
        self, output: torch.Tensor, input: torch.Tensor, opts: Any = None
    ) -> _Work:
        return _Work(
            [self._submit("reduce_scatter", input, output, (input, output), _op(opts))], [output]
        )

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter(
        self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any = None
    ) -> _Work:
        works = []
        for out, ins in zip(outputs, inputs):
            flat = torch.cat([i.reshape(-1) for i in ins])
            works.append(self._submit("reduce_scatter", flat, out, (flat, out), _op(opts)))
        return _Work(works, outputs)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: List[int],
        input_split_sizes: List[int],
        opts: Any = None,
    ) -> _Work:
        w = self.size()
        if not output_split_sizes and not input_split_sizes:
            return _Work([self._submit("all_to_all", input, output, (input, output))], [output])
        row_in = input[0].numel() if input.dim() > 0 and input.shape[0] else 1
        row_out = output[0].numel() if output.dim() > 0 and output.shape[0] else 1
        ins = list(input_split_sizes) or [input.shape[0] // w] * w
        outs = list(output_split_sizes) or [output.shape[0] // w] * w
        counts = ([s * row_in for s in ins], [s * row_out for s in outs])
        return _Work(
            [self._submit("all_to_all_v", input, output, (input, output), None, 0, counts)],
            [output],
        )

    alltoall_base = all_to_all_single

    def alltoall(
        self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None
    ) -> _Work:
        flat_in = torch.cat([i.reshape(-1) for i in inputs])
        flat_out = torch.empty(sum(o.numel() for o in outputs), dtype=flat_in.dtype)
        counts = ([i.numel() for i in inputs], [o.numel() for o in outputs])
        work = self._submit("all_to_all_v", flat_in, flat_out, (flat_in, flat_out), None, 0, counts)

        def copy() -> None:
            at = 0
            for o in outputs:
                o.copy_(flat_out[at : at + o.numel()].view_as(o))
                at += o.numel()

        return _Work([work], outputs, copy)

    # gather and scatter are all_to_all_v calls in which only the root receives (gather) or
    # sends (scatter): collectives, in the group's collective order, never matched against
    # the user's own sends and receives.

    def gather(
        self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None
    ) -> _Work:
        root, w = _root(opts), self.size()
        inp = inputs[0].contiguous()
        self._check([inp], out=False)
        none = [0] * w
        send = list(none)
        send[root] = inp.numel()
        if self.rank() != root:
            empty = torch.empty(0, dtype=inp.dtype)
            work = self._submit("all_to_all_v", inp, empty, (inp, empty), None, 0, (send, none))
            return _Work([work], [])
        outs = outputs[0]
        if len(outs) != w:
            raise ValueError(
                f"gather's root needs {w} output tensors, one per rank, not {len(outs)}"
            )
        self._check(outs, out=True)
        flat = torch.empty(sum(o.numel() for o in outs), dtype=inp.dtype)
        counts = (send, [o.numel() for o in outs])
        work = self._submit("all_to_all_v", inp, flat, (inp, flat), None, 0, counts)

        def copy() -> None:
            at = 0
            for o in outs:
                o.copy_(flat[at : at + o.numel()].view_as(o))
                at += o.numel()

        return _Work([work], outs, copy)

    def scatter(
        self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any = None
    ) -> _Work:
        root, w = _root(opts), self.size()
        out = outputs[0]
        self._check([out], out=True)
        none = [0] * w
        recv = list(none)
        recv[root] = out.numel()
        if self.rank() != root:
            empty = torch.empty(0, dtype=out.dtype)
            work = self._submit("all_to_all_v", empty, out, (empty, out), None, 0, (none, recv))
            return _Work([work], [out])
        ins = inputs[0]
        if len(ins) != w:
            raise ValueError(
                f"scatter's root needs {w} input tensors, one per rank, not {len(ins)}"
            )
        self._check([t.contiguous() for t in ins], out=False)
        flat = torch.cat([t.reshape(-1) for t in ins])
        counts = ([t.numel() for t in ins], recv)
        work = self._submit("all_to_all_v", flat, out, (flat, out), None, 0, counts)
        return _Work([work], [out])

    def barrier(self, opts: Any = None) -> _Work:
        return _Work([self._comm.submit("barrier", (0, 0, "uint8"), (0, 0, "uint8"), None)], [])

    # -- point to point (non-blocking: independent progress) --------------------------------

    # Tags: sends and receives between two ranks match in call order (as with NCCL); the
    # tag travels with the message and the receive checks it, so a receive posted for
    # another tag than the next message's raises an error naming both, never swaps data.

    def send(self, tensors: List[torch.Tensor], dst: int, tag: int = 0) -> _Work:
        self._check(tensors, out=False)
        return _Work([self._p2p(True, t, dst, tag) for t in tensors], tensors)

    def recv(self, tensors: List[torch.Tensor], src: int, tag: int = 0) -> _Work:
        self._check(tensors, out=True)
        return _Work([self._p2p(False, t, src, tag) for t in tensors], tensors)

    def abort(self) -> None:
        self._comm.abort()

    def shutdown(self) -> None:
        self._comm.close()


def _create(dist_opts: Any, backend_options: Any) -> ProcessGroupOxccl:
    timeout = getattr(dist_opts, "timeout", None)
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else None
    tc = backend_options.traffic_class if isinstance(backend_options, Options) else None
    comm = _oxccl.Comm.from_store(
        dist_opts.store, dist_opts.group_rank, dist_opts.group_size, seconds, tc
    )
    return ProcessGroupOxccl(comm, dist_opts.group_rank, dist_opts.group_size)


def _register() -> None:
    if BACKEND.upper() not in dist.Backend._plugins:
        # CUDA tensors go through OxCCL's GPU data path (a build with the cuda feature).
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


_register()
