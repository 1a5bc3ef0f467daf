#!/usr/bin/env python3
"""Where one algorithm overtakes the other: all_reduce recursive doubling vs ring, broadcast
tree vs chain. Runs `oxccl perf` with OXCCL_ALGO forcing each algorithm, interleaved, several
launches, and prints the median time per size and which is faster.

    python3 bench/crossover.py --ranks 2 --launches 3
"""
import argparse, os, statistics, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def perf(exe, op, algo, ranks, lo, hi):
    env = dict(os.environ, OXCCL_ALGO=f"{op}={algo}")
    out = subprocess.run([exe, "perf", op, "-b", str(lo), "-e", str(hi), "-f", "2", "-n", "200", "-w", "20",
                          "--ranks", str(ranks), "--csv"], capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    rows = [l.split("] ", 1)[-1].split(",") for l in out.splitlines() if f"{op}," in l]
    return {int(r[2]): float(r[7]) for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    a = ap.parse_args()
    for op, algos, lo, hi in [("all_reduce", ("rd", "ring"), 8, 1 << 20), ("broadcast", ("tree", "chain"), 8, 1 << 20)]:
        res = {x: {} for x in algos}
        for _ in range(a.launches):
            for x in algos:
                for size, t in perf(a.oxccl, op, x, a.ranks, lo, hi).items():
                    res[x].setdefault(size, []).append(t)
        print(f"# {op}, {a.ranks} ranks, median time (us) of {a.launches} launches")
        print(f"# {'bytes':>9} {algos[0]:>9} {algos[1]:>9}  faster")
        for size in sorted(res[algos[0]]):
            t0, t1 = statistics.median(res[algos[0]][size]), statistics.median(res[algos[1]][size])
            print(f"  {size:>9} {t0:>9.2f} {t1:>9.2f}  {algos[0] if t0 < t1 else algos[1]}")


if __name__ == "__main__":
    main()
