"""The torch.distributed backend "oxccl" under torchrun: every call on CPU tensors for every
data type (2, 3 and 4 ranks), tags, futures and bad calls, DistributedDataParallel against
gloo, and a killed rank."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HERE, assert_passed, free_port, run_ranks, skip_or_fail

EXAMPLES = HERE.parent.parent / "examples"


@pytest.fixture(autouse=True)
def _need_torch() -> None:
    if importlib.util.find_spec("torch") is None:
        skip_or_fail("torch", "torch is not installed (pip install torch)")


def torchrun(n: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-port",
        str(free_port()),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_every_torch_distributed_call(n: int) -> None:
    out = torchrun(n, str(HERE / "torch_worker.py"))
    assert out.returncode == 0, out.stdout + out.stderr
    for r in range(n):
        assert f"PASS torch rank {r}" in out.stdout, out.stdout + out.stderr


def test_ddp_over_oxccl_matches_gloo(tmp_path: Path) -> None:
    import torch

    saved = {}
    for backend in ("oxccl", "gloo"):
        f = tmp_path / f"{backend}.pt"
        out = torchrun(
            2, str(EXAMPLES / "ddp_cpu.py"), "--backend", backend, "--steps", "20", "--save", str(f)
        )
        assert out.returncode == 0, out.stdout + out.stderr
        print(out.stdout.strip())
        saved[backend] = torch.load(f)
    a, b = saved["oxccl"], saved["gloo"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


def test_a_killed_rank_is_a_remote_error_under_torch() -> None:
    """Started by hand with torchrun's variables (torchrun itself would end the survivors as
    soon as one rank died)."""
    res = run_ranks(
        3,
        "killed",
        launcher="torchrun",
        script=HERE / "torch_cases.py",
        env={"MASTER_PORT": str(free_port())},
    )
    assert res[2][0] == -signal.SIGKILL, res[2]
    assert_passed("killed", res, ranks=[0, 1])
    for r in (0, 1):
        assert "RemoteError" in res[r][1] and "rank 2" in res[r][1], res[r]


def test_ctrl_c_during_ddp_backward() -> None:
    """Ctrl-C on one rank while DDP waits inside torch's C++ backward: that rank ends within
    half a second, and the other gets the error (before, the wait lasted until the deadline,
    and the other rank crashed in torch on a future set with set_exception)."""
    res = run_ranks(
        2,
        "ddp_interrupt",
        launcher="torchrun",
        script=HERE / "torch_cases.py",
        env={"MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"},
    )
    assert_passed("ddp_interrupt", res)
    print(res[0][1], res[1][1])
