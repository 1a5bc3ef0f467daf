#!/usr/bin/env python3
"""OxCCL all_reduce vs Open MPI's MPI_Allreduce, side by side, interleaved launches.

Both run under the same `mpirun` (shared-memory transport, ranks bound to cores; with more
ranks than cores, oversubscribed), float sum, out of place. For each launch round it runs
Open MPI, then OxCCL; it prints each round and the median per size and the OxCCL/Open MPI
ratio (busbw ratio > 1 and time ratio < 1 favour OxCCL).

    python3 bench/compare_mpi.py --ranks 2 --sizes 8,16M,128M --launches 5
"""
import argparse, os, statistics, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def size(s):
    mul = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mul[s[-1].upper()] if s[-1].upper() in mul else int(s)


def mpirun(n):
    cores = os.cpu_count() or 1
    bind = ["--bind-to", "core"] if n <= cores else ["--oversubscribe", "--bind-to", "none"]
    return ["mpirun", "--allow-run-as-root", "-np", str(n), "--mca", "btl", "self,vader", *bind]


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes", default="8,16M,128M")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--iters", type=int, default=0, help="0: 2000 below 64 KiB, 20 above")
    ap.add_argument("--oxccl", action="append", default=[],
                    help="an oxccl binary, or NAME=PATH; repeatable (default: target/release/oxccl)")
    a = ap.parse_args()
    builds = []
    for spec in a.oxccl or [os.path.join(ROOT, "target", "release", "oxccl")]:
        name, _, path = spec.rpartition("=")
        builds.append((name or "oxccl", path))
    # The same warm-up for every build: no extra timed warm-up where a build has one.
    extra = {name: (["--warmup_ms", "0"] if "warmup_ms" in run([path, "perf", "--help"]) else [])
             for name, path in builds}
    sizes = [size(s) for s in a.sizes.split(",")]
    tmp = tempfile.mkdtemp()
    exe = os.path.join(tmp, "allreduce_mpi")
    run(["mpicc", "-O2", "-o", exe, os.path.join(ROOT, "bench", "mpi", "allreduce_mpi.c")])
    res = {(n, s): [] for s in sizes for n in ["mpi"] + [b[0] for b in builds]}
    for launch in range(a.launches):
        for s in sizes:
            it = a.iters or (2000 if s < 65536 else 20)
            warm = max(5, it // 10)
            out = run([*mpirun(a.ranks), exe, str(s), str(it), str(warm)])
            b, t, bw = out.split()[:3]
            res[("mpi", s)].append((float(t), float(bw)))
            line = f"launch {launch + 1}: {s:>10} B  open-mpi {res[('mpi', s)][-1][0]:10.2f} us {res[('mpi', s)][-1][1]:7.3f} GB/s"
            for name, path in builds:
                env = dict(os.environ, OXCCL_STORE=f"tcp://127.0.0.1:{29600 + launch}")
                out = run([*mpirun(a.ranks), "-x", "OXCCL_STORE", path, "perf", "all_reduce", "-b", str(s), "-e", str(s),
                           "-n", str(it), "-w", str(warm), "-c", "1", "--csv", *extra[name]], env=env)
                row = [l for l in out.splitlines() if l.startswith("all_reduce,")][0].split(",")
                if row[10] != "0":
                    sys.exit(f"{name} reported {row[10]} wrong elements")
                res[(name, s)].append((float(row[7]), float(row[9])))
                line += f"   {name} {res[(name, s)][-1][0]:10.2f} us {res[(name, s)][-1][1]:7.3f} GB/s"
            print(line, flush=True)
    print(f"\n# all_reduce float sum, {a.ranks} ranks on {os.cpu_count()} cores, median of {a.launches} interleaved launches")
    for name, _ in builds:
        print(f"# {name}: {'bytes':>10} {'mpi us':>10} {'oxccl us':>10} {'time ratio':>10} {'mpi busbw':>10} {'oxccl busbw':>11} {'busbw ratio':>11}")
        for s in sizes:
            mt = statistics.median(x[0] for x in res[("mpi", s)])
            ot = statistics.median(x[0] for x in res[(name, s)])
            mb = statistics.median(x[1] for x in res[("mpi", s)])
            ob = statistics.median(x[1] for x in res[(name, s)])
            print(f"  {' ' * len(name)} {s:>10} {mt:>10.2f} {ot:>10.2f} {ot / mt:>10.2f} {mb:>10.3f} {ob:>11.3f} {ob / mb if mb else 0:>11.2f}")


if __name__ == "__main__":
    main()
