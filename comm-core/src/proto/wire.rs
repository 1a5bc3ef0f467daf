//! Heads, CTS, pieces and the rendezvous choice: the protocol on the wire.

use crate::error::Error;
use crate::link::{describe_tag, mismatch_error, Tag};

/// Bytes of a large message's head: magic, version, tag, length, 8 reserved.
pub const LARGE_HEAD: usize = 32;
/// Bytes of a small message's head, its payload following: magic, version, tag.
pub const SMALL_HEAD: usize = 16;
/// Bytes of a CTS.
pub const CTS_BYTES: usize = 56;

const MAGIC: u32 = 0x4f58_4c46; // "OXLF"
const SMALL_MAGIC: u32 = 0x4f58_4c53; // "OXLS"
const CTS_MAGIC: u32 = 0x4f58_4354; // "OXCT"
const BYE_MAGIC: u32 = 0x4f58_4259; // "OXBY"
/// Bytes of a goodbye.
pub const BYE_BYTES: usize = 24;
/// Wire version; both sides must agree. 2: small messages carry the 16-byte head. 3: links
/// say goodbye (a piece number is kept for it).
pub const VERSION: u32 = 3;
const CTS_RMA: u64 = 1;
const CTS_TAGGED: u64 = 2;

/// A transport's shape of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wire {
    /// Largest message sent whole in its head.
    pub inline: usize,
    /// Most pieces one message may have (what the transport's tags can number).
    pub max_pieces: usize,
}

impl Wire {
    /// Bytes of the head of a `len`-byte message (with the payload of a small one).
    #[inline]
    pub fn head_len(&self, len: usize) -> usize {
        if len <= self.inline {
            SMALL_HEAD + len
        } else {
            LARGE_HEAD
        }
    }

    /// Piece size for a message of `len` bytes cut by `chunk`: grown so that the pieces fit
    /// [`Wire::max_pieces`], a multiple of 64.
    #[inline]
    pub fn piece_size(&self, len: usize, chunk: usize) -> usize {
        chunk.max(len.div_ceil(self.max_pieces)).max(64).div_ceil(64) * 64
    }

    /// Pieces after the head of a `len`-byte message (0: it travels in its head).
    #[inline]
    pub fn pieces(&self, len: usize, chunk: usize) -> usize {
        if len <= self.inline {
            0
        } else {
            len.div_ceil(self.piece_size(len, chunk))
        }
    }

    /// Whether a `len`-byte message goes by rendezvous, given the receiver's threshold
    /// (0: never). Messages that travel in their head never do.
    #[inline]
    pub fn rendezvous(&self, len: usize, threshold: usize) -> bool {
        threshold > self.inline && len >= threshold
    }

