#!/usr/bin/env python3
"""What security costs (docs/security.md), side by side in one run (as root for --tls):

1. Communicator creation for 4 local ranks with the job-secret handshake against a build
   without it: the wall time of `oxccl perf all_reduce --ranks 4 -b 8 -e 8 -n 1 -w 0`
   (start 4 processes, create, one 8-byte all_reduce, close), alternating the two binaries.
   --old names a build of a commit before the handshake (e.g. b3b7035).
2. With --tls: net-tcp all_reduce busbw at 64 MiB between two network namespaces, TLS on
   against off (a CA and a certificate made here with openssl).

    python3 bench/security_cost.py --new target/release/oxccl --old /tmp/oxccl-old --launches 9
    python3 bench/security_cost.py --new target/release/oxccl --tls --launches 5
"""
import argparse, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_tcp as nt  # noqa: E402


def creation(exe):
    t0 = time.perf_counter()
    out = subprocess.run([exe, "perf", "all_reduce", "--ranks", "4", "-b", "8", "-e", "8", "-n", "1", "-w", "0"],
                         capture_output=True, text=True, timeout=120)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{exe} failed: {out.stderr}")
    return dt * 1e3


def certs(d):
    """A CA and one certificate under it (both ranks use it) in d, with openssl."""
    def ossl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True)
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=oxccl bench CA", "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=rank",
         "-keyout", f"{d}/rank.key", "-out", f"{d}/rank.csr")
    with open(f"{d}/ext", "w") as f:
        f.write("subjectAltName=DNS:rank\nbasicConstraints=CA:FALSE\n")
    ossl("x509", "-req", "-in", f"{d}/rank.csr", "-CA", f"{d}/ca.pem", "-CAkey", f"{d}/ca.key",
         "-CAcreateserial", "-days", "1", "-out", f"{d}/rank.pem", "-extfile", f"{d}/ext")
    return {"OXCCL_TLS_CERT": f"{d}/rank.pem", "OXCCL_TLS_KEY": f"{d}/rank.key", "OXCCL_TLS_CA": f"{d}/ca.pem"}


def tls_busbw(exe, launches, iters):
    tls = certs(tempfile.mkdtemp(prefix="oxccl-tls-bench-"))
    port = 29800
    on, off = [], []
    nt.setup(None)
    try:
        for k in range(launches):
            for mode in ("off", "on"):
                port += 1
                bw = nt.oxccl(exe, "64M", iters, port, extra=tls if mode == "on" else None)
                (on if mode == "on" else off).append(bw)
                print(f"launch {k}: TLS {mode}: {bw:.3f} GB/s busbw", flush=True)
    finally:
        nt.teardown()
    return statistics.median(off), statistics.median(on)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", default=os.path.join(nt.ROOT, "target/release/oxccl"), help="this build's oxccl")
    ap.add_argument("--old", help="an oxccl built before the handshake (for the creation figure)")
    ap.add_argument("--tls", action="store_true", help="the TLS figure between namespaces (root)")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    if a.old:
        new, old = [], []
        for k in range(a.launches):
            old.append(creation(a.old))
            new.append(creation(a.new))
            print(f"launch {k}: without handshake {old[-1]:.1f} ms, with {new[-1]:.1f} ms", flush=True)
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"creation, 4 local ranks (perf all_reduce 8 B, whole run): without {mo:.1f} ms, with {mn:.1f} ms "
              f"(median of {a.launches}; difference {mn - mo:+.1f} ms, ratio {mn / mo:.3f})")
    if a.tls:
        off, on = tls_busbw(a.new, a.launches, a.iters)
        print(f"net-tcp all_reduce 64 MiB between two namespaces: TLS off {off:.3f} GB/s, on {on:.3f} GB/s busbw "
              f"(median of {a.launches}; on/off {on / off:.3f})")


if __name__ == "__main__":
    main()
