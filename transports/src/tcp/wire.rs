//! net-tcp wire format: a hello per stream, then pieces, each behind a fixed header.
//!
//! Nothing on the wire decides how much memory the receiver uses: a piece's length must equal
//! what the receiver computed from its own posted receive, or the connection fails.

use oxccl_core::{Error, Result};

/// First bytes of every stream: "OXTC".
pub const HELLO_MAGIC: u32 = 0x4f58_5443;
/// Wire version; both sides must agree.
pub const VERSION: u16 = 1;
/// Longest communicator nonce a hello may carry.
pub const MAX_NONCE: usize = 64;
/// Size of a piece header.
pub const HEADER: usize = 32;
const PIECE_MAGIC: u32 = 0x4f58_5043;

/// What a connecting rank says on each of its streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Connecting rank.
    pub rank: u32,
    /// Which of the link's streams this is.
    pub stream: u16,
    /// How many streams the link has.
    pub streams: u16,
    /// The communicator's nonce.
    pub nonce: String,
}

impl Hello {
    /// Encodes as `magic u32 | version u16 | stream u16 | streams u16 | nonce_len u16 |
    /// rank u32 | nonce`.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.nonce.len());
        v.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        v.extend_from_slice(&VERSION.to_le_bytes());
        v.extend_from_slice(&self.stream.to_le_bytes());
        v.extend_from_slice(&self.streams.to_le_bytes());
        v.extend_from_slice(&(self.nonce.len() as u16).to_le_bytes());
        v.extend_from_slice(&self.rank.to_le_bytes());
        v.extend_from_slice(self.nonce.as_bytes());
        v
    }
    /// Decodes the fixed 16-byte part; returns the hello (nonce empty) and the nonce length.
    pub fn decode_fixed(b: &[u8; 16]) -> Result<(Hello, usize)> {
        let u16at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != HELLO_MAGIC {
            return Err(Error::Remote {
                rank: usize::MAX,
                what: format!("net-tcp: not an OxCCL stream (magic {magic:#x})"),
            });
        }
        let version = u16at(4);
        if version != VERSION {
            return Err(Error::Remote {
                rank: usize::MAX,
                what: format!("net-tcp: peer speaks wire version {version}, this rank {VERSION}"),
            });
        }
        let nonce_len = u16at(10) as usize;
        if nonce_len > MAX_NONCE {
            return Err(Error::Remote { rank: usize::MAX, what: format!("net-tcp: hello nonce of {nonce_len} bytes") });
        }
        let rank = u32::from_le_bytes([b[12], b[13], b[14], b[15]]);
        Ok((Hello { rank, stream: u16at(6), streams: u16at(8), nonce: String::new() }, nonce_len))
    }
}

/// The header in front of every piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceHeader {
    /// Bytes of payload that follow.
    pub len: u32,
    /// The message's tag.
    pub tag: u64,
    /// The whole message's length.
    pub msg_len: u64,
    /// Where this piece starts in the message.
    pub offset: u64,
}

impl PieceHeader {
    /// Encodes into 32 bytes.
    pub fn encode(&self) -> [u8; HEADER] {
        let mut b = [0u8; HEADER];
        b[0..4].copy_from_slice(&PIECE_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..24].copy_from_slice(&self.msg_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b
    }
    /// Decodes 32 bytes; garbage is an error.
    pub fn decode(b: &[u8; HEADER]) -> Result<PieceHeader> {
        let u32at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u32at(0) != PIECE_MAGIC {
            return Err(Error::Remote {
                rank: usize::MAX,
                what: "net-tcp: garbage where a piece header was due".into(),
            });
        }
        Ok(PieceHeader { len: u32at(4), tag: u64at(8), msg_len: u64at(16), offset: u64at(24) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let h = Hello { rank: 7, stream: 1, streams: 4, nonce: "abc".into() };
        let e = h.encode();
        let (d, n) = Hello::decode_fixed(e[..16].try_into().unwrap()).unwrap();
        assert_eq!((d.rank, d.stream, d.streams, n), (7, 1, 4, 3));
        let mut bad = e.clone();
        bad[0] ^= 1;
        assert!(Hello::decode_fixed(bad[..16].try_into().unwrap()).is_err());
        let mut v2 = e.clone();
        v2[4] = 9;
        assert!(Hello::decode_fixed(v2[..16].try_into().unwrap()).unwrap_err().to_string().contains("version"));
        let mut long = e;
        long[10] = 0xff;
        assert!(Hello::decode_fixed(long[..16].try_into().unwrap()).is_err());
        let p = PieceHeader { len: 5, tag: 9, msg_len: 100, offset: 40 };
        assert_eq!(PieceHeader::decode(&p.encode()).unwrap(), p);
        assert!(PieceHeader::decode(&[0xAB; HEADER]).is_err());
    }
}
