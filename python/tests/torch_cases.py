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
            return
    raise AssertionError("the lost rank was never noticed")


SCENARIOS = {"killed": killed}


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
