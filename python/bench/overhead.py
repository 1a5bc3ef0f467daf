"""What Python adds to a call: an 8-byte all_reduce from Python (numpy, blocking) against
`oxccl perf` in Rust, 2 ranks, alternated launches, side by side.

    python python/bench/overhead.py --launches 5 [--oxccl target/release/oxccl]

The `oxccl` command: --oxccl, else OXCCL_BIN, else on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ITERS = 200_000


def rank_main() -> None:
    import numpy as np

    import oxccl

    with oxccl.Communicator.from_env() as c:
        x = np.zeros(2, dtype=np.float32)
        for _ in range(5000):
            c.all_reduce(x)
        c.barrier()
        t0 = time.perf_counter()
        for _ in range(ITERS):
            c.all_reduce(x)
        dt = (time.perf_counter() - t0) / ITERS
        if c.rank == 0:
            print(f"RESULT {dt * 1e6:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launches", type=int, default=5)
    p.add_argument("--oxccl", default=os.environ.get("OXCCL_BIN") or shutil.which("oxccl"))
    args = p.parse_args()
    if not args.oxccl:
        sys.exit("no oxccl command: pass --oxccl (cargo build --release -p oxccl-bench)")
    py, rust = [], []
    for _ in range(args.launches):
        out = subprocess.run(
            [args.oxccl, "launch", "-n", "2", "--", sys.executable, __file__, "--rank-main"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        line = next((x for x in out.stdout.splitlines() if "RESULT " in x), None)
        if line is None:
            sys.exit(f"the Python launch failed:\n{out.stdout}\n{out.stderr}")
        py.append(float(line.split("RESULT ")[1]))
        out = subprocess.run(
            [
                args.oxccl,
                "perf",
                "all_reduce",
                "-b",
                "8",
                "-e",
                "8",
                "--ranks",
                "2",
                "-n",
                str(ITERS),
                "-w",
                "5000",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        row = next((x.split() for x in out.stdout.splitlines() if x.split()[1:2] == ["8"]), None)
        if row is None:
            sys.exit(f"oxccl perf failed:\n{out.stdout}\n{out.stderr}")
        rust.append(float(row[6]))
    a, b = statistics.median(py), statistics.median(rust)
    print(f"8-byte all_reduce, 2 ranks, median of {args.launches} alternated launches:")
    print(f"  Python (numpy, blocking): {a:.2f} us   runs {sorted(py)}")
    print(f"  Rust (oxccl perf):        {b:.2f} us   runs {sorted(rust)}")
    print(f"  Python adds {a - b:.2f} us per call")


if __name__ == "__main__":
    if "--rank-main" in sys.argv:
        rank_main()
    else:
        main()
