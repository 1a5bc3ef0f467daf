"""Ranks as threads of one process: the explicit constructor, and a communicator made on a
Python store that an abort writes to while another thread holds the GIL (it used to
deadlock: explain() and dropping the communicator waited for the engine's lock with the GIL
held)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
from conftest import free_port

import oxccl
from oxccl import _oxccl


class DictStore:
    """A c10d-like store in a dict (what the native module calls on torch's stores)."""

    def __init__(self) -> None:
        self._d: Dict[str, bytes] = {}
        self._cv = threading.Condition()

    def set(self, key: str, value: bytes) -> None:
        with self._cv:
            self._d[key] = bytes(value)
            self._cv.notify_all()

    def get(self, key: str) -> bytes:
        with self._cv:
            return self._d[key]

    def check(self, keys: List[str]) -> bool:
        with self._cv:
            return all(k in self._d for k in keys)

    def wait(self, keys: List[str], timeout: timedelta) -> None:
        with self._cv:
            if not self._cv.wait_for(
                lambda: all(k in self._d for k in keys), timeout.total_seconds()
            ):
                raise TimeoutError(f"timeout waiting for {keys}")

    def add(self, key: str, delta: int) -> int:
        with self._cv:
            v = int(self._d.get(key, b"0")) + delta
            self._d[key] = str(v).encode()
            self._cv.notify_all()
            return v

    def delete_key(self, key: str) -> bool:
        with self._cv:
            return self._d.pop(key, None) is not None


def run_threads(n: int, body: Any, timeout: float = 60.0) -> List[Optional[BaseException]]:
    errors: List[Optional[BaseException]] = [None] * n

    def one(r: int) -> None:
        try:
            body(r)
        except BaseException as e:  # reported below
            errors[r] = e

    ts = [threading.Thread(target=one, args=(r,), daemon=True) for r in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
        assert not t.is_alive(), "a rank hung"
    return errors


def test_explicit_constructor() -> None:
    addr = f"127.0.0.1:{free_port()}"

    def rank(r: int) -> None:
        with oxccl.Communicator(r, 2, addr, timeout=20) as c:
            assert (c.rank, c.world_size) == (r, 2)
            x = np.full(8, r + 1, dtype=np.int32)
            c.all_reduce(x)
            assert (x == 3).all()

    assert run_threads(2, rank) == [None, None]


def test_abort_then_explain_and_drop_on_a_python_store() -> None:
    store = DictStore()

    def rank(r: int) -> None:
        c = _oxccl.Comm.from_store(store, r, 2, 20.0)
        x = np.ones(4, dtype=np.float32)
        comm = oxccl.Communicator._wrap(c)
        comm.all_reduce(x)
        comm.abort()
        time.sleep(0.2)
        assert comm.explain()["rank"] == r
        del comm, c  # the last reference closes it

    assert run_threads(2, rank, timeout=30) == [None, None]