    /// Checks the head of `arrived` bytes (`head` holds at least their first
    /// [`LARGE_HEAD`], or all of them when fewer) against the receive rank `me` posted for
    /// `want_len` bytes of `want` from `peer`. Ok: the message matches, and for a small one
    /// its payload starts at [`SMALL_HEAD`].
    #[inline]
    pub fn check_head(
        &self,
        head: &[u8],
        arrived: usize,
        me: usize,
        peer: usize,
        want: Tag,
        want_len: usize,
    ) -> Result<(), Error> {
        let remote = |what: String| Error::Remote { rank: peer, what };
        let small = arrived >= SMALL_HEAD && head[0..4] == SMALL_MAGIC.to_le_bytes();
        let (tag, len) = if small {
            let v = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
            if v != VERSION {
                return Err(remote(format!("a message head of version {v} (want v{VERSION})")));
            }
            (Tag(u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"))), (arrived - SMALL_HEAD) as u64)
        } else {
            if arrived < LARGE_HEAD {
                return Err(remote(format!("a {arrived}-byte message head")));
            }
            read_stamp(head, MAGIC, "a message head").map_err(remote)?
        };
        if tag != want || len != want_len as u64 {
            return Err(mismatch_error(me, peer, want_len, want, len, tag));
        }
        if small != (want_len <= self.inline) || (!small && arrived != LARGE_HEAD) {
            return Err(remote(format!("a {arrived}-byte head (small: {small}) for a {want_len}-byte message")));
        }
        Ok(())
    }
}

/// The head of a small message (its payload follows it; the transport copies both).
#[inline]
pub fn small_head(tag: Tag) -> [u8; SMALL_HEAD] {
    let mut b = [0u8; SMALL_HEAD];
    b[0..4].copy_from_slice(&SMALL_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&tag.0.to_le_bytes());
    b
}

/// The head of a large message of `len` bytes (its pieces follow).
#[inline]
pub fn large_head(tag: Tag, len: usize) -> [u8; LARGE_HEAD] {
    let mut b = [0u8; LARGE_HEAD];
    stamp(&mut b, MAGIC, tag, len);
    b
}

/// Where a rendezvous message goes, as the receiver's CTS says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cts {
    /// Write the pieces into the receiver's buffer: at `addr` (an address or an offset in its
    /// registration, as the transport's memory registration works) with `key`, each write
    /// carrying `cookie` to the receiver's completion queue.
    Rma {
        /// Where the message starts.
        addr: u64,
        /// The registration key.
        key: u64,
        /// What each write carries, so the receiver counts it.
        cookie: u32,
    },
    /// Send the pieces as tagged messages (into bounce buffers: a reducing receive).
    Tagged,
}

/// The CTS for the receive of `len` bytes of `tag`.
pub fn write_cts(tag: Tag, len: usize, cts: Cts) -> [u8; CTS_BYTES] {
    let mut c = [0u8; CTS_BYTES];
    stamp(&mut c, CTS_MAGIC, tag, len);
    match cts {
        Cts::Rma { addr, key, cookie } => {
            c[24..32].copy_from_slice(&CTS_RMA.to_le_bytes());
            c[32..40].copy_from_slice(&addr.to_le_bytes());
            c[40..48].copy_from_slice(&key.to_le_bytes());
            c[48..52].copy_from_slice(&cookie.to_le_bytes());
        }
        Cts::Tagged => c[24..32].copy_from_slice(&CTS_TAGGED.to_le_bytes()),
    }
    c
}

/// Checks a CTS of `arrived` bytes that rank `me` got from `peer` for its send of `len`
/// bytes of `tag`: the way the receiver wants it, or `InvalidUsage` when the receiver expects
/// another operation (nothing may be written then), or `Remote` when the CTS is malformed or
/// asks for RMA this side (`can_rma`) cannot do.
pub fn check_cts(
    c: &[u8],
    arrived: usize,
    me: usize,
    peer: usize,
    tag: Tag,
    len: usize,
    can_rma: bool,
) -> Result<Cts, Error> {
    let remote = |what: String| Error::Remote { rank: peer, what };
    if arrived != CTS_BYTES || c.len() < CTS_BYTES {
        return Err(remote(format!("a {arrived}-byte CTS")));
    }
    let (their_tag, their_len) = read_stamp(c, CTS_MAGIC, "a CTS").map_err(remote)?;
    if their_tag != tag || their_len != len as u64 {
        return Err(Error::invalid_usage(format!(
            "rank {me} is sending {len} bytes of {} to rank {peer}, which is receiving {their_len} bytes of {}: the \
             ranks called different operations, counts or data types",
            describe_tag(tag),
            describe_tag(their_tag)
        )));
    }
    let word = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8 bytes"));
    match word(24) {
        CTS_RMA if can_rma => {
            Ok(Cts::Rma { addr: word(32), key: word(40), cookie: u32::from_le_bytes(c[48..52].try_into().expect("4")) })
        }
        CTS_TAGGED => Ok(Cts::Tagged),
        kind => Err(remote(format!("a CTS of kind {kind}, which this rank cannot serve"))),
    }
}

/// The goodbye a side sends when its link goes: the link's incarnation (`nonce`, the same on
/// both sides of this pair of links) and how many messages it sent in full.
#[inline]
pub fn write_bye(nonce: u64, sent: u64) -> [u8; BYE_BYTES] {
    let mut b = [0u8; BYE_BYTES];
    b[0..4].copy_from_slice(&BYE_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&nonce.to_le_bytes());
    b[16..24].copy_from_slice(&sent.to_le_bytes());
    b
}

/// Reads a goodbye of `arrived` bytes: `(nonce, sent)`, or what is wrong with it.
pub fn read_bye(b: &[u8], arrived: usize) -> Result<(u64, u64), String> {
    if arrived != BYE_BYTES || b.len() < BYE_BYTES {
        return Err(format!("a {arrived}-byte goodbye"));
    }
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let m = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    let v = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if m != BYE_MAGIC || v != VERSION {
        return Err(format!("a goodbye with magic {m:#x} version {v} (want {BYE_MAGIC:#x} v{VERSION})"));
    }
    Ok((word(8), word(16)))
}

/// Writes the 24 bytes a large head and a CTS both start with: magic, version, tag, length.
#[inline]
fn stamp(b: &mut [u8], magic: u32, tag: Tag, len: usize) {
    b[0..4].copy_from_slice(&magic.to_le_bytes());
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&tag.0.to_le_bytes());
    b[16..24].copy_from_slice(&(len as u64).to_le_bytes());
}

