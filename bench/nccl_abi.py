#!/usr/bin/env python3
"""The NCCL C ABI (liboxccl_nccl's functions) against OxCCL's Rust API, side by side.

Each launch runs `oxccl perf all_reduce --api both -N CYCLES`: on one communicator (the one
ncclCommInitRank made), every size is measured through the Rust API and through the C ABI in
turn, the order alternating by cycle. The script prints each launch's medians and, per
size, the median over launches and the ABI/Rust time ratio (1.00: the ABI adds nothing).

    python3 bench/nccl_abi.py --oxccl target/release/oxccl --ranks 2 --launches 5
"""
import argparse, statistics, subprocess, sys

# Iterations per row by size: small sizes need many to measure tenths of a microsecond.
SIZES = [(8, 20000), (16 << 20, 20)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--oxccl", default="target/release/oxccl", help="the oxccl command (a release build)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--launches", type=int, default=5)
    p.add_argument("--cycles", type=int, default=10)
    a = p.parse_args()
    for size, iters in SIZES:
        per = []
        for i in range(a.launches):
            cmd = [a.oxccl, "perf", "all_reduce", "--ranks", str(a.ranks), "-b", str(size), "-e", str(size),
                   "-n", str(iters), "--api", "both", "-N", str(a.cycles), "--csv"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                                 env={**__import__("os").environ, "OXCCL_NCCL_ADDR": "127.0.0.1"})
            if out.returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
            t = {"rust": [], "nccl": []}
            for line in out.stdout.splitlines():
                f = line.split("] ", 1)[-1].split(",")
                if len(f) > 11 and f[0] == "all_reduce":
                    t[f[11]].append(float(f[7]))
            r, n = statistics.median(t["rust"]), statistics.median(t["nccl"])
            per.append((r, n))
            print(f"{size:>9} B  launch {i + 1}: Rust {r:10.3f} us   C ABI {n:10.3f} us   ratio {n / r:.3f}")
        r = statistics.median(x[0] for x in per)
        n = statistics.median(x[1] for x in per)
        ratio = statistics.median(x[1] / x[0] for x in per)
        print(f"{size:>9} B  median of {a.launches}: Rust {r:.3f} us, C ABI {n:.3f} us, ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
