"""The Ray collective backend ``"oxccl"`` (``ray.util.collective``).

``import oxccl.ray`` registers it, in the driver and in every actor (Ray needs both)::

    import ray.util.collective as col
    import oxccl.ray  # noqa: F401

    @ray.remote
    class Worker:
        def setup(self, world, rank):
            import oxccl.ray  # noqa: F401
            col.init_collective_group(world, rank, backend="oxccl", group_name="g")
        def step(self, t):
            col.allreduce(t, group_name="g")
            return t

The group's ranks meet through a named Ray actor (``oxccl_store_<group>``, in the namespace
``oxccl-<the job's namespace>``) that serves as the rendezvous store. It is detached, so that
it outlives whichever rank happened to create it while the others still use it; the last rank
to destroy the group removes it. (A group whose ranks never all destroy it leaves that one
small actor behind until the Ray cluster ends.) Make a group of the same name again only once
every rank's ``destroy_collective_group`` has returned. Supported: allreduce, broadcast,
reduce, allgather, reducescatter, send, recv, barrier, on numpy arrays and torch CPU tensors.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
import ray
from ray.util.collective import types
from ray.util.collective.collective_group.base_collective_group import BaseGroup

from . import _oxccl
from ._comm import Communicator

__all__ = ["OxcclRayGroup", "BACKEND"]

BACKEND = "oxccl"

_OPS = {
    types.ReduceOp.SUM: "sum",
    types.ReduceOp.PRODUCT: "prod",
    types.ReduceOp.MIN: "min",
    types.ReduceOp.MAX: "max",
}


@ray.remote(num_cpus=0)
class _StoreActor:
    """The group's rendezvous store: a dictionary in an actor."""

    def __init__(self) -> None:
        self._d: Dict[str, bytes] = {}

    def set(self, key: str, value: bytes) -> None:
        self._d[key] = bytes(value)

    def get(self, key: str) -> Optional[bytes]:
        return self._d.get(key)

    def have(self, keys: List[str]) -> bool:
        return all(k in self._d for k in keys)

    def add(self, key: str, delta: int) -> int:
        v = int(self._d.get(key, b"0")) + delta
        self._d[key] = str(v).encode()
        return v

    def delete_key(self, key: str) -> bool:
        return self._d.pop(key, None) is not None


class _RayStore:
    """The store interface the native module calls (c10d's method names) over the actor."""

    def __init__(self, actor: Any) -> None:
        self._a = actor

    @property
    def actor(self) -> Any:
        """The actor that holds the keys."""
        return self._a

    def set(self, key: str, value: bytes) -> None:
        ray.get(self._a.set.remote(key, value))

    def get(self, key: str) -> bytes:
        v = ray.get(self._a.get.remote(key))
        if v is None:
            raise KeyError(key)
        return bytes(v)

    def check(self, keys: List[str]) -> bool:
        return bool(ray.get(self._a.have.remote(list(keys))))

    def wait(self, keys: List[str], timeout: timedelta) -> None:
        until = time.monotonic() + timeout.total_seconds()
        pause = 0.001
        while not self.check(keys):
            if time.monotonic() >= until:
                raise TimeoutError(f"timeout waiting for {keys}")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def add(self, key: str, delta: int) -> int:
        return int(ray.get(self._a.add.remote(key, delta)))

    def delete_key(self, key: str) -> bool:
        return bool(ray.get(self._a.delete_key.remote(key)))


def _op(opts: Any) -> str:
    op = getattr(opts, "reduceOp", types.ReduceOp.SUM)
    if op not in _OPS:
        raise ValueError(f"OxCCL has no reduce op {op}")
    return _OPS[op]


def _flat_like(t: Any, n: int) -> Any:
    """A contiguous buffer of ``n`` elements of ``t``'s type and library."""
    if isinstance(t, np.ndarray):
        return np.empty(n, dtype=t.dtype)
    import torch

    return torch.empty(n, dtype=t.dtype)