/// Reads what [`stamp`] wrote: the tag and length, or what is wrong (`what` names the kind
/// of message).
#[inline]
fn read_stamp(b: &[u8], magic: u32, what: &str) -> Result<(Tag, u64), String> {
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let m = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    let v = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if m != magic || v != VERSION {
        return Err(format!("{what} with magic {m:#x} version {v} (want {magic:#x} v{VERSION})"));
    }
    Ok((Tag(word(8)), word(16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Wire = Wire { inline: 4064, max_pieces: (1 << 12) - 2 };

    /// A small message as a transport sends it: its head, then its payload.
    fn small(tag: Tag, payload: &[u8]) -> (Vec<u8>, usize) {
        let mut v = small_head(tag).to_vec();
        v.extend_from_slice(payload);
        let n = v.len();
        v.resize(n.max(LARGE_HEAD), 0);
        (v, n)
    }

    #[test]
    fn heads_round_trip_small_and_large() {
        let (b, n) = small(Tag(7), &[1, 2, 3]);
        assert_eq!(n, SMALL_HEAD + 3);
        W.check_head(&b, n, 1, 0, Tag(7), 3).unwrap();
        assert_eq!(&b[SMALL_HEAD..n], &[1, 2, 3]);
        let (b, n) = small(Tag(9), &[]);
        W.check_head(&b, n, 1, 0, Tag(9), 0).unwrap();
        let b = large_head(Tag(8), 1 << 20);
        W.check_head(&b, LARGE_HEAD, 1, 0, Tag(8), 1 << 20).unwrap();
    }

    #[test]
    fn another_operation_is_invalid_usage_and_a_bad_head_names_the_peer() {
        let (b, n) = small(Tag(7), &[0; 8]);
        let e = W.check_head(&b, n, 1, 0, Tag(6), 8).unwrap_err();
        assert!(matches!(e, Error::InvalidUsage(_)) && e.to_string().contains("expected"), "{e}");
        let e = W.check_head(&b, n, 1, 0, Tag(7), 9).unwrap_err();
        assert!(matches!(e, Error::InvalidUsage(_)), "{e}");
        // A short head, a wrong magic or version.
        let b = large_head(Tag(7), 5000);
        W.check_head(&b, LARGE_HEAD, 1, 0, Tag(7), 5000).unwrap();
        assert!(matches!(W.check_head(&b, 20, 1, 0, Tag(7), 5000), Err(Error::Remote { rank: 0, .. })));
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(W.check_head(&bad, LARGE_HEAD, 1, 0, Tag(7), 5000), Err(Error::Remote { rank: 0, .. })));
        let mut old = b;
        old[4] = 1;
        let e = W.check_head(&old, LARGE_HEAD, 1, 0, Tag(7), 5000).unwrap_err();
        assert!(e.to_string().contains("version 1"), "{e}");
        // A small head for a message the receiver expects in pieces (the sides disagree on
        // the inline size).
        let (b, n) = small(Tag(7), &[0; 16]);
        let tiny = Wire { inline: 8, ..W };
        assert!(matches!(tiny.check_head(&b, n, 3, 2, Tag(7), 16), Err(Error::Remote { rank: 2, .. })));
    }

    #[test]
    fn cts_round_trips_and_a_mismatch_is_caught_by_the_sender() {
        let rma = Cts::Rma { addr: 0x1000, key: 77, cookie: 5 };
        let c = write_cts(Tag(3), 1 << 20, rma);
        assert_eq!(check_cts(&c, CTS_BYTES, 0, 1, Tag(3), 1 << 20, true).unwrap(), rma);
        // Without RMA on this side, an RMA CTS cannot be served.
        assert!(matches!(check_cts(&c, CTS_BYTES, 0, 1, Tag(3), 1 << 20, false), Err(Error::Remote { rank: 1, .. })));
        let t = write_cts(Tag(3), 1 << 20, Cts::Tagged);
        assert_eq!(check_cts(&t, CTS_BYTES, 0, 1, Tag(3), 1 << 20, false).unwrap(), Cts::Tagged);
        let e = check_cts(&t, CTS_BYTES, 0, 1, Tag(4), 1 << 20, true).unwrap_err();
        assert!(matches!(e, Error::InvalidUsage(_)) && e.to_string().contains("rank 0 is sending"), "{e}");
        assert!(matches!(check_cts(&t, 40, 0, 1, Tag(3), 1 << 20, true), Err(Error::Remote { .. })));
    }

    #[test]
    fn goodbyes_round_trip() {
        let b = write_bye(0xABCD, 42);
        assert_eq!(read_bye(&b, BYE_BYTES).unwrap(), (0xABCD, 42));
        assert!(read_bye(&b, 20).is_err());
        let mut bad = b;
        bad[1] ^= 1;
        assert!(read_bye(&bad, BYE_BYTES).unwrap_err().contains("magic"));
    }

    #[test]
    fn pieces_fit_the_tag_and_stay_aligned() {
        assert_eq!(W.pieces(0, 1 << 18), 0);
        assert_eq!(W.pieces(W.inline, 1 << 18), 0);
        assert_eq!(W.pieces(W.inline + 1, 1 << 18), 1);
        assert_eq!(W.pieces(1 << 20, 1 << 18), 4);
        for len in [W.inline + 1, 1 << 30, (1 << 34) + 3, 12_345_678_901] {
            let p = W.pieces(len, 1 << 18);
            assert!(p <= W.max_pieces, "{len}: {p}");
            assert_eq!(W.piece_size(len, 1 << 18) % 64, 0);
            assert!(p * W.piece_size(len, 1 << 18) >= len);
        }
        assert_eq!(W.head_len(10), SMALL_HEAD + 10);
        assert_eq!(W.head_len(1 << 20), LARGE_HEAD);
    }

    #[test]
    fn rendezvous_from_the_threshold_never_for_inline_messages() {
        assert!(!W.rendezvous(1 << 20, 0));
        assert!(W.rendezvous(1 << 20, 1 << 20));
        assert!(!W.rendezvous((1 << 20) - 1, 1 << 20));
        assert!(!W.rendezvous(100, 64), "a threshold at or below inline means no rendezvous");
    }
}
