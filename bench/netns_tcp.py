#!/usr/bin/env python3
"""net-tcp all_reduce between two network namespaces against iperf3 between the same two,
in the same run (as root; needs iproute2 and iperf3). Optionally shapes both hosts' links
with a token bucket (--shape 1gbit). Prints each launch, the medians and the ratio of
all_reduce busbw (2 ranks: the bytes each direction of the link carries per second) to
iperf3's one-direction bandwidth.

    python3 bench/netns_tcp.py --launches 5
    python3 bench/netns_tcp.py --launches 5 --shape 1gbit
    python3 bench/netns_tcp.py --launches 5 --hier      # 2 hosts x 2 ranks: hierarchical vs flat ring
"""
import argparse, json, os, secrets, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = f"oxccl-b-{os.getpid()}"
NS = [f"{TAG}-h0", f"{TAG}-h1"]
BR = f"{TAG}-br"


def sh(*a, ns=None, check=True, **kw):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(a)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def setup(shape):
    sh("ip", "netns", "add", BR)
    sh("ip", "link", "add", "br0", "type", "bridge", ns=BR)
    sh("ip", "link", "set", "br0", "up", ns=BR)
    for i, ns in enumerate(NS):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", BR)
        sh("ip", "addr", "add", f"198.18.0.{i + 1}/24", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        sh("ip", "link", "set", f"p{i}", "master", "br0", ns=BR)
        sh("ip", "link", "set", f"p{i}", "up", ns=BR)
        if shape:
            sh("tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", shape, "burst", "256kb", "latency", "50ms", ns=ns)


def teardown():
    for ns in NS + [BR]:
        sh("ip", "netns", "del", ns, check=False)


def iperf(seconds):
    srv = subprocess.Popen(["ip", "netns", "exec", NS[1], "iperf3", "-s", "-1", "-B", "198.18.0.2"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    out = sh("iperf3", "-c", "198.18.0.2", "-t", str(seconds), "-J", ns=NS[0], timeout=120).stdout
    srv.wait(timeout=30)
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 8e9


# The job secret every rank of this run shares (docs/security.md): listening beyond loopback
# needs one.
SECRET = secrets.token_hex(32)


def rank_env(r, n, port, per_host=1):
    """Rank r of n in the namespaces (per_host ranks a host), on net-tcp, rank 0's store."""
    return dict(os.environ, OXCCL_RANK=str(r), OXCCL_WORLD_SIZE=str(n), OXCCL_STORE=f"tcp://198.18.0.1:{port}",
                OXCCL_HOST_ID=f"bench-h{r // per_host}", OXCCL_SOCKET_IFNAME="eth0", OXCCL_NET="tcp",
                OXCCL_JOB_SECRET=SECRET)


def oxccl(exe, size, iters, port, per_host=1, algo=None, op="all_reduce", extra=None):
    procs = []
    n = 2 * per_host
    for r in range(n):
        env = rank_env(r, n, port, per_host)
        env.update(extra or {})
        if algo:
            env["OXCCL_ALGO"] = f"{op}={algo}"
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS[r // per_host], exe, "perf", op, "-b", size, "-e", size,
                                       "-n", str(iters), "-w", "2", "--csv"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"oxccl failed: {outs}")
    row = [l for l in outs[0][0].splitlines() if l.startswith(op + ",")][0].split(",")
    if row[10] != "0":
        sys.exit("wrong results")
    return float(row[9])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--shape", default=None, help="token-bucket rate on both hosts, e.g. 1gbit")
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    ap.add_argument("--hier", action="store_true", help="2 hosts x 2 ranks: hierarchical vs flat algorithm")
    ap.add_argument("--op", default="all_reduce", choices=["all_reduce", "broadcast", "all_gather"])
    ap.add_argument("--variant", action="append", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                    help="also run oxccl with these settings in every launch (repeatable); BIN=path runs another "
                         "oxccl binary (a build before a change, side by side)")
    a = ap.parse_args()
    if a.hier:
        try:
            setup(a.shape)
            flat = "chain" if a.op == "broadcast" else "ring"
            res = {"hier": [], flat: []}
            for k in range(a.launches):
                for algo in ("hier", flat):
                    port = 29900 + 2 * k + (algo != "hier")
                    res[algo].append(oxccl(a.oxccl, a.size, 5, port, per_host=2, algo=algo, op=a.op))
                print(f"launch {k + 1}: hier busbw {res['hier'][-1]:.3f} GB/s   flat {flat} {res[flat][-1]:.3f} GB/s", flush=True)
            h, r = statistics.median(res["hier"]), statistics.median(res[flat])
            print(f"\n# 2 hosts x 2 ranks, {a.op} {a.size}, median of {a.launches} interleaved launches")
            print(f"# hierarchical {h:.3f} GB/s busbw   flat {flat} {r:.3f} GB/s   ratio {h / r:.2f}")
        finally:
            teardown()
        return
    iters = 3 if a.shape else 10
    try:
        setup(a.shape)
        variants = [("defaults", {})] + [(v, dict(kv.split("=", 1) for kv in v.split(","))) for v in a.variant]
        ip, ox = [], {name: [] for name, _ in variants}
        for k in range(a.launches):
            ip.append(iperf(3))
            line = f"launch {k + 1}: iperf3 {ip[-1]:.3f} GB/s"
            for j, (name, extra) in enumerate(variants):
                env = {key: v for key, v in extra.items() if key != "BIN"}
                exe = extra.get("BIN", a.oxccl)
                ox[name].append(oxccl(exe, a.size, iters, 29800 + len(variants) * k + j, extra=env))
                line += f"   {name} {ox[name][-1]:.3f} GB/s ({ox[name][-1] / ip[-1]:.2f})"
            print(line, flush=True)
        mi = statistics.median(ip)
        print(f"\n# 2 namespaces x 1 rank{', shaped ' + a.shape if a.shape else ''}, median of {a.launches} interleaved launches,"
              f" all_reduce {a.size} busbw against iperf3 {mi:.3f} GB/s")
        for name, _ in variants:
            mo = statistics.median(ox[name])
            mr = statistics.median(o / i for o, i in zip(ox[name], ip))
            print(f"# {name}: busbw {mo:.3f} GB/s   ratio of medians {mo / mi:.2f}   median of per-launch ratios {mr:.2f}")
    finally:
        teardown()


if __name__ == "__main__":
    main()
