"""Ranks of the torch.distributed tests that torchrun cannot host (it ends every rank as soon
as one fails): ``python torch_cases.py <scenario>`` under torchrun's variables, with
``MASTER_PORT`` where torch's own store listens. Prints ``PASS <scenario> rank <r>``."""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

import oxccl
import oxccl.torch  # noqa: F401


def killed() -> None:
    """The last rank dies (SIGKILL) between all_reduces; the others get oxccl.RemoteError
    naming it, from torch.distributed's own call, well before the deadline."""
    r, w = dist.get_rank(), dist.get_world_size()
    victim = w - 1
    x = torch.ones(1 << 14)
    for i in range(1000):
        if r == victim and i == 5:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            dist.all_reduce(x)
        except oxccl.RemoteError as e:
            assert e.rank == victim, e
            assert i >= 5, i
            print(f"rank {r}: {type(e).__name__}: {e}", flush=True)
            # The survivors leave together: rank 0 hosts torch's store, and a survivor still
            # waiting would otherwise see rank 0 go first.
            import datetime

            store = dist.distributed_c10d._get_default_store()
            limit = datetime.timedelta(seconds=60)
            store.set(f"killed/done/{r}", "1")
            store.wait([f"killed/done/{k}" for k in range(w - 1)], limit)
            # The store's host (rank 0) leaves last, once the others have had their answer.
            if r == 0:
                store.wait([f"killed/left/{k}" for k in range(1, w - 1)], limit)
            else:
                store.set(f"killed/left/{r}", "1")
            return
    raise AssertionError("the lost rank was never noticed")


def ddp_interrupt() -> None:
    """Ctrl-C on rank 0 while DistributedDataParallel trains: the wait is in torch's C++
    backward (the futures' helper thread waits on OxCCL). Rank 0 ends within half a second
    (KeyboardInterrupt, or the aborted all_reduce's error if that surfaces first); rank 1
    gets the error, not a hang."""
    import threading
    import time

    signal.signal(signal.SIGINT, signal.default_int_handler)
    r = dist.get_rank()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randn(32, 8)
    sent = [0.0]
    if r == 0:

        def interrupt() -> None:
            sent[0] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

        threading.Timer(1.5, interrupt).start()
    try:
        for _ in range(10**7):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    except (KeyboardInterrupt, RuntimeError) as e:
        if r == 0:
            late = time.monotonic() - sent[0]
            print(f"rank 0: {type(e).__name__} {late * 1000:.0f} ms after Ctrl-C", flush=True)
            assert late < 0.5, late
        else:
            assert "RemoteError" in str(e) or "AbortedError" in str(e), e
            print(f"rank 1: {str(e).splitlines()[0]}", flush=True)
        return
    raise AssertionError("training ended without the interrupt")


SCENARIOS = {"killed": killed, "ddp_interrupt": ddp_interrupt}


def main() -> None:
    name = sys.argv[1]
    dist.init_process_group("oxccl", timeout=__import__("datetime").timedelta(seconds=60))
    SCENARIOS[name]()
    r = dist.get_rank()
    print(f"PASS {name} rank {r}", flush=True)
    # The group failed: its close lets go at once; no destroy_process_group barrier.
    os._exit(0)


if __name__ == "__main__":
    main()
