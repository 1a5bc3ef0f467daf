"""The Python package between real processes: every call's results for every data type, the
errors, GIL release, Ctrl-C, a killed rank, and from_env under each launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import WORKERS, assert_passed, free_port, oxccl_binary, run_ranks, skip_or_fail


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_collective_and_data_type(n: int) -> None:
    assert_passed("collectives", run_ranks(n, "collectives"))


@pytest.mark.parametrize("n", [2, 3])
def test_buffers_and_bad_arguments(n: int) -> None:
    res = run_ranks(n, "buffers")
    assert_passed("buffers", res)
    assert "non-contiguous: all_reduce buffer: the array is not contiguous" in res[0][1]
    assert "read-only output: all_reduce output: the array is read-only" in res[0][1]
    assert "too short: " in res[0][1] and "recv has 7" in res[0][1]
    assert (
        "big-endian: all_reduce buffer: the array's elements are not in this machine's byte order"
        in res[0][1]
    )
    assert "resize refused while in use" in res[0][1]


@pytest.mark.parametrize("n", [2, 3])
def test_point_to_point(n: int) -> None:
    assert_passed("p2p", run_ranks(n, "p2p"))


def test_blocking_calls_release_the_gil() -> None:
    res = run_ranks(2, "gil")
    assert_passed("gil", res)
    print(res[0][1])


def test_ctrl_c_aborts_and_raises_keyboard_interrupt() -> None:
    # Rank 0 signals itself (a second into a receive nobody sends).
    res = run_ranks(2, "interrupt")
    assert_passed("interrupt", res)
    print(res[0][1], res[1][1])


def test_ctrl_c_during_creation_raises_keyboard_interrupt() -> None:
    # Rank 0 waits for a rank 1 that never joins, and is interrupted a second in.
    res = run_ranks(2, "interrupt_creation")
    assert_passed("interrupt_creation", res)
    print(res[0][1])


def test_a_killed_rank_is_a_remote_error_on_the_survivors() -> None:
    res = run_ranks(3, "killed")
    assert res[2][0] == -signal.SIGKILL, res[2]
    assert_passed("killed", res, ranks=[0, 1])


def test_split_explain_timeouts() -> None:
    assert_passed("manage", run_ranks(3, "manage"))


@pytest.mark.parametrize("launcher", ["torchrun", "openmpi", "pmi", "slurm"])
def test_from_env_reads_each_launchers_variables(launcher: str) -> None:
    """The variables torchrun, Open MPI, MPICH (PMI) and Slurm set, the store at MASTER_ADDR
    and MASTER_PORT + 1."""
    assert_passed("hello", run_ranks(3, "hello", launcher=launcher))


def test_under_mpirun() -> None:
    """Ranks started by Open MPI's mpirun itself."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        skip_or_fail("mpirun", "no mpirun (apt-get install openmpi-bin)")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OXCCL_RANK", "OXCCL_WORLD"))}
    env.update(
        OXCCL_STORE=f"tcp://127.0.0.1:{free_port()}", OXCCL_TEST_RANK_VAR="OMPI_COMM_WORLD_RANK"
    )
    cmd = [mpirun, "-n", "3", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "OXCCL_STORE", "-x", "OXCCL_TEST_RANK_VAR", sys.executable, str(WORKERS), "hello"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(3):
        assert f"PASS hello rank {r}" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("scenario", ["p2p", "collectives"])
def test_under_oxccl_launch(scenario: str) -> None:
    exe = oxccl_binary()
    if exe is None:
        pytest.skip("no oxccl command (set OXCCL_BIN, or build the workspace: cargo build)")
    n = 3
    out = subprocess.run(
        [
            exe,
            "launch",
            "-n",
            str(n),
            "--bind",
            "none",
            "--",
            sys.executable,
            str(WORKERS),
            scenario,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(n):
        assert f"[{r}] PASS {scenario} rank {r}" in out.stdout, out.stdout + out.stderr


def test_weight_refit_example() -> None:
    """examples/weight_refit.py: 2 trainers (class gradient) refit 2 generators (class
    weight_refit); every generator checks its weights after each step."""
    exe = oxccl_binary()
    if exe is None:
        pytest.skip("no oxccl command (set OXCCL_BIN, or build the workspace: cargo build)")
    example = WORKERS.parent.parent.parent / "examples" / "weight_refit.py"
    args = ["--params", str(1 << 16), "--bucket", str(1 << 14), "--steps", "3"]
    out = subprocess.run(
        [exe, "launch", "-n", "4", "--bind", "none", "--", sys.executable, str(example), *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gradient communicator: class gradient, 2 ranks" in out.stdout, out.stdout
    assert "weight_refit communicator: class weight_refit, 3 ranks" in out.stdout, out.stdout
    assert "step 2:" in out.stdout, out.stdout
