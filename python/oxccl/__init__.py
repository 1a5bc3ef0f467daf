"""OxCCL for Python: collective communication between processes.

    import numpy as np
    import oxccl

    with oxccl.Communicator.from_env() as comm:      # under `oxccl launch -n 2`, torchrun, ...
        x = np.ones(1 << 20, dtype=np.float32)
        comm.all_reduce(x)                            # in place, sum over every rank

``import oxccl.torch`` registers the torch.distributed backend ``"oxccl"``. Settings are
``OXCCL_*`` environment variables (``oxccl env`` lists them); ``OXCCL_LOG`` (default
``warn``) filters what OxCCL logs to stderr. docs/python.md has the whole story.
"""

from __future__ import annotations

from . import errors
from ._comm import Communicator, Explain, Group, ReduceOp, Work
from ._oxccl import version as _native_version
from .errors import (
    AbortedError,
    CudaError,
    InternalError,
    InvalidArgumentError,
    InvalidUsageError,
    OxcclError,
    RemoteError,
    StoreError,
    TimeoutError,
    TransportError,
    UnsupportedError,
)

__version__ = _native_version()

__all__ = [
    "Communicator",
    "Explain",
    "Group",
    "ReduceOp",
    "Work",
    "errors",
    "OxcclError",
    "InvalidArgumentError",
    "InvalidUsageError",
    "RemoteError",
    "TimeoutError",
    "TransportError",
    "StoreError",
    "AbortedError",
    "UnsupportedError",
    "CudaError",
    "InternalError",
]
