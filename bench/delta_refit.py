#!/usr/bin/env python3
"""Delta refit against a full broadcast between two network namespaces (one rank each,
net-tcp, links shaped by a token bucket): `oxccl perf broadcast --delta F` for each fraction
of changed elements, and the plain broadcast, alternating within every launch. As root;
needs iproute2. Uses 198.18.0.0/24 in namespaces it makes and removes.

    python3 bench/delta_refit.py --launches 3 --size 256M --shape 1gbit
"""
import argparse, os, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_tcp as nt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def broadcast(exe, size, iters, port, delta):
    procs = []
    for r in range(2):
        env = nt.rank_env(r, 2, port)
        cmd = [exe, "perf", "broadcast", "-b", size, "-e", size, "-n", str(iters), "-w", "1", "--csv"]
        if delta is not None:
            cmd += ["--delta", delta]
        procs.append(subprocess.Popen(["ip", "netns", "exec", nt.NS[r]] + cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"oxccl failed: {outs}")
    row = [l for l in outs[0][0].splitlines() if l.startswith("broadcast,")][0].split(",")
    if row[10] != "0":
        sys.exit("wrong results")
    return float(row[7]) / 1e6  # seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--shape", default="1gbit")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    a = ap.parse_args()
    runs = [("full", None), ("1%", "0.01"), ("10%", "0.1"), ("50%", "0.5")]
    res = {n: [] for n, _ in runs}
    try:
        nt.setup(a.shape)
        for k in range(a.launches):
            line = f"launch {k + 1}:"
            for j, (name, d) in enumerate(runs):
                res[name].append(broadcast(a.oxccl, a.size, a.iters, 29500 + len(runs) * k + j, d))
                line += f"   {name} {res[name][-1]:.3f} s"
            print(line, flush=True)
    finally:
        nt.teardown()
    full = statistics.median(res["full"])
    print(f"\n# broadcast of {a.size} between 2 namespaces shaped {a.shape}, median of {a.launches} launches")
    for name, _ in runs:
        m = statistics.median(res[name])
        print(f"# {name}: {m:.3f} s ({full / m:.1f}x faster than full)" if name != "full" else f"# full: {m:.3f} s")


if __name__ == "__main__":
    main()
