"""all_reduce through torch.distributed: oxccl against gloo, side by side in one run.

    python python/bench/torch_vs_gloo.py --ranks 2 --launches 5

Each launch runs torchrun with --ranks processes; every rank measures float32 all_reduce at
8 B (time per call) and 1 MiB, 16 MiB, 128 MiB (bus bandwidth, as nccl-tests: 2(n-1)/n x
bytes / time) for oxccl, then gloo, in the same processes. The medians over the launches are
printed, with oxccl's ratio to gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

SIZES = [8, 1 << 20, 16 << 20, 128 << 20]


def rank_main() -> None:
    import torch
    import torch.distributed as dist

    import oxccl.torch  # noqa: F401

    dist.init_process_group("gloo")
    ox = dist.new_group(backend="oxccl")
    gl = dist.new_group(backend="gloo")
    world = dist.get_world_size()
    out = {}
    for name, g in (("oxccl", ox), ("gloo", gl)):
        for size in SIZES:
            t = torch.ones(size // 4)
            iters = 2000 if size <= 1024 else max(3, int(2e9 // (size * 8)))
            for _ in range(max(2, iters // 10)):
                dist.all_reduce(t, group=g)
            dist.barrier(group=g)
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(t, group=g)
            dt = (time.perf_counter() - t0) / iters
            busbw = 2 * (world - 1) / world * size / dt / 1e9
            out[f"{name} {size}"] = (dt * 1e6, busbw)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--launches", type=int, default=5)
    args = p.parse_args()
    runs = []
    for _ in range(args.launches):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(args.ranks),
            "--master-port",
            str(free_port()),
            __file__,
            "--rank-main",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"a launch failed:\n{out.stdout}\n{out.stderr}")
        runs.append(json.loads(line[7:]))
    print(f"all_reduce float32, {args.ranks} ranks on one host, median of {args.launches} launches")
    print(f"{'size':>10} {'oxccl':>16} {'gloo':>16} {'oxccl/gloo':>11}")
    for size in SIZES:
        ox = [r[f"oxccl {size}"] for r in runs]
        gl = [r[f"gloo {size}"] for r in runs]
        if size <= 1024:
            a, b = statistics.median(x[0] for x in ox), statistics.median(x[0] for x in gl)
            print(f"{size:>10} {a:>13.1f} us {b:>13.1f} us {a / b:>10.3f}x (time)")
        else:
            a, b = statistics.median(x[1] for x in ox), statistics.median(x[1] for x in gl)
            print(f"{size:>10} {a:>11.2f} GB/s {b:>11.2f} GB/s {a / b:>10.2f}x (busbw)")


if __name__ == "__main__":
    if "--rank-main" in sys.argv:
        rank_main()
    else:
        main()
