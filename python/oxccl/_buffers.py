"""Finding the memory behind a buffer object, without copying it.

Accepted: numpy arrays (``ml_dtypes.bfloat16`` included), torch tensors (CPU, and CUDA in a
build with GPU support), anything with ``__array_interface__``, and anything with the buffer
protocol (``bytearray``, ``memoryview``, ``array.array``, ``bytes`` as an input). Every check
happens before any byte moves.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from . import _oxccl
from .errors import InvalidArgumentError, UnsupportedError

# (address, element count, data type name), and the GPU's index for a CUDA tensor: what the
# native module takes.
Buf = Union[Tuple[int, int, str], Tuple[int, int, str, int]]


def gpu_of(*bufs: Buf) -> Optional[int]:
    """The GPU whose memory the buffers are in (``None``: host memory)."""
    for b in bufs:
        if len(b) == 4:
            return int(b[3])
    return None


def current_stream(device: int) -> int:
    """torch's current CUDA stream on ``device``, as the driver's handle."""
    import torch

    return int(torch.cuda.current_stream(device).cuda_stream)


# numpy's dtype names and OxCCL's.
_NUMPY = {
    "float32": "float32",
    "float64": "float64",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int8": "int8",
    "uint8": "uint8",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "uint64": "uint64",
}

_TORCH = {
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.int32": "int32",
    "torch.uint32": "uint32",
    "torch.int64": "int64",
    "torch.uint64": "uint64",
}

DTYPES = tuple(_NUMPY)


def _is_torch_tensor(obj: Any) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "data_ptr")


# numpy dtype objects and OxCCL's names (filled as types are seen: ml_dtypes' bfloat16 too).
_BY_DTYPE: Dict[Any, str] = {}


def describe(obj: Any, *, writable: bool, what: str) -> Buf:
    """The buffer behind ``obj``; ``writable`` for an output. Raises
    :class:`InvalidArgumentError` for a type OxCCL has no name for, a buffer that is not
    contiguous, or a read-only output; :class:`UnsupportedError` for GPU memory."""
    # The common case first, in about half a microsecond: a contiguous numpy array of a
    # type seen before.
    if type(obj) is np.ndarray:
        name = _BY_DTYPE.get(obj.dtype)
        flags = obj.flags
        if name is not None and flags.c_contiguous and (flags.writeable or not writable):
            return (_oxccl.ndarray_data(obj) if obj.size else 0, obj.size, name)
    if _is_torch_tensor(obj):
        return _torch(obj, writable=writable, what=what)
    if isinstance(obj, np.ndarray):
        arr = obj
    elif hasattr(obj, "__array_interface__"):
        arr = np.asarray(obj)
    else:
        try:
            view = memoryview(obj)
        except TypeError:
            raise InvalidArgumentError(
                f"{what}: a {type(obj).__name__} is not a buffer (expected a numpy array, a torch "
                "CPU tensor, or an object with the buffer protocol such as bytearray)"
            ) from None
        if not view.contiguous:
            raise InvalidArgumentError(f"{what}: the memoryview is not contiguous")
        arr = np.frombuffer(view, dtype=np.uint8) if view.format in ("B", "c") else np.asarray(view)
        if view.readonly:
            arr.flags.writeable = False
        # While `arr` lives, the object is exported: a bytearray cannot be resized (moved)
        # under an operation. The caller keeps it with the object (see hold()).
        _HELD[id(obj)] = arr
    return _numpy(arr, writable=writable, what=what)


# Exports made by describe(), by the id of the object described, until hold() takes them.
_HELD: Dict[int, Any] = {}


def hold(*objs: Any) -> Tuple[Any, ...]:
    """What keeps ``objs`` usable for an operation: the objects, and the exports describe()
    made of them (so that a ``bytearray`` cannot be resized while the operation runs)."""
    return objs + tuple(_HELD.pop(id(o)) for o in objs if id(o) in _HELD)


def _numpy(arr: np.ndarray, *, writable: bool, what: str) -> Buf:
    if not arr.dtype.isnative:
        raise InvalidArgumentError(
            f"{what}: the array's elements are not in this machine's byte order "
            f"({arr.dtype.str}); pass x.astype(x.dtype.newbyteorder('='))"
        )
    name = _NUMPY.get(arr.dtype.name)
    if name is None:
        raise InvalidArgumentError(
            f"{what}: OxCCL has no data type for numpy {arr.dtype.name} "
            f"(expected one of {', '.join(DTYPES)})"
        )
    if not arr.flags["C_CONTIGUOUS"]:
        raise InvalidArgumentError(
            f"{what}: the array is not contiguous (strides {arr.strides}); pass "
            "numpy.ascontiguousarray(x), or a contiguous output to copy into"
        )
    if writable and not arr.flags["WRITEABLE"]:
        raise InvalidArgumentError(f"{what}: the array is read-only but receives data")
    _BY_DTYPE[arr.dtype] = name
    addr = int(arr.__array_interface__["data"][0]) if arr.size else 0
    return (addr, int(arr.size), name)


def _torch(t: Any, *, writable: bool, what: str) -> Buf:
    if t.device.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"{what}: a tensor on {t.device}; OxCCL takes CPU and CUDA tensors")
    name = _TORCH.get(str(t.dtype))
    if name is None:
        raise InvalidArgumentError(
            f"{what}: OxCCL has no data type for {t.dtype} (expected one of {', '.join(DTYPES)})"
        )
    if not t.is_contiguous():
        raise InvalidArgumentError(
            f"{what}: the tensor is not contiguous (strides {tuple(t.stride())}); pass "
            "t.contiguous(), or a contiguous output to copy into"
        )
    n = int(t.numel())
    if t.device.type == "cuda":
        # The GPU's own memory: calls on it are queued on torch's current stream.
        return (int(t.data_ptr()), n, name, int(t.device.index or 0))
    return (int(t.data_ptr()) if n else 0, n, name)


def dtype_of(obj: Any) -> str:
    """OxCCL's name of ``obj``'s element type."""
    return describe(obj, writable=False, what="buffer")[2]
