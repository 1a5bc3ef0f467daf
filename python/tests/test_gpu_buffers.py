"""CUDA tensors without a GPU: how they are described (address, count, type and the GPU's
index: calls on them are queued on torch's current stream), and the clear refusal of a build
or machine without GPU support. The GPU path itself is verified on a GPU host by
bench/gpu/verify.sh."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, List, Optional

import pytest
from conftest import free_port
from test_inprocess import run_threads

import oxccl
from oxccl import _buffers


class FakeCudaTensor:
    """What oxccl reads of a torch CUDA tensor (torch here has no CUDA)."""

    def __init__(self, index: int, n: int, contiguous: bool = True) -> None:
        self.device = SimpleNamespace(type="cuda", index=index)
        self.dtype = "torch.float32"
        self._n = n
        self._contiguous = contiguous

    def numel(self) -> int:
        return self._n

    def data_ptr(self) -> int:
        return 0x7F00_0000_0000

    def is_contiguous(self) -> bool:
        return self._contiguous

    def stride(self) -> Any:
        return (2,)


def test_a_cuda_tensor_is_described_with_its_gpu() -> None:
    b = _buffers._torch(FakeCudaTensor(1, 8), writable=True, what="out")
    assert b == (0x7F00_0000_0000, 8, "float32", 1)
    assert _buffers.gpu_of((0, 0, "float32"), b) == 1
    assert _buffers.gpu_of((0, 0, "float32")) is None
    with pytest.raises(oxccl.InvalidArgumentError, match="not contiguous"):
        _buffers._torch(FakeCudaTensor(0, 8, contiguous=False), writable=True, what="out")
    other = FakeCudaTensor(0, 8)
    other.device = SimpleNamespace(type="mps", index=0)
    with pytest.raises(oxccl.UnsupportedError, match="CPU and CUDA tensors"):
        _buffers._torch(other, writable=True, what="out")


def test_gpu_buffers_without_a_gpu_are_refused_before_anything_moves() -> None:
    addr = f"127.0.0.1:{free_port()}"
    seen: List[Optional[str]] = [None, None]

    def body(r: int) -> None:
        with oxccl.Communicator(r, 2, addr, timeout=20) as c:
            gpu_buf = (0x7F00_0000_0000, 4, "float32", 0)
            with pytest.raises(oxccl.UnsupportedError) as e:
                c._native.submit_on_stream("all_reduce", gpu_buf, gpu_buf, None, 0, "sum")
            seen[r] = str(e.value)
            with pytest.raises(oxccl.UnsupportedError):
                c._native.p2p_on_stream(True, gpu_buf, 1 - r, None, 0)
            # Nothing was queued: the communicator still works.
            import numpy as np

            x = np.ones(4, dtype=np.float32)
            c.all_reduce(x)
            assert list(x) == [2.0] * 4

    assert run_threads(2, body) == [None, None]
    for s in seen:
        assert s is not None and "GPU 0" in s
        assert "no GPU" in s or "found no GPU" in s, s
