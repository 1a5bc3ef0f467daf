"""The Python package between real processes: every call's results for every data type, the
errors, GIL release, Ctrl-C, a killed rank."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import WORKERS, assert_passed, oxccl_binary, run_ranks


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


def test_a_killed_rank_is_a_remote_error_on_the_survivors() -> None:
    res = run_ranks(3, "killed")
    assert res[2][0] == -signal.SIGKILL, res[2]
    assert_passed("killed", res, ranks=[0, 1])


def test_split_explain_timeouts() -> None:
    assert_passed("manage", run_ranks(3, "manage"))


def test_under_oxccl_launch() -> None:
    exe = oxccl_binary()
    if exe is None:
        pytest.skip("no oxccl command (set OXCCL_BIN, or build the workspace: cargo build)")
    out = subprocess.run(
        [exe, "launch", "-n", "2", "--bind", "none", "--", sys.executable, str(WORKERS), "p2p"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[0] PASS p2p rank 0" in out.stdout and "[1] PASS p2p rank 1" in out.stdout
