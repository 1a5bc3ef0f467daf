//! The one error type of OxCCL.
//!
//! Categories follow NCCL's result codes, with `Remote`, `InvalidUsage` and `Timeout` kept
//! apart: a caller can tell "I passed something wrong" from "a peer went away" from "nothing
//! happened in time". Transport errors say which transport, which call and which peer.

use std::time::Duration;

/// Result alias used throughout OxCCL.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in OxCCL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument is wrong on its own: a buffer too short, a rank out of range, avg on integers.
    /// Checked before any byte moves.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The arguments are fine alone but the call is not: use after close, sizes that do not
    /// match what the peer sent, collectives called in different orders on different ranks.
    #[error("invalid usage: {0}")]
    InvalidUsage(String),
    /// A peer failed, closed, or sent something this rank cannot accept.
    #[error("rank {rank}: {what}")]
    Remote {
        /// The peer's rank in the communicator.
        rank: usize,
        /// What was observed.
        what: String,
    },
    /// A blocking call passed its deadline.
    #[error("timed out after {after:?}: {what}")]
    Timeout {
        /// How long the call waited.
        after: Duration,
        /// What it was waiting for (operation, step, peers).
        what: String,
    },
    /// A transport call failed.
    #[error("{transport}: {op} failed{}: {source}", peer.map(|p| format!(" (peer rank {p})")).unwrap_or_default())]
    Transport {
        /// Which transport.
        transport: crate::link::TransportKind,
        /// Which call failed (`mmap`, `connect`, ...).
        op: &'static str,
        /// The peer, where one is involved.
        peer: Option<usize>,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The rendezvous store failed or answered something unexpected.
    #[error("store: {0}")]
    Store(String),
    /// The communicator was aborted, by `abort()` or by an earlier error.
    #[error("communicator aborted: {0}")]
    Aborted(String),
    /// A CUDA call failed (the call, and the driver's words: out of memory, an illegal
    /// address, a GPU that fell off the bus).
    #[error("CUDA: {call} failed: {what}")]
    Cuda {
        /// The driver call (`cuMemcpyDtoHAsync`, ...).
        call: &'static str,
        /// The driver's error and what OxCCL was doing.
        what: String,
    },
    /// Not supported by this build or this transport.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A bug in OxCCL. Please report it.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid_arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    /// Shorthand for [`Error::InvalidUsage`].
    pub fn invalid_usage(msg: impl Into<String>) -> Self {
        Error::InvalidUsage(msg.into())
    }
    /// Wraps an OS error from `op` of `transport`.
    pub fn os(
        transport: crate::link::TransportKind,
        op: &'static str,
        peer: Option<usize>,
        err: std::io::Error,
    ) -> Self {
        Error::Transport { transport, op, peer, source: Box::new(err) }
    }

    /// A copy of this error good enough to hand to later callers (errors are sticky; the
    /// source chain is flattened into text).
    pub fn duplicate(&self) -> Error {
        match self {
            Error::InvalidArgument(s) => Error::InvalidArgument(s.clone()),
            Error::InvalidUsage(s) => Error::InvalidUsage(s.clone()),
            Error::Remote { rank, what } => Error::Remote { rank: *rank, what: what.clone() },
            Error::Timeout { after, what } => Error::Timeout { after: *after, what: what.clone() },
            Error::Store(s) => Error::Store(s.clone()),
            Error::Aborted(s) => Error::Aborted(s.clone()),
            Error::Unsupported(s) => Error::Unsupported(s.clone()),
            Error::Cuda { call, what } => Error::Cuda { call, what: what.clone() },
            Error::Internal(s) => Error::Internal(s.clone()),
            Error::Transport { transport, op, peer, source } => {
                Error::Transport { transport: *transport, op, peer: *peer, source: source.to_string().into() }
            }
        }
    }
}
