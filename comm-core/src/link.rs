//! The contract between the executor and a transport: one [`Link`] per peer.
//!
//! Shaped after NCCL's net plugin, UCX and libfabric: posting never blocks, progress is one
//! non-blocking function, completions are counted. Messages on a link are delivered in the
//! order they were posted, whatever their sizes: there is one ordered sequence per direction.

use std::fmt;

use crate::dtype::{DataType, ReduceOp};
use crate::error::Result;
use crate::mem::{LocalMem, MemKind};

/// The five ways OxCCL moves bytes. These names appear in every log line, in `explain` and in
/// the docs; the host-memory path is always `host-staging`, never "shm" alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TransportKind {
    /// CUDA peer copies / CUDA IPC between GPUs of one host.
    #[serde(rename = "p2p")]
    P2p,
    /// A shared-memory ring between processes of one host; GPU data is staged through pinned
    /// host memory.
    #[serde(rename = "host-staging")]
    HostStaging,
    /// libfabric RDM endpoints (EFA, tcp;ofi_rxm, shm providers).
    #[serde(rename = "net-libfabric")]
    NetLibfabric,
    /// ibverbs RC queue pairs.
    #[serde(rename = "net-ibverbs")]
    NetIbverbs,
    /// Plain TCP sockets.
    #[serde(rename = "net-tcp")]
    NetTcp,
    /// In-memory links of the test simulator.
    #[serde(rename = "sim")]
    Sim,
}

impl TransportKind {
    /// The name used in logs, `explain` and docs.
    pub const fn name(self) -> &'static str {
        match self {
            TransportKind::P2p => "p2p",
            TransportKind::HostStaging => "host-staging",
            TransportKind::NetLibfabric => "net-libfabric",
            TransportKind::NetIbverbs => "net-ibverbs",
            TransportKind::NetTcp => "net-tcp",
            TransportKind::Sim => "sim",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A raw, unborrowed view of memory handed to a link, with the kind of memory it is.
///
/// Links outlive single calls, so they cannot hold borrows; whoever builds a `MemSlice`
/// promises (through the `unsafe` constructor) that the memory stays valid, and is not
/// touched by anyone else, until the operation that uses it completes.
#[derive(Clone, Copy)]
pub struct MemSlice {
    ptr: *mut u8,
    len: usize,
    kind: MemKind,
}

// SAFETY: a MemSlice is an address range; the constructor's contract makes the owner
// responsible for keeping it valid while any thread uses it.
unsafe impl Send for MemSlice {}
// SAFETY: as above; a MemSlice grants no access by itself.
unsafe impl Sync for MemSlice {}

impl MemSlice {
    /// # Safety
    /// `ptr..ptr+len` is valid memory (writable, if the slice is used as a receive
    /// destination) and stays valid and otherwise untouched until every operation posted
    /// with this slice has completed or the link is dropped.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        MemSlice { ptr, len, kind: MemKind::Host }
    }
    /// [`MemSlice::new`] for memory of `kind`.
    ///
    /// # Safety
    /// As for [`MemSlice::new`]; the memory is of `kind`.
    pub unsafe fn new_in(ptr: *mut u8, len: usize, kind: MemKind) -> Self {
        MemSlice { ptr, len, kind }
    }
    /// The kind of memory.
    pub fn kind(&self) -> MemKind {
        self.kind
    }
    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for MemSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemSlice({:p}, {}, {:?})", self.ptr, self.len, self.kind)
    }
}

/// What a receive does with the incoming bytes.
#[derive(Debug, Clone, Copy)]
pub enum RecvMode {
    /// Copy them into the destination.
    Copy,
    /// `dst[i] = local[i] op incoming[i]`, fused into the receive (no extra pass over memory).
    /// `local` is the same length as the destination; it may be the destination itself.
    Reduce {
        /// Element type.
        dtype: DataType,
        /// Operator (avg combines as sum).
        op: ReduceOp,
        /// The local operand.
        local: MemSlice,
        /// The kernels for the memory's kind (the executor chose them).
        mem: &'static dyn LocalMem,
    },
}

/// Refuses a reducing receive whose destination and local operand are in different kinds of
/// memory (host against GPU), or that is not a whole number of elements.
pub fn check_reducing_recv(dst: &MemSlice, mode: &RecvMode) -> Result<()> {
    let RecvMode::Reduce { dtype, local, .. } = mode else { return Ok(()) };
    let gpu = |s: &MemSlice| matches!(s.kind(), MemKind::Device(_));
    if gpu(dst) != gpu(local) {
        return Err(crate::Error::invalid_usage(format!(
            "a reducing receive needs its destination ({}) and local operand ({}) in the same kind of memory",
            dst.kind(),
            local.kind()
        )));
    }
    if dst.len() % dtype.size() != 0 {
        return Err(crate::Error::invalid_usage(format!(
            "a reducing receive of {} bytes is not a whole number of {dtype} elements",
            dst.len()
        )));
    }
    Ok(())
}

/// Tag carried by every message: which operation it belongs to. A receive whose tag does not
/// match the incoming message is an `InvalidUsage` error naming both, not silent corruption.
///
/// Layout: operation code (top 8 bits), a 16-bit digest of the operation's arguments (data
/// type, count, op, root), and the operation's sequence number (low 40 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tag(pub u64);

