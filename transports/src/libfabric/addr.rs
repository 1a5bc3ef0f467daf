//! What a rank publishes for its net-libfabric peers: its slot on the shared endpoint, its
//! piece size and RMA threshold, the provider, and the endpoint's name (`fi_getname`).
//!
//! Names are provider-specific bytes whose length varies within one provider (shm's are
//! strings holding a process id), so ranks are matched by provider name, never by the
//! length of the address.

use oxccl_core::{Error, Result};

/// Longest endpoint name accepted from a peer (libfabric names are tens of bytes).
const MAX_NAME: usize = 4096;

/// A rank's published endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    /// Its slot on its process's shared endpoint.
    pub slot: u16,
    /// The largest piece it receives.
    pub chunk: u32,
    /// The smallest message it receives by RMA write (0: none).
    pub rma_min: u64,
    /// The provider, as libfabric names it.
    pub provider: String,
    /// The endpoint's name.
    pub name: Vec<u8>,
}

/// Fixed part: slot (2), chunk (4), rma_min (8), provider name length (1).
const FIXED: usize = 15;

impl PeerAddr {
    /// The bytes stored for the peers.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let provider = &self.provider.as_bytes()[..self.provider.len().min(255)];
        let mut v = Vec::with_capacity(FIXED + provider.len() + self.name.len());
        v.extend_from_slice(&self.slot.to_le_bytes());
        v.extend_from_slice(&self.chunk.to_le_bytes());
        v.extend_from_slice(&self.rma_min.to_le_bytes());
        v.push(provider.len() as u8);
        v.extend_from_slice(provider);
        v.extend_from_slice(&self.name);
        v
    }

    /// Reads what `peer` published and checks it can talk to this rank's endpoint (of
    /// provider `mine`): same provider, a name of sane length. Errors name the peer.
    pub(crate) fn decode(peer: usize, v: &[u8], mine: &str) -> Result<PeerAddr> {
        let bad = |what: String| Error::Remote { rank: peer, what: format!("net-libfabric: {what}") };
        if v.len() < FIXED {
            return Err(bad(format!("its published address is {} bytes, too short to read", v.len())));
        }
        let plen = v[14] as usize;
        let Some(provider) = v.get(FIXED..FIXED + plen) else {
            return Err(bad("its published address is cut short".into()));
        };
        let provider = String::from_utf8_lossy(provider).into_owned();
        if provider != mine {
            return Err(bad(format!(
                "it uses provider {provider}, this rank {mine}: ranks must use the same provider \
                 (OXCCL_LIBFABRIC_PROVIDER)"
            )));
        }
        let name = v[FIXED + plen..].to_vec();
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(bad(format!("its endpoint name is {} bytes (expected 1 to {MAX_NAME})", name.len())));
        }
        Ok(PeerAddr {
            slot: u16::from_le_bytes([v[0], v[1]]),
            chunk: u32::from_le_bytes([v[2], v[3], v[4], v[5]]),
            rma_min: u64::from_le_bytes(v[6..14].try_into().expect("8 bytes")),
            provider,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(provider: &str, name: &[u8]) -> PeerAddr {
        PeerAddr { slot: 7, chunk: 1 << 20, rma_min: 1 << 16, provider: provider.into(), name: name.to_vec() }
    }

    /// shm names are strings holding a process id: two ranks of one provider may have names
    /// of different lengths (19 and 20 bytes once failed creation as "different providers").
    #[test]
    fn names_of_different_lengths_from_one_provider_are_accepted() {
        for name in [&b"fi_shm://1234:0:0\0"[..], b"fi_shm://12345:0:0\0", b"x"] {
            let a = addr("shm", name);
            assert_eq!(PeerAddr::decode(3, &a.encode(), "shm").unwrap(), a);
        }
    }

    #[test]
    fn a_different_provider_or_a_broken_record_is_named() {
        let e = PeerAddr::decode(3, &addr("tcp;ofi_rxm", b"0123456789abcdef").encode(), "shm").unwrap_err();
        assert!(
            matches!(&e, Error::Remote { rank: 3, what } if what.contains("uses provider tcp;ofi_rxm, this rank shm")),
            "{e}"
        );
        let ok = addr("shm", b"name").encode();
        for cut in [0, 5, 15, 17, 18] {
            let e = PeerAddr::decode(1, &ok[..cut], "shm").unwrap_err();
            assert!(matches!(e, Error::Remote { rank: 1, .. }), "{cut}: {e}");
        }
        let big = addr("shm", &vec![1u8; MAX_NAME + 1]).encode();
        assert!(PeerAddr::decode(1, &big, "shm").unwrap_err().to_string().contains("4097 bytes"));
    }
}
