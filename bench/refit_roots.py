#!/usr/bin/env python3
"""Multi-source weight refit over four network namespaces (one rank each, net-tcp, every
host's link shaped by a token bucket): a broadcast from two roots (`oxccl perf broadcast
--roots 0,1`) against the same broadcast from one root (`-r 0`), alternating in every
launch; then a gradient all_reduce alone against the same all_reduce while a two-root
weight_refit broadcast runs on another communicator of the same processes (priority on, the
default OXCCL_CLASS_SHARE, and off, OXCCL_CLASS_SHARE=1). As root; needs iproute2. Uses
198.18.0.0/24 in namespaces it makes and removes.

    python3 bench/refit_roots.py --launches 5 --size 1G --shape 1gbit
"""
import argparse, os, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_tcp as nt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = 4


def perf(exe, port, args, env_extra=None):
    """Runs `oxccl perf ARGS --csv` on the four hosts; rank 0's CSV row (fields)."""
    procs = []
    for r in range(HOSTS):
        env = nt.rank_env(r, HOSTS, port)
        env.update(env_extra or {})
        procs.append(subprocess.Popen(["ip", "netns", "exec", nt.NS[r], exe, "perf"] + args + ["--csv"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"oxccl failed: {outs}")
    row = [l for l in outs[0][0].splitlines() if l.startswith(args[0] + ",")][0].split(",")
    if row[10] != "0":
        sys.exit(f"wrong results: {row}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--size", default="1G", help="the refit's bytes")
    ap.add_argument("--grad", default="16M", help="the gradient all_reduce's bytes")
    ap.add_argument("--grad-iters", type=int, default=20)
    ap.add_argument("--shape", default="1gbit")
    ap.add_argument("--skip-grad", action="store_true", help="only the refit against one root")
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    a = ap.parse_args()
    nt.NS = [f"{nt.TAG}-h{i}" for i in range(HOSTS)]
    bc = ["broadcast", "-b", a.size, "-e", a.size, "-n", "1", "-w", "1", "--warmup_ms", "0"]
    refit = [("1 root", bc + ["-r", "0"], None), ("2 roots", bc + ["--roots", "0,1"], None)]
    ar = ["all_reduce", "-b", a.grad, "-e", a.grad, "-n", str(a.grad_iters), "-w", "2", "--class", "gradient"]
    load = ["--load", f"weight_refit:broadcast:{a.size}:0,1"]
    grad = [("all_reduce alone", ar, None), ("with refit, priority on", ar + load, None),
            ("with refit, priority off", ar + load, {"OXCCL_CLASS_SHARE": "1"})]
    runs = refit + ([] if a.skip_grad else grad)
    res = {name: [] for name, _, _ in runs}
    try:
        nt.setup(a.shape)
        for k in range(a.launches):
            line = f"launch {k + 1}:"
            for j, (name, args, env) in enumerate(runs):
                row = perf(a.oxccl, 29600 + len(runs) * k + j, args, env)
                res[name].append(float(row[7]) / 1e6)  # seconds per operation
                line += f"   {name} {res[name][-1]:.3f} s"
            print(line, flush=True)
    finally:
        nt.teardown()
    med = {name: statistics.median(v) for name, v in res.items()}
    print(f"\n# {HOSTS} namespace hosts, one rank each, links shaped {a.shape}; median of {a.launches} launches")
    print(f"# broadcast of {a.size}: 1 root {med['1 root']:.3f} s, 2 roots {med['2 roots']:.3f} s: "
          f"{med['1 root'] / med['2 roots']:.2f}x faster")
    if not a.skip_grad:
        alone = med["all_reduce alone"]
        print(f"# gradient all_reduce of {a.grad}: alone {alone * 1e3:.1f} ms; while a 2-root refit of {a.size} runs: "
              f"priority on {med['with refit, priority on'] * 1e3:.1f} ms "
              f"({med['with refit, priority on'] / alone:.2f}x), "
              f"priority off {med['with refit, priority off'] * 1e3:.1f} ms "
              f"({med['with refit, priority off'] / alone:.2f}x)")


if __name__ == "__main__":
    main()
