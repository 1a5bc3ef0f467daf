"""Rank programs for the multi-process tests: ``python workers.py <scenario>`` under a
launcher's environment (OXCCL_RANK, OXCCL_WORLD_SIZE, OXCCL_STORE). Each scenario asserts
what it checks and prints ``PASS <scenario> rank <r>`` at the end."""

from __future__ import annotations

import array
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, List

import numpy as np

import oxccl

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - the suite installs it
    BF16 = None

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int32", "uint32", "int64", "uint64"]


def np_dtypes():
    out = [np.dtype(d) for d in DTYPES]
    if BF16 is not None:
        out.append(BF16)
    return out


def data(rank: int, n: int, dt: np.dtype) -> np.ndarray:
    """Small integers (exact in every type, sums included) that differ by rank and index."""
    return ((np.arange(n) * 3 + rank * 7) % 5 + 1).astype(dt)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64)))


def collectives(c: oxccl.Communicator) -> None:
    r, w = c.rank, c.world_size
    n = 6 * w
    for dt in np_dtypes():
        everyone = [data(k, n, dt) for k in range(w)]
        mine = everyone[r]
        total = sum(e.astype(np.float64) for e in everyone)
        # all_reduce: in place and out of place, blocking and queued; max too.
        x = mine.copy()
        c.all_reduce(x)
        assert close(x, total), (dt, x)
        out = np.zeros_like(mine)
        assert c.all_reduce(mine, "max", out=out) is out
        assert close(out, np.max([e.astype(np.float64) for e in everyone], axis=0)), dt
        x = mine.copy()
        assert close(c.all_reduce_async(x, oxccl.ReduceOp.SUM).wait(), total), dt
        # broadcast from the last rank, in place and into out.
        x = mine.copy()
        c.broadcast(x, w - 1)
        assert close(x, everyone[w - 1]), dt
        out = np.zeros_like(mine)
        c.broadcast_async(mine, 0, out=out).wait()
        assert close(out, everyone[0]), dt
        # broadcast from several roots that hold the same data (rank 0's here).
        roots = [w - 1, 0]
        x = everyone[0].copy() if r in roots else np.zeros_like(mine)
        c.broadcast_from_roots(x, roots)
        assert close(x, everyone[0]), dt
        out = np.zeros_like(mine)
        c.broadcast_from_roots_async(everyone[0] if r in roots else mine, roots, out=out).wait()
        assert close(out, everyone[0]), dt
        # reduce to rank 0.
        x = mine.copy()
        c.reduce(x, 0)
        if r == 0:
            assert close(x, total), dt
        # all_gather, reduce_scatter, all_to_all.
        g = np.zeros(n * w, dtype=dt)
        c.all_gather(mine, g)
        assert close(g, np.concatenate(everyone)), dt
        part = np.zeros(n // w, dtype=dt)
        c.reduce_scatter(mine, part)
        assert close(part, total[r * (n // w) : (r + 1) * (n // w)]), dt
        a2a = np.zeros_like(mine)
        c.all_to_all_async(mine, a2a).wait()
        blk = n // w
        want = np.concatenate([everyone[k][r * blk : (r + 1) * blk] for k in range(w)])
        assert close(a2a, want), dt
        # The in-place forms.
        g = np.zeros(n * w, dtype=dt)
        g[r * n : (r + 1) * n] = mine
        c.all_gather_in_place(g)
        assert close(g, np.concatenate(everyone)), dt
        x = mine.copy()
        own = c.reduce_scatter_in_place(x)
        assert close(own, total[r * (n // w) : (r + 1) * (n // w)]), dt
        x = mine.copy()
        c.all_to_all_in_place(x)
        assert close(x, np.concatenate([everyone[k][r * blk : (r + 1) * blk] for k in range(w)])), (
            dt
        )
        # all_to_all_v: k+1 elements to each rank k... from rank j, r+1 elements.
        sc = [k + 1 for k in range(w)]
        rc = [r + 1] * w
        send = np.concatenate(
            [np.full(k + 1, r * 10 + k, dtype=np.float64) for k in range(w)]
        ).astype(dt)
        recv = np.zeros(sum(rc), dtype=dt)
        c.all_to_all_v(send, sc, recv, rc)
        want = np.concatenate(
            [np.full(r + 1, j * 10 + r, dtype=np.float64) for j in range(w)]
        ).astype(dt)
        assert close(recv, want), dt
        # The same exchange with the receive counts learnt from the messages.
        landing = np.zeros(sum(rc) + 5, dtype=dt)
        assert c.all_to_all_v_dynamic(send, sc, landing) == rc, dt
        assert close(landing[: sum(rc)], want), dt
    # A landing buffer too small: told on every rank (each receives r+1 from everyone), and
    # the communicator goes on.
    sc = [k + 1 for k in range(w)]
    send = np.ones(sum(sc), dtype=np.float32)
    try:
        c.all_to_all_v_dynamic(send, sc, np.zeros((r + 1) * w - 1, dtype=np.float32))
        raise AssertionError("a landing buffer too small was taken")
    except oxccl.InvalidArgumentError as e:
        assert "arrived" in str(e), e
    ex = c.explain()
    assert ex["striped"] is not None and ex["striped"]["roots"] == [w - 1, 0], ex["striped"]
    assert "broadcast from roots" in str(ex), str(ex)
    c.barrier()
    c.barrier_async().wait()


def buffers(c: oxccl.Communicator) -> None:
    r, w = c.rank, c.world_size
    b = bytearray(b"hello ox") if r == 0 else bytearray(8)
    c.broadcast(b, 0)
    assert b == bytearray(b"hello ox")
    arr = array.array("i", [r + 1] * 4)
    c.all_reduce(memoryview(arr))
    assert list(arr) == [sum(range(1, w + 1))] * 4
    x = np.ones(8, dtype=np.float32)
    bad = {
        "non-contiguous": lambda: c.all_reduce(np.ones(8, dtype=np.float32)[::2]),
        "read-only output": lambda: c.all_reduce(x, out=np.frombuffer(bytes(32), dtype=np.float32)),
        "too short": lambda: c.all_reduce(x, out=np.zeros(7, dtype=np.float32)),
        "two types": lambda: c.all_reduce(x, out=np.zeros(8, dtype=np.int32)),
        "no such type": lambda: c.all_reduce(np.ones(4, dtype=np.complex64)),
        "not a buffer": lambda: c.all_reduce([1.0, 2.0]),
        "bad op": lambda: c.all_reduce(x, "median"),
        "avg of integers": lambda: c.all_reduce(np.ones(4, dtype=np.int32), "avg"),
        "root out of range": lambda: c.broadcast(x, w + 3),
        "bad timeout": lambda: c.all_reduce(x, timeout=0),
        "big-endian": lambda: c.all_reduce(np.arange(4, dtype=">f4")),
    }
    for what, f in bad.items():
        try:
            f()
        except (oxccl.InvalidArgumentError, ValueError) as e:
            assert isinstance(e, ValueError), (what, type(e))
            print(f"rank {r}: {what}: {e}")
        else:
            raise AssertionError(f"{what}: no error")
    # In place on a bytearray: the block is a view, not a copy.
    ba = bytearray([r + 1] * (2 * w))
    c.reduce_scatter_in_place(ba)
    assert list(ba[2 * r : 2 * r + 2]) == [sum(range(1, w + 1))] * 2, list(ba)
    # A bytearray cannot be resized (moved) while an operation uses it.
    grow = bytearray(1 << 16)
    wk = c.all_reduce_async(grow)
    try:
        grow.extend(b"more")
    except BufferError:
        print(f"rank {r}: resize refused while in use")
    else:
        raise AssertionError("a bytearray was resized under an operation")
    wk.wait()
    del wk
    grow.extend(b"more")  # free again once done
    # Nothing moved, and the communicator is usable.
    y = np.full(4, r, dtype=np.int64)
    c.all_reduce(y)
    assert (y == sum(range(w))).all()


def p2p(c: oxccl.Communicator) -> None:
    r, w = c.rank, c.world_size
    nxt, prv = (r + 1) % w, (r - 1) % w
    # Each posts its receive first: no deadlock (as gloo and MPI).
    for n in (0, 1, 1000, 1 << 18):
        rx = c.recv_async(np.zeros(n, dtype=np.int32), prv)
        tx = c.send_async(np.arange(n, dtype=np.int32) + r, nxt)
        got = rx.wait()
        assert tx.wait() is not None
        assert (got == np.arange(n) + prv).all()
    # A grouped ring.
    out = np.zeros(16, dtype=np.float32)
    with c.group() as g:
        g.send(np.full(16, r, dtype=np.float32), nxt)
        g.recv(out, prv)
    assert (out == prv).all()
    # Blocking pairs.
    if r == 0:
        c.send(np.arange(5, dtype=np.uint8), 1)
    elif r == 1:
        got = c.recv(np.zeros(5, dtype=np.uint8), 0)
        assert list(got) == [0, 1, 2, 3, 4]
    # test() and wait(timeout) on a receive nobody sends yet.
    if r == 1:
        wk = c.recv_async(np.zeros(3, dtype=np.int8), 0)
        assert not wk.test()
        assert wk.wait(timeout=0.2) is None
        c.send(np.zeros(1, dtype=np.int8), 0)
        assert (wk.wait() == 7).all()
    elif r == 0:
        c.recv(np.zeros(1, dtype=np.int8), 1)
        c.send(np.full(3, 7, dtype=np.int8), 1)


def gil(c: oxccl.Communicator) -> None:
    """While rank 0 waits 1 s in a blocking receive, another of its threads runs Python."""
    r = c.rank
    c.barrier()
    if r == 0:
        count = [0]
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                count[0] += 1

        t = threading.Thread(target=spin)
        t.start()
        t0 = time.monotonic()
        c.recv(np.zeros(4, dtype=np.float32), 1)
        waited = time.monotonic() - t0
        stop.set()
        t.join()
        print(f"rank 0 waited {waited:.2f} s; the other thread counted {count[0]}")
        assert waited > 0.8 and count[0] > 100_000, (waited, count[0])
    elif r == 1:
        time.sleep(1.0)
        c.send(np.ones(4, dtype=np.float32), 0)


def interrupt(c: oxccl.Communicator) -> None:
    """Rank 0 waits for a receive nobody sends; a SIGINT a second later raises
    KeyboardInterrupt within half a second and leaves the communicator aborted. The peer,
    waiting on rank 0, is told rank 0 aborted."""
    r = c.rank
    c.barrier()
    if r == 0:
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            c.recv(np.zeros(4, dtype=np.float32), 1, timeout=30)
        except KeyboardInterrupt:
            late = time.monotonic() - t0 - 1.0
            print(f"rank 0: KeyboardInterrupt {late * 1000:.0f} ms after the signal")
            assert late < 0.5, late
            assert c.aborted
            try:
                c.barrier()
            except oxccl.AbortedError as e:
                print("rank 0 then:", e)
            else:
                raise AssertionError("usable after Ctrl-C")
        else:
            raise AssertionError("no KeyboardInterrupt")
    else:
        # Waiting on a Work in another thread: Ctrl-C (at the main thread, 1 s in) aborts the
        # communicator, and that wait ends with AbortedError instead of at its deadline.
        got: List[BaseException] = []

        def waiter() -> None:
            try:
                c.recv_async(np.zeros(4, dtype=np.float32), 0).wait(timeout=30)
            except BaseException as e:  # noqa: BLE001 - checked below
                got.append(e)

        t = threading.Thread(target=waiter)
        t.start()
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        t0 = time.monotonic()
        try:
            time.sleep(20)
        except KeyboardInterrupt:
            pass
        t.join(10)
        late = time.monotonic() - t0 - 1.0
        assert got and isinstance(got[0], (oxccl.AbortedError, oxccl.RemoteError)), got
        name = type(got[0]).__name__
        print(f"rank {r}: the waiting thread got {name} {late * 1000:.0f} ms after Ctrl-C")
        assert late < 1.0, late


def hello(c: oxccl.Communicator) -> None:
    """from_env read the launcher's variables: the rank is the launcher's, and every rank
    takes part."""
    var = os.environ["OXCCL_TEST_RANK_VAR"]
    assert c.rank == int(os.environ[var]), (var, c.rank)
    x = np.array([c.rank, 1], dtype=np.int64)
    c.all_reduce(x)
    w = c.world_size
    assert x.tolist() == [w * (w - 1) // 2, w], x
    print(f"rank {c.rank} of {w} from {var}")


def killed(c: oxccl.Communicator) -> None:
    """The last rank dies (SIGKILL) during all_reduces; the others get RemoteError naming it."""
    r, w = c.rank, c.world_size
    v = w - 1
    x = np.ones(1 << 16, dtype=np.float32)
    for i in range(1000):
        if r == v and i == 10:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            c.all_reduce(x)
        except oxccl.RemoteError as e:
            assert e.rank == v, e
            assert i >= 10
            print(f"rank {r}: {e}")
            # The survivors go on without it.
            with c.shrink([v]) as c2:
                assert c2.world_size == w - 1 and c2.rank == r
                y = np.ones(4, dtype=np.int32)
                c2.all_reduce(y)
                assert (y == w - 1).all()
            return
    raise AssertionError("the lost rank was never noticed")


def manage(c: oxccl.Communicator) -> None:
    r, w = c.rank, c.world_size
    ex = c.explain()
    assert ex["rank"] == r and ex["world"] == w and isinstance(ex, dict)
    assert str(ex).startswith("communicator ")
    sub = c.split(r % 2, key=-r, traffic_class="weight_refit")
    assert sub is not None and sub.traffic_class == "weight_refit"
    assert sub.world_size == len(range(r % 2, w, 2))
    members = sorted(range(r % 2, w, 2), reverse=True)
    assert sub.rank == members.index(r), (sub.rank, members)
    y = np.array([r], dtype=np.int64)
    sub.all_reduce(y)
    assert y[0] == sum(members)
    sub.close()
    assert c.split(None, 0) is None
    assert c.split(-1, 0) is None  # MPI_UNDEFINED
    try:
        c.split(0, 0, traffic_class="urgent")
    except ValueError as e:
        assert "expected one of" in str(e)
    c.barrier()
    c.timeout = 5.0
    assert abs(c.timeout - 5.0) < 1e-9
    # A timeout is a TimeoutError (builtins too), and says whom it waited on.
    if r == 0:
        try:
            c.recv(np.zeros(1, dtype=np.uint8), 1, timeout=0.5)
        except TimeoutError as e:
            assert isinstance(e, oxccl.TimeoutError) and "waiting" in str(e), e
            print("rank 0:", e)
        else:
            raise AssertionError("no timeout")
    else:
        time.sleep(1.5)  # alive while rank 0 times out waiting for rank 1


SCENARIOS: Dict[str, Callable[[oxccl.Communicator], None]] = {
    "collectives": collectives,
    "hello": hello,
    "buffers": buffers,
    "p2p": p2p,
    "gil": gil,
    "interrupt": interrupt,
    "killed": killed,
    "manage": manage,
}


def interrupt_creation() -> None:
    """Ctrl-C while rank 0 waits, in from_env, for a rank 1 that never comes: it raises
    KeyboardInterrupt within half a second (not at the deadline)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    r = int(os.environ["OXCCL_RANK"])
    if r == 1:
        time.sleep(3.0)  # never joins
        print("PASS interrupt_creation rank 1", flush=True)
        return
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t0 = time.monotonic()
    try:
        oxccl.Communicator.from_env()
    except KeyboardInterrupt:
        late = time.monotonic() - t0 - 1.0
        print(f"rank 0: KeyboardInterrupt {late * 1000:.0f} ms after Ctrl-C, during creation")
        assert late < 0.5, late
        print("PASS interrupt_creation rank 0", flush=True)
        return
    raise AssertionError("the communicator was created without rank 1")


def main() -> None:
    name = sys.argv[1]
    if name == "interrupt_creation":
        interrupt_creation()
        return
    if name == "interrupt":
        # As at a terminal: a job started in the background of a non-interactive shell (CI)
        # inherits SIGINT ignored, and Python then leaves it so (OxCCL too).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    c = oxccl.Communicator.from_env()
    SCENARIOS[name](c)
    if name not in ("interrupt", "killed", "manage"):
        c.close()
    print(f"PASS {name} rank {c.rank}", flush=True)


if __name__ == "__main__":
    main()
