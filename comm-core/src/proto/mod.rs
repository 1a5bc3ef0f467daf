//! The message protocol the network transports share, with no I/O: what a message's head
//! and a rendezvous clear-to-send (CTS) look like on the wire, how they are checked against
//! what the other side expects, how a message is cut into pieces, and when it goes by
//! rendezvous. A transport supplies its verbs: tagged sends and receives matched exactly by
//! [`WireId`] (with messages that arrive before their receive kept until it is posted), RMA
//! writes that tell the target a cookie, registrations. libfabric's tagged RDM endpoints
//! are exactly that; ibverbs' RC queue pairs have no tag matching, so an ibverbs transport
//! keeps a small table of early messages by `WireId` in its verbs (as UCX does in software),
//! and writes with immediate data for the cookie.
//!
//! * **Heads.** Every message starts with one. A message of at most [`Wire::inline`] bytes is
//!   its head alone: [`SMALL_HEAD`] bytes (magic, version, the operation's tag) and the
//!   payload, whose length is what arrives after them. A larger message has a
//!   [`LARGE_HEAD`]-byte head (magic, version, tag, length) and follows it in pieces.
//! * **Checks.** The receiver checks each head against the receive it posted: another
//!   operation's tag or length is `InvalidUsage` naming both sides
//!   ([`crate::link::mismatch_error`]); a head that is malformed, or the wrong shape for its
//!   length, is an error naming the peer (`Remote`).
//! * **Rendezvous.** A message of at least the receiver's threshold waits for the receiver's
//!   CTS, which names the operation it expects and either where to write (address, key,
//!   cookie: a copy, with RMA on both ends) or that tagged pieces are wanted (a reducing
//!   receive, which lands pieces in bounce buffers). The sender checks the CTS against its own
//!   message before a byte is written: a mismatch is `InvalidUsage` on its side too.
//! * **Pieces.** Pieces are at most the receiver's chunk, grown when a message would need
//!   more pieces than a tag can number, always a multiple of 64 bytes (element-aligned for
//!   every type, so a piece can be reduced on its own).

//! * **Channel.** [`Channel`] is the protocol's state machine for one link: the ordered
//!   send and receive queues, heads, pieces, the CTS + remote-write rendezvous,
//!   reduce-on-receive through bounce buffers, the in-flight limit, the class gate. It moves
//!   no byte itself: it calls a transport's [`Verbs`] (post a tagged send or receive, an RMA
//!   write, an inject, a registration) and is told of their completions.
//! * **Goodbye.** A link that goes says so ([`Channel::say_bye`]): how many messages it sent
//!   in full. Each side keeps a receive posted for the other's goodbye; once it has received
//!   all those messages, a receive still waiting can never complete, and fails naming the
//!   peer, at once instead of at its deadline. The goodbye carries the pair's incarnation, so
//!   one left over from an earlier link of a reused slot is ignored.

mod channel;
#[cfg(any(test, feature = "test-util"))]
pub mod mem_rc;
#[cfg(any(test, feature = "test-util"))]
pub mod mem_verbs;
pub mod rc;
mod verbs;
mod verbs_link;
mod wire;

pub use channel::{Channel, ChannelCfg};
pub use verbs::{Event, EventVerbs, Part, Verbs, WireId};
pub use verbs_link::VerbsLink;
pub use wire::*;
