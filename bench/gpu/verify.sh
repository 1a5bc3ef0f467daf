#!/usr/bin/env bash
# The GPU verification of OxCCL's GPU data path (issue 22), in one command per machine.
#
#   bench/gpu/verify.sh build   here, no GPU needed: builds with the cuda feature and packs
#                               what the GPU host runs into gpu-carry/ (git-ignored)
#   bench/gpu/verify.sh run     on the GPU host, in the repository root, with gpu-carry/ there:
#                               runs every GPU test and prints every figure (docs/gpu.md)
#
# With the workplace's device tool: build here, then
#   run(command="bench/gpu/verify.sh run", carry=["gpu-carry"], timeout_s=540)
# The run needs no Rust toolchain there: CUDA's driver, an NVRTC (12 or 13, found under
# /usr/local/cuda or a Python package) and nvidia-smi.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=gpu-carry

say() { printf 'verify: %s\n' "$*"; }

build() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >>.git/info/exclude
  rm -rf "$CARRY" && mkdir -p "$CARRY"
  say "building oxccl (release, cuda)"
  cargo build -q --release --features cuda -p oxccl-bench
  exe() { # the test executable cargo built for "$@"
    cargo test -q --release --no-run --message-format=json "$@" 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    try: m = json.loads(l)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["executable"])' | tail -1
  }
  say "building the GPU tests"
  local unit multi streams
  unit=$(exe --features cuda,test-util -p oxccl-transports --lib)
  multi=$(exe --features cuda -p oxccl-tests --test multiproc)
  streams=$(exe --features cuda -p oxccl-tests --test gpu_stream)
  [ -x "$unit" ] && [ -x "$multi" ] && [ -x "$streams" ] || { say "could not find the test executables"; exit 1; }
  cp "$CARGO_TARGET_DIR/release/oxccl" "$CARRY/oxccl"
  cp "$unit" "$CARRY/transports-tests"
  cp "$multi" "$CARRY/multiproc-tests"
  cp "$streams" "$CARRY/stream-tests"
  cp "$CARGO_TARGET_DIR/release/rank_worker" "$CARRY/rank_worker"
  # The multi-process tests start the worker by the path they were built with.
  echo "$CARGO_TARGET_DIR/release/rank_worker" >"$CARRY/rank_worker.path"
  strip "$CARRY"/oxccl "$CARRY"/transports-tests "$CARRY"/multiproc-tests "$CARRY"/stream-tests "$CARRY"/rank_worker
  du -sh "$CARRY"
  say "packed $CARRY/: bench/gpu/verify.sh run there (with carry=[\"$CARRY\"])"
}

run() {
  [ -d "$CARRY" ] || { say "no $CARRY/: run 'bench/gpu/verify.sh build' on the build host first"; exit 1; }
  local out="${OUT:-/tmp/oxccl-verify}"
  mkdir -p "$out"
  exec > >(tee "$out/verify.log") 2>&1
  nvidia-smi -L || say "nvidia-smi failed"
  # NVRTC: cudarc looks for libnvrtc.so (unversioned) first; give it the one this host has.
  local nvrtc
  nvrtc=$(find /usr/local/cuda*/lib64 /usr/lib/x86_64-linux-gnu /opt /usr/local/lib -name 'libnvrtc.so.1[23]*' 2>/dev/null | grep -v alt | sort | tail -1 || true)
  if [ -z "$nvrtc" ]; then
    nvrtc=$(python3 -c 'import glob,site; print(sorted(glob.glob(site.getsitepackages()[0]+"/nvidia/**/libnvrtc.so.1[23]*", recursive=True))[-1])' 2>/dev/null || true)
  fi
  if [ -n "$nvrtc" ]; then
    mkdir -p /tmp/oxccl-nvrtc
    ln -sf "$nvrtc" /tmp/oxccl-nvrtc/libnvrtc.so
    ln -sf "$nvrtc" /tmp/oxccl-nvrtc/libnvrtc.so.12
    export LD_LIBRARY_PATH="/tmp/oxccl-nvrtc:$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"
    say "NVRTC: $nvrtc"
  else
    say "no NVRTC found: the reduction kernels cannot compile"
  fi
  local worker
  worker=$(cat "$CARRY/rank_worker.path")
  mkdir -p "$(dirname "$worker")" && cp "$CARRY/rank_worker" "$worker"
  local fail=0
  step() { say "== $1"; shift; if "$@"; then say "ok"; else say "FAILED: $*"; fail=1; fi; }
  export OXCCL_TEST_REQUIRE=gpu,nvrtc
  step "GPU kernels against the host's, staged links with the copy engines, stream holds" \
    "$CARRY/transports-tests" cuda --test-threads=1 --nocapture
  step "copy limits (cuMemcpyDtoD, pinned D2H and H2D, 256 MiB)" \
    "$CARRY/transports-tests" gpu_copy_limits --ignored --nocapture
  step "calls on a caller's stream, ordered with its own work on a real GPU; the simulated streams' suite" \
    "$CARRY/stream-tests" --test-threads=1 --nocapture
  step "conformance on GPU buffers: 2 and 4 ranks sharing the GPU, p2p and staged; the simulated GPU's suite" \
    "$CARRY/multiproc-tests" gpu_ --test-threads=1 --nocapture
  step "p2p link (CUDA IPC): sendrecv 256 MiB between 2 ranks on the GPU (compare with cuMemcpyDtoD above)" \
    "$CARRY/oxccl" perf sendrecv --ranks 2 --memory gpu -b 256M -e 256M -n 10 -w 3
  step "host staging of GPU data: the same with OXCCL_P2P=off (compare with the staging limit above)" \
    env OXCCL_P2P=off "$CARRY/oxccl" perf sendrecv --ranks 2 --memory gpu -b 256M -e 256M -n 10 -w 3
  step "all_reduce on GPU buffers, 4 ranks on one GPU (p2p), 8 B to 1 GiB" \
    "$CARRY/oxccl" perf all_reduce --ranks 4 --memory gpu -b 8 -e 1G -f 4 -n 10 -w 3
  step "all_reduce on GPU buffers, 4 ranks on one GPU, staged through host memory, 8 B to 1 GiB" \
    env OXCCL_P2P=off "$CARRY/oxccl" perf all_reduce --ranks 4 --memory gpu -b 8 -e 1G -f 4 -n 10 -w 3
  say "NCCL's all_reduce_perf side by side: not run: NCCL refuses several ranks on one GPU (\"Duplicate GPU detected\")"
  [ "$fail" = 0 ] && say "every step passed" || say "some steps FAILED (above)"
  return "$fail"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
