#!/usr/bin/env python3
"""MoE dispatch + combine: `oxccl perf ep` against Open MPI's MPI_Alltoallv on the same
counts (bench/mpi/ep_mpi.c draws them with the same generator; the dispatched bytes are
compared to prove it), side by side, alternating in every launch. One host: OxCCL on host
staging (`oxccl perf ep --ranks N`), Open MPI on its shared-memory transport (vader) under
mpirun, oversubscribed when ranks outnumber cores. Needs mpicc (libopenmpi-dev).

Each launch also measures the host's copy floor (bench/mpi/copy_floor.c: as many threads as
ranks, up to the cores, memcpy of a buffer of the size each rank dispatches, tokens x top-k x
hidden x 4 bytes): a single-copy exchange copies every row once each way, so no step is
shorter than 2 x ranks x that size at the aggregate rate (the popular experts' ranks receive
more than the others: the real bound is higher). Where both runtimes are near it, the ratio
between them says only that both are bound by memory bandwidth. (B/rank is what rank 0, the
busiest, sends and receives per exchange, on average of the two.)

    python3 bench/ep_mpi.py --ranks 4,8 --launches 5
"""
import argparse, os, re, statistics, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (tokens per rank, hidden): decode-sized (per-peer messages of a few KiB), then larger.
SHAPES = [(8, 1024), (128, 4096), (2048, 4096)]


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def rows(out, prefix):
    """CSV rows starting with `prefix` (a launcher's "[rank] " stripped), as field lists."""
    got = []
    for line in out.splitlines():
        line = re.sub(r"^\[\d+\]\s*", "", line)
        if line.startswith(prefix + ","):
            got.append(line.split(","))
    return got


def mpirun(n):
    cores = os.cpu_count() or 1
    bind = ["--bind-to", "core"] if n <= cores else ["--oversubscribe", "--bind-to", "none"]
    return ["mpirun", "--allow-run-as-root", "-np", str(n), "--mca", "btl", "self,vader", *bind]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="4,8")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--zipf", default="1.0")
    ap.add_argument("--oxccl", default=os.path.join(ROOT, "target", "release", "oxccl"))
    a = ap.parse_args()
    exe = os.path.join(tempfile.mkdtemp(), "ep_mpi")
    run(["mpicc", "-O2", "-o", exe, os.path.join(ROOT, "bench", "mpi", "ep_mpi.c"), "-lm"])
    floor_exe = exe + "_copy_floor"
    run(["cc", "-O2", "-pthread", "-o", floor_exe, os.path.join(ROOT, "bench", "mpi", "copy_floor.c")])
    for n in [int(x) for x in a.ranks.split(",")]:
        experts = 8 * n
        res = {}  # (tokens, hidden, who) -> [(step_us, algbw)]
        for k in range(a.launches):
            order = ["mpi", "oxccl", "oxccl counts"] if k % 2 == 0 else ["oxccl counts", "oxccl", "mpi"]
            line = f"{n} ranks, launch {k + 1}:"
            for who in order:
                for tokens, hidden in SHAPES:
                    iters, warm = ("200", "10") if tokens <= 128 else ("10", "2")
                    small = tokens * a.topk * hidden * 4 <= 64 << 10  # oxccl's auto: the dynamic dispatch
                    if who == "oxccl counts" and not small:
                        continue
                    if who == "mpi":
                        out = run(mpirun(n) + [exe, str(tokens), str(hidden), str(a.topk), str(experts), a.zipf, "1",
                                              iters, warm, "4"])
                        (r,) = rows(out, "ep_mpi")
                        step, disp, bw, wrong = float(r[7]), float(r[8]), float(r[9]), r[11]
                    else:
                        out = run([a.oxccl, "perf", "ep", "--ranks", str(n), "--tokens", str(tokens), "--hidden",
                                   str(hidden), "--topk", str(a.topk), "--experts", str(experts), "--zipf", a.zipf,
                                   "--seed", "1", "-n", iters, "-w", warm, "-d", "float", "--csv"]
                                  + (["--dispatch", "counts"] if who == "oxccl counts" else []))
                        (r,) = rows(out, "ep")
                        step, disp, bw, wrong = float(r[8]), float(r[9]), float(r[10]), r[15]
                    if wrong != "0":
                        sys.exit(f"{who}: wrong results at {tokens}x{hidden}")
                    res.setdefault((tokens, hidden, "disp", who), disp)
                    if who == "mpi":
                        threads = min(n, os.cpu_count() or 1)
                        rows_bytes = tokens * a.topk * hidden * 4  # what one rank dispatches
                        (f,) = rows(run([floor_exe, str(threads), str(max(rows_bytes, 4096)), "10"]), "copy_floor")
                        # Every rank's rows copied once each way (dispatch and combine), at the
                        # aggregate rate: a bound that even a perfectly balanced exchange meets.
                        res.setdefault((tokens, hidden, "floor"), []).append(2 * n * rows_bytes / float(f[3]) / 1e3)
                    res.setdefault((tokens, hidden, who), []).append((step, bw))
                    line += f"  {who} {tokens}x{hidden} {step:.0f} us"
            print(line, flush=True)
        summary(res, SHAPES, f"{n} ranks on one host, top-{a.topk} of {experts} experts, zipf {a.zipf}, float; "
                f"median of {a.launches} launches")


def summary(res, shapes, title):
    """Prints the medians of `res` ((tokens, hidden, who) -> [(step_us, GB/s)], and
    (tokens, hidden, "disp", who) -> dispatched bytes) and OxCCL's bandwidth over MPI's;
    exits if the two did not dispatch the same bytes (they drew different counts)."""
    print(f"\n# {title}")
    print(f"# {'tokens x hidden':>16} {'B/rank':>10} {'MPI step':>10} {'OxCCL step':>11} {'MPI GB/s':>9} "
          f"{'OxCCL GB/s':>10} {'ratio':>6} {'floor':>9} {'MPI/floor':>9} {'OxCCL/floor':>11}"
          "   (OxCCL with a separate counts exchange)")
    for tokens, hidden in shapes:
        dm, do = res[(tokens, hidden, "disp", "mpi")], res[(tokens, hidden, "disp", "oxccl")]
        if abs(dm - do) > 0.5:
            sys.exit(f"the two drew different counts at {tokens}x{hidden}: {dm} vs {do} bytes")
        med = {w: (statistics.median(x[0] for x in res[(tokens, hidden, w)]),
                   statistics.median(x[1] for x in res[(tokens, hidden, w)]))
               for w in ("mpi", "oxccl", "oxccl counts") if (tokens, hidden, w) in res}
        (ms, mb), (os_, ob) = med["mpi"], med["oxccl"]
        alt = f"   ({med['oxccl counts'][0]:.0f}us, {med['oxccl counts'][1] / mb:.2f}x)" if "oxccl counts" in med else ""
        floor = statistics.median(res[(tokens, hidden, "floor")]) if (tokens, hidden, "floor") in res else None
        fl = f" {floor:>7.0f}us {ms / floor:>8.2f}x {os_ / floor:>10.2f}x" if floor else ""
        print(f"# {f'{tokens} x {hidden}':>16} {dm:>10.0f} {ms:>8.0f}us {os_:>9.0f}us {mb:>9.3f} {ob:>10.3f} "
              f"{ob / mb:>5.2f}x{fl}{alt}")

if __name__ == "__main__":
    main()
