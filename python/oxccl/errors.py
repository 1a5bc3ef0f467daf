"""OxCCL's errors as Python exceptions.

Every error a call raises is an :class:`OxcclError`; its subclass says what kind of
failure it is, with the same words as OxCCL's Rust error. Where a built-in exception means
the same thing, the class derives from it too (``except TimeoutError`` catches an OxCCL
timeout; ``except ValueError`` catches a bad argument).
"""

from __future__ import annotations

import builtins
from typing import Optional

__all__ = [
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


class OxcclError(Exception):
    """Any error of an OxCCL call."""


class InvalidArgumentError(OxcclError, ValueError):
    """This call's arguments are wrong on their own (a buffer's length, type or layout, a
    rank out of range). Nothing moved; the communicator is still usable."""


class InvalidUsageError(OxcclError):
    """The ranks disagree (different collectives, counts or types; settings every rank must
    share), or the communicator is closed."""


class RemoteError(OxcclError):
    """Another rank failed, was lost (killed, crashed), aborted, or closed the communicator
    while this one waited for it. :attr:`rank` is that rank."""

    rank: Optional[int] = None


class TimeoutError(OxcclError, builtins.TimeoutError):
    """Nothing happened before the deadline; the message says whom this rank waited on and,
    by the ranks' flight records, who holds the operation up."""


class TransportError(OxcclError):
    """A transport's call failed on this rank (the message names the transport, the call and
    the peer)."""


class StoreError(OxcclError):
    """The rendezvous store failed or vanished."""


class AbortedError(OxcclError):
    """The communicator was aborted (:meth:`Communicator.abort`, Ctrl-C during a call), or an
    earlier operation failed (quoted): it is finished."""


class UnsupportedError(OxcclError, NotImplementedError):
    """Not possible here: no route to a peer, no NIC endpoint left, memory the transports
    cannot move, a feature not built in."""


class CudaError(OxcclError):
    """A CUDA call failed: the message names the driver call and its error (out of memory,
    an illegal address, a GPU that stopped answering)."""


class InternalError(OxcclError):
    """A bug in OxCCL: please report it with the message."""
