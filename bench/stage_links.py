#!/usr/bin/env python3
"""Pipeline-stage links under load: `oxccl perf sendrecv` latency percentiles between two
network namespaces (one rank each, net-tcp, both links shaped by a token bucket), alone and
while a weight_refit broadcast runs on another communicator of the same processes, with
class priority on (the default OXCCL_CLASS_SHARE) and off (OXCCL_CLASS_SHARE=1). The three
runs alternate in every launch. As root; needs iproute2. Uses 198.18.0.0/24 in namespaces it
makes and removes.

    python3 bench/stage_links.py --launches 5 --shape 1gbit
"""
import argparse, os, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_tcp as nt  # noqa: E402  (its namespaces: setup, teardown, sh)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sendrecv(exe, sizes, iters, port, load=None, share=None, queue=None):
    procs = []
    for r in range(2):
        env = nt.rank_env(r, 2, port)
        if share is not None:
            env["OXCCL_CLASS_SHARE"] = share
        if queue is not None:
            env["OXCCL_TCP_LOWER_CLASS_QUEUE"] = queue
        cmd = [exe, "perf", "sendrecv", "-b", sizes[0], "-e", sizes[-1], "-f", "16", "-n", str(iters), "-w", "5",
               "--class", "pipeline_stage", "--csv"]
        if load:
            cmd += ["--load", load]
        procs.append(subprocess.Popen(["ip", "netns", "exec", nt.NS[r]] + cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"oxccl failed: {outs}")
    rows = {}
    for line in outs[0][0].splitlines():
        f = line.split(",")
        if f[0] == "sendrecv":
            if f[10] != "0":
                sys.exit("wrong results")
            rows[int(f[2])] = (float(f[11]), float(f[12]), float(f[13]))  # p50, p99, p99.9 (us)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--shape", default="1gbit")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--load", default="weight_refit:broadcast:16M")
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    ap.add_argument("--queues", default="", help="also run priority on with these OXCCL_TCP_LOWER_CLASS_QUEUE values")
    a = ap.parse_args()
    sizes = ["64K", "1M"]
    runs = [("alone", None, None, None), ("load, priority on", a.load, None, None),
            ("load, priority off", a.load, "1", None)]
    runs += [(f"load, priority on, queue {q}", a.load, None, q) for q in a.queues.split(",") if q]
    res = {name: [] for name, _, _, _ in runs}
    try:
        nt.setup(a.shape)
        for k in range(a.launches):
            line = f"launch {k + 1}:"
            for j, (name, load, share, queue) in enumerate(runs):
                rows = sendrecv(a.oxccl, sizes, a.iters, 29700 + len(runs) * k + j, load, share, queue)
                res[name].append(rows)
                line += f"   {name}: " + ", ".join(f"{s >> 10}K p99 {v[1]:.0f} us" for s, v in sorted(rows.items()))
            print(line, flush=True)
    finally:
        nt.teardown()
    print(f"\n# sendrecv between 2 namespaces, links shaped {a.shape}, class pipeline_stage; load {a.load};"
          f" median of {a.launches} launches of {a.iters} iterations")
    for size in sorted(res["alone"][0]):
        med = {n: [statistics.median(r[size][q] for r in res[n]) for q in range(3)] for n in res}
        alone = med["alone"][1]
        print(f"# {size >> 10} KiB: p50/p99/p99.9 us: " + "; ".join(
            f"{n} {m[0]:.0f}/{m[1]:.0f}/{m[2]:.0f}" for n, m in med.items()))
        print(f"#   p99 with the load against alone: priority on {med['load, priority on'][1] / alone:.2f}x,"
              f" priority off {med['load, priority off'][1] / alone:.2f}x" + "".join(
                  f", {n.split(', ')[-1]} {m[1] / alone:.2f}x" for n, m in med.items() if "queue" in n))


if __name__ == "__main__":
    main()
