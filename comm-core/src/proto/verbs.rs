//! What a transport supplies to the protocol core: its verbs.

use std::os::raw::c_void;

use crate::error::Error;
use crate::link::MemSlice;

/// Which part of which message a verbs call carries. The transport maps it to its own
/// matching (libfabric: a 64-bit tag with its communicator slots and ranks around these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The head (a small message's whole).
    Head,
    /// Piece `n` (1-based) of a large message.
    Piece(usize),
    /// The receiver's clear-to-send of a rendezvous message.
    Cts,
    /// A side's goodbye when its link goes (with sequence number 0; one per link).
    Bye,
}

/// A message of one direction of a link (numbered from 0 per direction) and a part of it.
/// Sends and their CTS receives name the link's sending direction; receives and the CTS
/// they send name its receiving direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireId {
    /// The message's number in its direction.
    pub seq: u64,
    /// Which part.
    pub part: Part,
}

/// The calls the protocol core makes on a transport. Every post is non-blocking: `Ok(false)`
/// means "no room now", and nothing was posted. Each posted operation carries the core's
/// `op` number; the transport reports its completion with [`crate::proto::Channel::complete`].
/// Errors are the transport's own (`Error::Transport` naming its call and the peer).
pub trait Verbs {
    /// A memory registration.
    type Mr;
    /// Registers a caller's buffer `s` for an operation (for the peer's remote writes too,
    /// when `remote`). The buffer is the caller's again once the operation ends: a
    /// transport that caches registrations must not keep this one past that.
    fn register(&mut self, s: MemSlice, remote: bool) -> Result<Self::Mr, Error>;
    /// Registers memory the core owns (its head, CTS and bounce pools), which lives exactly
    /// as long as the registration.
    fn register_pool(&mut self, s: MemSlice) -> Result<Self::Mr, Error>;
    /// The descriptor a post passes for memory inside `mr`.
    fn desc(mr: &Self::Mr) -> *mut c_void;
    /// Where the peer writes `s` (inside `mr`, registered for remote writes): the address or
    /// offset its RMA writes name, and the key.
    fn rma_target(&self, mr: &Self::Mr, s: MemSlice) -> (u64, u64);
    /// Posts a send of `len` bytes at `buf` as `id`.
    ///
    /// # Safety
    /// `buf` holds `len` bytes that stay valid and unchanged until the operation completes
    /// or is cancelled; `desc` is null or a descriptor of a registration covering them.
    unsafe fn send(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        id: WireId,
        op: u32,
    ) -> Result<bool, Error>;
    /// Posts a receive of at most `len` bytes into `buf`, matching `id` exactly.
    ///
    /// # Safety
    /// `buf` holds `len` writable bytes that stay valid and unread by others until the
    /// operation completes or is cancelled; `desc` as for [`Verbs::send`].
    unsafe fn recv(&mut self, buf: *mut u8, len: usize, desc: *mut c_void, id: WireId, op: u32) -> Result<bool, Error>;
    /// Posts an RMA write of `len` bytes at `buf` to the peer's `addr` with `key`, delivering
    /// `cookie` to the peer's completion queue.
    ///
    /// # Safety
    /// As for [`Verbs::send`]; `addr .. addr + len` lies in the peer's registration of `key`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        cookie: u32,
        addr: u64,
        key: u64,
        op: u32,
    ) -> Result<bool, Error>;
    /// Sends `bytes` whole as `id`, delivered when the call returns (no completion comes).
    /// Called only for messages of at most [`crate::proto::ChannelCfg::inject_bytes`].
    fn inject(&mut self, bytes: &[u8], id: WireId) -> Result<bool, Error>;
    /// A new cookie that routes the peer's remote writes to this link.
    fn new_cookie(&mut self) -> u32;
    /// Lets a cookie go (no write of it will come any more).
    fn drop_cookie(&mut self, cookie: u32);
}

/// A completion, as verbs that report them when asked ([`EventVerbs`]) give it.
#[derive(Debug)]
pub enum Event {
    /// Operation `op` completed: bytes, or the error in words.
    Done(u32, Result<usize, String>),
    /// A peer's write carrying `cookie` landed: bytes, or the error in words.
    Landed(u32, Result<usize, String>),
}

/// Verbs that report their completions as [`Event`]s when asked: a link runs a
/// [`crate::proto::Channel`] over them by feeding each event to the channel
/// ([`crate::proto::Channel::complete`], [`crate::proto::Channel::landed`]).
pub trait EventVerbs: Verbs {
    /// Appends what happened on this side since the last call.
    fn events(&mut self, out: &mut Vec<Event>) -> Result<(), Error>;
    /// Forgets this side's posted receives (their buffers are going).
    fn cancel_all(&mut self);
    /// An operation ended: the caller's buffers may go now (a registration cache lets go of
    /// what it holds of them). By default: nothing.
    fn op_end(&mut self) {}
}