/// Operation codes carried in tags.
pub mod opcode {
    /// Point-to-point send/recv (and grouped batches of them).
    pub const SEND_RECV: u8 = 1;
    /// all_reduce.
    pub const ALL_REDUCE: u8 = 2;
    /// broadcast.
    pub const BROADCAST: u8 = 3;
    /// reduce.
    pub const REDUCE: u8 = 4;
    /// all_gather.
    pub const ALL_GATHER: u8 = 5;
    /// reduce_scatter.
    pub const REDUCE_SCATTER: u8 = 6;
    /// all_to_all.
    pub const ALL_TO_ALL: u8 = 7;
    /// all_to_all_v.
    pub const ALL_TO_ALL_V: u8 = 8;
    /// barrier.
    pub const BARRIER: u8 = 9;
    /// Name of an operation code.
    pub fn name(op: u8) -> &'static str {
        match op {
            SEND_RECV => "send/recv",
            ALL_REDUCE => "all_reduce",
            BROADCAST => "broadcast",
            REDUCE => "reduce",
            ALL_GATHER => "all_gather",
            REDUCE_SCATTER => "reduce_scatter",
            ALL_TO_ALL => "all_to_all",
            ALL_TO_ALL_V => "all_to_all_v",
            BARRIER => "barrier",
            _ => "unknown operation",
        }
    }
}

impl Tag {
    /// Builds a tag from an operation code, an argument digest and a sequence number.
    pub fn new(op: u8, digest: u16, seq: u64) -> Tag {
        Tag(((op as u64) << 56) | ((digest as u64) << 40) | (seq & ((1 << 40) - 1)))
    }
    /// The operation code.
    pub fn op(self) -> u8 {
        (self.0 >> 56) as u8
    }
    /// The argument digest.
    pub fn digest(self) -> u16 {
        (self.0 >> 40) as u16
    }
    /// The sequence number.
    pub fn seq(self) -> u64 {
        self.0 & ((1 << 40) - 1)
    }
}

/// "all_reduce #12 (args 3f2a)", "send/recv (tag 3)": how errors name a tag.
pub fn describe_tag(t: Tag) -> String {
    if t.op() == opcode::SEND_RECV {
        return format!("send/recv (tag {})", t.seq());
    }
    format!("{} #{} (args {:04x})", opcode::name(t.op()), t.seq(), t.digest())
}

/// The error a transport returns when the next incoming message is not the one a receive
/// was posted for: the ranks called different operations, counts or data types.
pub fn mismatch_error(me: usize, peer: usize, want_len: usize, want: Tag, got_len: u64, got: Tag) -> crate::Error {
    let both_p2p = want.op() == opcode::SEND_RECV && got.op() == opcode::SEND_RECV;
    crate::Error::invalid_usage(format!(
        "rank {me} expected {want_len} bytes of {} from rank {peer}, but the next message is {got_len} bytes of {}: \
         the ranks called different operations, counts or data types{}",
        describe_tag(want),
        describe_tag(got),
        if both_p2p && want.seq() != got.seq() {
            " (sends and receives between two ranks match in call order, as NCCL's do: post them in the same \
             order of tags on both sides)"
        } else {
            ""
        }
    ))
}

/// A 16-bit digest of an operation's arguments, so that ranks calling the same collective
/// with different data types, counts, operators or roots are told, not corrupted.
pub fn digest(parts: &[u64]) -> u16 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        h ^= *p;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 16) ^ (h >> 32) ^ (h >> 48)) as u16
}

/// One direction-pair of ordered message streams to one peer.
///
/// Every method is non-blocking. Posted operations complete in posting order within their
/// direction; the executor learns of completions through the monotonic counters
/// [`Link::sends_done`] / [`Link::recvs_done`] compared with the sequence numbers that the
/// post calls return.
pub trait Link: Send {
    /// The peer's rank.
    fn peer(&self) -> usize;
    /// Which transport carries this link.
    fn kind(&self) -> TransportKind;
    /// Queues a send of `src`. Never blocks. Returns the send's sequence number on this link
    /// (0, 1, 2, ...). `src` must stay unchanged until the send completes.
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64>;
    /// Queues a receive into `dst`. Never blocks. The incoming message must be exactly
    /// `dst.len()` bytes and carry `tag`; otherwise the receive fails with `InvalidUsage`.
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64>;
    /// Moves bytes without blocking; returns how many units of work it did (0: nothing could
    /// move now). Call it until the operations you wait for are done.
    fn progress(&mut self) -> Result<usize>;
    /// Number of sends completed so far (their source buffers may be reused).
    fn sends_done(&self) -> u64;
    /// Number of receives completed so far (their destination holds the data).
    fn recvs_done(&self) -> u64;
    /// File descriptors a sleeping driver may `poll` for this link's pending work, with
    /// whether writability matters (`true`) or readability (`false`). Default: none (the
    /// transport wakes sleepers another way, as host-staging's doorbell does).
    fn wait_fds(&self, out: &mut Vec<(std::os::fd::RawFd, bool)>) {
        let _ = out;
    }
    /// Called before the link is dropped by an orderly close: waits, at most until
    /// `deadline`, until what this side completed can still reach the peer after it is gone
    /// (for host-staging: until the peer has mapped the segment). Default: nothing to wait for.
    fn close(&mut self, deadline: std::time::Instant) {
        let _ = deadline;
    }
    /// Whether it has work under way that no descriptor or doorbell will signal when it
    /// completes (GPU copies and kernels): a waiting rank then naps briefly instead of
    /// sleeping until woken. Default: none.
    fn busy_unsignalled(&self) -> bool {
        false
    }
    /// Called when an operation that used this link has ended, done or failed: the caller's
    /// buffers may go now, so nothing about them may be kept (net-libfabric lets go of the
    /// registrations it cached for them). Default: nothing kept.
    fn op_end(&mut self) {}
}

/// Where the executor gets the link to a peer.
pub trait LinkSet {
    /// The link to `peer`, connecting on first use. `Ok(None)`: the connection is still
    /// being set up; call again later. Never blocks for long.
    fn link(&mut self, peer: usize) -> Result<Option<&mut dyn Link>>;
}
