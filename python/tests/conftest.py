"""Starting real multi-process jobs for the tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers.py"

Result = Tuple[Optional[int], str, str]

# The variables each launcher sets: rank, world size, local rank, local world size.
LAUNCHERS: Dict[str, Tuple[str, str, str, str]] = {
    "oxccl": ("OXCCL_RANK", "OXCCL_WORLD_SIZE", "OXCCL_LOCAL_RANK", "OXCCL_LOCAL_WORLD_SIZE"),
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    n: int,
    scenario: str,
    env: Optional[Dict[str, str]] = None,
    timeout: float = 120.0,
    signals: Sequence[Tuple[float, int, int]] = (),
    launcher: str = "oxccl",
    script: Path = WORKERS,
) -> List[Result]:
    """Runs ``script scenario`` (default: ``workers.py``) as ranks 0..n with the variables
    ``launcher`` sets (see ``LAUNCHERS``; rank 0 hosts the store: ``OXCCL_STORE`` for
    ``oxccl launch``, else ``MASTER_ADDR`` and ``MASTER_PORT``, the store on the port after
    it). ``signals``: (seconds after start, rank, signal) to send. Returns each rank's (exit
    status, stdout, stderr); kills everything at ``timeout``."""
    port = free_port()
    procs = []
    for r in range(n):
        e = {k: v for k, v in os.environ.items() if not _launcher_var(k)}
        names = LAUNCHERS[launcher]
        e.update(dict(zip(names, (str(r), str(n), str(r), str(n)))))
        if launcher == "oxccl":
            e["OXCCL_STORE"] = f"tcp://127.0.0.1:{port}"
        else:
            # The store listens on MASTER_PORT + 1 (torchrun's agent has MASTER_PORT).
            e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port - 1))
        e.update(OXCCL_TIMEOUT="60s", OXCCL_TEST_RANK_VAR=names[0])
        e.update(env or {})
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), scenario],
                env=e,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.monotonic()
    pending = sorted(signals)
    while pending and time.monotonic() - start < timeout:
        at, rank, sig = pending[0]
        if time.monotonic() - start >= at:
            procs[rank].send_signal(sig)
            pending.pop(0)
        time.sleep(0.01)
    out: List[Result] = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            o, e = p.communicate()
        out.append((p.returncode, o, e))
    return out


def _launcher_var(name: str) -> bool:
    """A launcher's variable (or the store's) that this test process may have inherited."""
    every = {v for vs in LAUNCHERS.values() for v in vs}
    return name in every or name in ("OXCCL_STORE", "MASTER_ADDR", "MASTER_PORT")


def assert_passed(scenario: str, res: List[Result], ranks: Optional[Sequence[int]] = None) -> None:
    for r, (code, o, e) in enumerate(res):
        if ranks is not None and r not in ranks:
            continue
        assert code == 0 and f"PASS {scenario} rank {r}" in o, f"rank {r} exit {code}\n{o}\n{e}"


def oxccl_binary() -> Optional[str]:
    """The `oxccl` command: OXCCL_BIN, else on PATH, else the workspace's debug build."""
    b = os.environ.get("OXCCL_BIN") or shutil.which("oxccl")
    if b:
        return b
    target = Path(os.environ.get("CARGO_TARGET_DIR", HERE.parent.parent / "target"))
    cand = target / "debug" / "oxccl"
    return str(cand) if cand.exists() else None


def skip_or_fail(need: str, why: str) -> None:
    """Skips the calling test, or fails it when ``OXCCL_TEST_REQUIRE`` names ``need``
    (scripts/test provides torch and ray and says so: a missing install step cannot hide
    behind a green run)."""
    import pytest

    required = os.environ.get("OXCCL_TEST_REQUIRE", "").replace(",", " ").split()
    if need in required:
        pytest.fail(f"{why}, and OXCCL_TEST_REQUIRE names {need}")
    log = os.environ.get("OXCCL_TEST_SKIP_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"python: {why}\n")
    pytest.skip(why)


__all__ = ["run_ranks", "assert_passed", "oxccl_binary", "skip_or_fail", "signal", "WORKERS"]
