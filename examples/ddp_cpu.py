"""DistributedDataParallel training on CPU over OxCCL (or any torch backend), under torchrun:

    torchrun --nproc-per-node 2 examples/ddp_cpu.py                 # over oxccl
    torchrun --nproc-per-node 2 examples/ddp_cpu.py --backend gloo  # the same over gloo

Every rank trains the same small model on its own shard of a fixed synthetic dataset; DDP
averages the gradients with all_reduce. ``--save FILE`` writes rank 0's final parameters
(the Python test compares oxccl's with gloo's); ``--steps`` and ``--time`` report the
step time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import oxccl.torch  # noqa: F401  (registers the "oxccl" backend)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="oxccl", help="torch.distributed backend (default oxccl)")
    p.add_argument("--steps", type=int, default=50, help="training steps")
    p.add_argument("--hidden", type=int, default=256, help="hidden width of the model")
    p.add_argument("--save", help="write rank 0's final parameters here (torch.save)")
    args = p.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts it)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, 1),
    )
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(64 * world, 32, generator=gen)
    y = x.sum(dim=1, keepdim=True).sin()
    shard = slice(rank * 64, (rank + 1) * 64)

    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x[shard]), y[shard])
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    times.sort()
    if rank == 0:
        print(
            f"{args.backend}: {world} ranks, {args.steps} steps, loss {loss.item():.6f}, "
            f"median step {times[len(times) // 2] * 1e3:.2f} ms"
        )
        if args.save:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.save)
    dist.barrier()  # every rank done before any tears its links down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
