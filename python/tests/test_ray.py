"""The Ray collective backend "oxccl": a few local actors run every operation it offers, on numpy
arrays and torch tensors, and destroy and make their group again."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from conftest import skip_or_fail

SCRIPT = r"""
import faulthandler
faulthandler.dump_traceback_later(150, exit=True)  # a hang shows its stacks, then ends
import numpy as np, ray, ray.util.collective as col
import oxccl.ray  # noqa: F401

ray.init(num_cpus=4, include_dashboard=False)

@ray.remote(num_cpus=1)
class Worker:
    def setup(self, world, rank):
        import oxccl.ray  # noqa: F401
        col.init_collective_group(world, rank, backend="oxccl", group_name="g")
        self.r, self.w = rank, world
        return True

    def run(self):
        r, w = self.r, self.w
        for dt in (np.float32, np.float64, np.int32, np.int64):
            x = np.full(4, r + 1, dtype=dt)
            col.allreduce(x, "g")
            assert (x == sum(range(1, w + 1))).all(), (dt, x)
            x = np.full(4, r + 1, dtype=dt)
            col.allreduce(x, "g", col.types.ReduceOp.MAX)
            assert (x == w).all()
        b = np.arange(4.0) if r == 0 else np.zeros(4)
        col.broadcast(b, 0, "g")
        assert (b == np.arange(4.0)).all()
        outs = [np.zeros(3) for _ in range(w)]
        col.allgather(outs, np.full(3, float(r)), "g")
        assert all((o == k).all() for k, o in enumerate(outs))
        y = np.zeros(2)
        col.reducescatter(y, [np.full(2, float(k)) for k in range(w)], "g")
        assert (y == w * r).all(), y
        z = np.full(2, float(r))
        col.reduce(z, 0, "g")
        if r == 0:
            assert (z == sum(range(w))).all()
        if r == 0:
            col.send(np.arange(3.0), 1, "g")
        elif r == 1:
            q = np.zeros(3)
            col.recv(q, 0, "g")
            assert (q == np.arange(3.0)).all()
        col.barrier("g")
        return "ok"

    def run_torch(self):
        import torch
        r, w = self.r, self.w
        for dt in (torch.float32, torch.bfloat16, torch.int64):
            x = torch.full((5,), r + 1, dtype=dt)
            col.allreduce(x, "g")
            assert (x == sum(range(1, w + 1))).all(), (dt, x)
        b = torch.arange(6.0) if r == 0 else torch.zeros(6)
        col.broadcast(b, 0, "g")
        assert torch.equal(b, torch.arange(6.0))
        outs = [torch.zeros(2, 2) for _ in range(w)]
        col.allgather(outs, torch.full((2, 2), float(r)), "g")
        assert all((o == k).all() for k, o in enumerate(outs))
        y = torch.zeros(3)
        col.reducescatter(y, [torch.full((3,), float(k)) for k in range(w)], "g")
        assert (y == w * r).all(), y
        return "ok"

    def destroy(self):
        col.destroy_collective_group("g")
        return True

ws = [Worker.remote() for _ in range(3)]
# The same group name made, used and destroyed twice: the store actor goes with the last rank
# out, and the name can be made again.
for _ in range(2):
    assert ray.get([w.setup.remote(3, i) for i, w in enumerate(ws)]) == [True] * 3
    assert ray.get([w.run.remote() for w in ws]) == ["ok"] * 3
    assert ray.get([w.run_torch.remote() for w in ws]) == ["ok"] * 3
    assert ray.get([w.destroy.remote() for w in ws]) == [True] * 3
    ns = "oxccl-" + ray.get_runtime_context().namespace
    try:
        ray.get_actor("oxccl_store_g", namespace=ns)
        raise AssertionError("the store actor outlived the group")
    except ValueError:
        pass
print("PASS ray")
"""


def test_ray_collective_backend(tmp_path: Path) -> None:
    if importlib.util.find_spec("ray") is None:
        skip_or_fail("ray", "Ray is not installed (pip install ray)")
    # From outside the source tree: the installed package (with its native module) is used.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=200, cwd=tmp_path
    )
    assert out.returncode == 0 and "PASS ray" in out.stdout, out.stdout + out.stderr