class OxcclRayGroup(BaseGroup):
    """A Ray collective group over an OxCCL communicator."""

    def __init__(self, world_size: int, rank: int, group_name: str) -> None:
        super().__init__(world_size, rank, group_name)
        opts = _StoreActor.options  # type: ignore[attr-defined]  # added by @ray.remote
        self._store_name = f"oxccl_store_{group_name}"
        # Detached: a store owned by the rank that made it would go with that rank's last
        # handle, under ranks still closing through it.
        # Its own namespace, named after the job's, keeps jobs apart (and Ray quiet about a
        # detached actor in an anonymous namespace).
        self._store_ns = f"oxccl-{ray.get_runtime_context().namespace}"
        actor = opts(
            name=self._store_name, namespace=self._store_ns, get_if_exists=True, lifetime="detached"
        ).remote()
        self._store = _RayStore(actor)
        native = _oxccl.Comm.from_store(self._store, rank, world_size)
        self._comm = Communicator._wrap(native)

    @property
    def comm(self) -> Communicator:
        """The OxCCL communicator of this group."""
        return self._comm

    @classmethod
    def backend(cls) -> str:
        return BACKEND

    @classmethod
    def check_backend_availability(cls) -> bool:
        return True

    def destroy_group(self) -> None:
        try:
            self._comm.close()
        finally:
            self._count_out()

    def _count_out(self) -> None:
        # Each rank counts itself out once its close (which uses the store) is over; the last
        # one removes the store and waits, briefly, until its name is free for a new group.
        if self._store.add("oxccl/ray/destroyed", 1) == self.world_size:
            ray.kill(self._store.actor)
            until = time.monotonic() + 10.0
            while time.monotonic() < until:
                try:
                    ray.get_actor(self._store_name, namespace=self._store_ns)
                except ValueError:
                    break
                time.sleep(0.01)

    def allreduce(self, tensors: List[Any], allreduce_options: Any = None) -> None:
        for t in tensors:
            self._comm.all_reduce(t, _op(allreduce_options))

    def barrier(self, barrier_options: Any = None) -> None:
        self._comm.barrier()

    def reduce(self, tensors: List[Any], reduce_options: Any = None) -> None:
        for t in tensors:
            self._comm.reduce(t, int(reduce_options.root_rank), _op(reduce_options))

    def broadcast(self, tensors: List[Any], broadcast_options: Any = None) -> None:
        for t in tensors:
            self._comm.broadcast(t, int(broadcast_options.root_rank))

    def allgather(
        self, tensor_lists: List[List[Any]], tensors: List[Any], allgather_options: Any = None
    ) -> None:
        for outs, t in zip(tensor_lists, tensors):
            n = _size(t)
            flat = _flat_like(t, n * len(outs))
            self._comm.all_gather(_contiguous(t), flat)
            for k, o in enumerate(outs):
                o[...] = flat[k * n : (k + 1) * n].reshape(o.shape)

    def reducescatter(
        self, tensors: List[Any], tensor_lists: List[List[Any]], reducescatter_options: Any = None
    ) -> None:
        for out, ins in zip(tensors, tensor_lists):
            flat = _concat(ins)
            self._comm.reduce_scatter(flat, out, _op(reducescatter_options))

    def send(self, tensors: List[Any], send_options: Any) -> None:
        for t in tensors:
            self._comm.send(_contiguous(t), int(send_options.dst_rank))

    def recv(self, tensors: List[Any], recv_options: Any) -> None:
        for t in tensors:
            self._comm.recv(t, int(recv_options.src_rank))


def _size(t: Any) -> int:
    return int(t.size) if isinstance(t, np.ndarray) else int(t.numel())


def _contiguous(t: Any) -> Any:
    return np.ascontiguousarray(t) if isinstance(t, np.ndarray) else t.contiguous()


def _concat(ts: List[Any]) -> Any:
    if isinstance(ts[0], np.ndarray):
        return np.concatenate([t.reshape(-1) for t in ts])
    import torch

    return torch.cat([t.reshape(-1) for t in ts])


def _register() -> None:
    from ray.util.collective.backend_registry import _global_registry, register_collective_backend

    if not _global_registry.is_registered(BACKEND):
        register_collective_backend(BACKEND, OxcclRayGroup)


_register()
