#!/usr/bin/env python3
"""MoE dispatch + combine across four network namespace hosts (one rank each, every host's
link shaped by a token bucket): `oxccl perf ep` over net-tcp against Open MPI's
MPI_Alltoallv over its TCP transport on the same counts (bench/mpi/ep_mpi.c), alternating
in every launch. Open MPI starts its remote daemons through bench/mpi/nsrsh, which runs
them in the namespace of their address. As root; needs iproute2 and mpicc
(libopenmpi-dev). Uses 198.18.0.0/24 in namespaces it makes and removes.

    python3 bench/ep_netns.py --launches 5 --shape 1gbit
"""
import argparse, os, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_tcp as nt  # noqa: E402
import ep_mpi  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTS = 4
SHAPES = [(8, 1024), (128, 4096), (1024, 4096)]


def oxccl(exe, port, tokens, hidden, experts, iters, warm, counts):
    procs = []
    for r in range(HOSTS):
        cmd = [exe, "perf", "ep", "--tokens", str(tokens), "--hidden", str(hidden), "--experts", str(experts),
               "--seed", "1", "-n", iters, "-w", warm, "-d", "float", "--csv"]
        if counts:
            cmd += ["--dispatch", "counts"]
        procs.append(subprocess.Popen(["ip", "netns", "exec", nt.NS[r]] + cmd, env=nt.rank_env(r, HOSTS, port),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800) for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"oxccl failed: {outs}")
    (r,) = ep_mpi.rows(outs[0][0], "ep")
    return float(r[8]), float(r[9]), float(r[10]), r[15]


def mpi(exe, tokens, hidden, experts, iters, warm):
    agent = os.path.join(ROOT, "bench", "mpi", "nsrsh")
    hosts = ",".join(f"198.18.0.{i + 1}" for i in range(HOSTS))
    env = dict(os.environ, OXCCL_NSRSH_PREFIX=nt.TAG)
    cmd = ["ip", "netns", "exec", nt.NS[0], "mpirun", "--allow-run-as-root", "-np", str(HOSTS), "--host", hosts,
           "--mca", "plm_rsh_agent", agent, "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "eth0",
           "--mca", "oob_tcp_if_include", "eth0", "-x", "PATH", exe, str(tokens), str(hidden), "2", str(experts),
           "1.0", "1", iters, warm, "4"]
    out = ep_mpi.run(cmd, env=env)
    (r,) = ep_mpi.rows(out, "ep_mpi")
    return float(r[7]), float(r[8]), float(r[9]), r[11]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--shape", default="1gbit")
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    a = ap.parse_args()
    exe = os.path.join(tempfile.mkdtemp(), "ep_mpi")
    ep_mpi.run(["mpicc", "-O2", "-o", exe, os.path.join(ROOT, "bench", "mpi", "ep_mpi.c"), "-lm"])
    os.chmod(os.path.dirname(exe), 0o755)
    nt.NS = [f"{nt.TAG}-h{i}" for i in range(HOSTS)]
    experts = 8 * HOSTS
    res = {}
    try:
        nt.setup(a.shape)
        for k in range(a.launches):
            line = f"launch {k + 1}:"
            whos = ["mpi", "oxccl", "oxccl counts"]
            for who in (whos if k % 2 == 0 else whos[::-1]):
                for j, (tokens, hidden) in enumerate(SHAPES):
                    iters, warm = ("100", "5") if tokens <= 128 else ("5", "1")
                    small = tokens * 2 * hidden * 4 <= 64 << 10
                    if who == "oxccl counts" and not small:
                        continue
                    if who == "mpi":
                        got = mpi(exe, tokens, hidden, experts, iters, warm)
                    else:
                        got = oxccl(a.oxccl, 29400 + 20 * k + 3 * j + (who == "oxccl counts"), tokens, hidden,
                                    experts, iters, warm, who == "oxccl counts")
                    if got[3] != "0":
                        sys.exit(f"{who}: wrong results at {tokens}x{hidden}")
                    res.setdefault((tokens, hidden, "disp", who), got[1])
                    res.setdefault((tokens, hidden, who), []).append((got[0], got[2]))
                    line += f"  {who} {tokens}x{hidden} {got[0]:.0f} us"
            print(line, flush=True)
    finally:
        nt.teardown()
    ep_mpi.summary(res, SHAPES, f"{HOSTS} namespace hosts, one rank each, links shaped {a.shape}, top-2 of "
                   f"{experts} experts, zipf 1.0, float; median of {a.launches} launches")

if __name__ == "__main__":
    main()
