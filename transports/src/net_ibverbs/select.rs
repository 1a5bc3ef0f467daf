//! Which HCA ports net-ibverbs uses, and which GID of a RoCE port: pure decisions over what
//! the device reports, tested without a device.
//!
//! `OXCCL_IB_HCA` reads as NCCL's `NCCL_IB_HCA`: a comma-separated list of `name[:port]`; a
//! name matches HCAs whose name starts with it, or exactly when the list starts with `=`; a
//! list starting with `^` (then optionally `=`) names the HCAs *not* to use. No port: every
//! port of the HCA.

use std::fmt;

/// One entry of `OXCCL_IB_HCA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HcaEntry {
    /// The name, or its prefix.
    pub name: String,
    /// The port, if named.
    pub port: Option<u8>,
}

/// `OXCCL_IB_HCA`, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HcaSpec {
    /// The entries; none: every HCA.
    pub entries: Vec<HcaEntry>,
    /// Names match exactly (`=`), not by prefix.
    pub exact: bool,
    /// The entries are the HCAs not to use (`^`).
    pub exclude: bool,
}

impl HcaSpec {
    /// Parses `OXCCL_IB_HCA` (empty: every HCA), with an error naming the bad part.
    pub fn parse(text: &str) -> Result<HcaSpec, String> {
        let mut s = text.trim();
        let mut spec = HcaSpec::default();
        if let Some(rest) = s.strip_prefix('^') {
            spec.exclude = true;
            s = rest;
        }
        if let Some(rest) = s.strip_prefix('=') {
            spec.exact = true;
            s = rest;
        }
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let mut it = part.split(':');
            let name = it.next().unwrap_or_default().trim().to_string();
            if name.is_empty() || name.contains(['^', '=']) {
                return Err(format!("OXCCL_IB_HCA={text:?}: '{part}' is not a name[:port]"));
            }
            let port = match it.next() {
                None => None,
                Some(p) => Some(p.trim().parse::<u8>().ok().filter(|&p| p > 0).ok_or_else(|| {
                    format!("OXCCL_IB_HCA={text:?}: '{part}': the port must be a number from 1 to 255")
                })?),
            };
            if it.next().is_some() {
                return Err(format!("OXCCL_IB_HCA={text:?}: '{part}' is not a name[:port]"));
            }
            spec.entries.push(HcaEntry { name, port });
        }
        if (spec.exclude || spec.exact) && spec.entries.is_empty() {
            return Err(format!("OXCCL_IB_HCA={text:?}: names no HCA"));
        }
        Ok(spec)
    }

    /// Whether port `port` of HCA `hca` may be used.
    pub fn allows(&self, hca: &str, port: u8) -> bool {
        if self.entries.is_empty() {
            return true;
        }
        let hit = self.entries.iter().any(|e| {
            let name = if self.exact { hca == e.name } else { hca.starts_with(&e.name) };
            name && e.port.is_none_or(|p| p == port)
        });
        hit != self.exclude
    }
}

/// A port's link layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// InfiniBand: addressed by LID (GID index 0 unless routed).
    InfiniBand,
    /// Ethernet: RoCE, addressed by a GID.
    Ethernet,
}

/// The kind of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidType {
    /// InfiniBand.
    Ib,
    /// RoCE v1 (Ethernet frames, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable).
    RoceV2,
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidEntry {
    /// Its index in the table.
    pub index: u32,
    /// The 16 bytes.
    pub gid: [u8; 16],
    /// Its kind.
    pub kind: GidType,
}

impl GidEntry {
    /// An IPv4 address mapped into the GID (`::ffff:a.b.c.d`), as RoCE v2 over IPv4 has.
    pub fn ipv4(&self) -> Option<[u8; 4]> {
        (self.gid[..10].iter().all(|&b| b == 0) && self.gid[10..12] == [0xff, 0xff])
            .then(|| [self.gid[12], self.gid[13], self.gid[14], self.gid[15]])
    }
    fn is_zero(&self) -> bool {
        self.gid.iter().all(|&b| b == 0)
    }
    fn link_local(&self) -> bool {
        self.gid[0] == 0xfe && self.gid[1] & 0xc0 == 0x80
    }
}

impl fmt::Display for GidEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            GidType::Ib => "IB",
            GidType::RoceV1 => "RoCE v1",
            GidType::RoceV2 => "RoCE v2",
        };
        match self.ipv4() {
            Some([a, b, c, d]) => write!(f, "GID {} ({kind}, {a}.{b}.{c}.{d})", self.index),
            None => {
                let words: Vec<String> =
                    self.gid.chunks(2).map(|w| format!("{:x}", u16::from_be_bytes([w[0], w[1]]))).collect();
                write!(f, "GID {} ({kind}, {})", self.index, words.join(":"))
            }
        }
    }
}

/// The GID index a port's queue pairs use: `want` (`OXCCL_IB_GID_INDEX`) if given and in the
/// table; else on InfiniBand 0 (LID routing); else on RoCE the first RoCE v2 entry with an
/// IPv4 address, then any routable RoCE v2 entry (not link-local), then any RoCE v2 entry,
/// then RoCE v1 — as NCCL chooses since 2.21. `Err`: why none, in words.
pub fn choose_gid(link: LinkLayer, table: &[GidEntry], want: Option<u32>) -> Result<u32, String> {
    if let Some(w) = want {
        return if table.iter().any(|e| e.index == w && !e.is_zero()) || (link == LinkLayer::InfiniBand && w == 0) {
            Ok(w)
        } else {
            Err(format!("OXCCL_IB_GID_INDEX={w}: the port's GID table has no entry {w}"))
        };
    }
    if link == LinkLayer::InfiniBand {
        return Ok(0);
    }
    let valid: Vec<&GidEntry> = table.iter().filter(|e| !e.is_zero()).collect();
    let pick = valid
        .iter()
        .find(|e| e.kind == GidType::RoceV2 && e.ipv4().is_some())
        .or_else(|| valid.iter().find(|e| e.kind == GidType::RoceV2 && !e.link_local()))
        .or_else(|| valid.iter().find(|e| e.kind == GidType::RoceV2))
        .or_else(|| valid.iter().find(|e| e.kind == GidType::RoceV1));
    pick.map(|e| e.index).ok_or_else(|| "the RoCE port's GID table has no valid entry (no IP address on it?)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, port: Option<u8>) -> HcaEntry {
        HcaEntry { name: name.into(), port }
    }

    #[test]
    fn oxccl_ib_hca_reads_as_nccl_ib_hca() {
        let any = HcaSpec::parse("").unwrap();
        assert!(any.allows("mlx5_0", 1) && any.allows("rxe0", 1));
        let s = HcaSpec::parse("mlx5").unwrap();
        assert_eq!(s.entries, vec![e("mlx5", None)]);
        assert!(s.allows("mlx5_0", 1) && s.allows("mlx5_1", 2) && !s.allows("rxe0", 1));
        let s = HcaSpec::parse("=mlx5_0:1,mlx5_1:1").unwrap();
        assert!(s.exact && !s.exclude);
        assert!(s.allows("mlx5_0", 1) && !s.allows("mlx5_0", 2) && !s.allows("mlx5_10", 1));
        let s = HcaSpec::parse("^=mlx5_2").unwrap();
        assert!(s.exact && s.exclude);
        assert!(!s.allows("mlx5_2", 1) && s.allows("mlx5_20", 1) && s.allows("mlx5_0", 1));
        let s = HcaSpec::parse("^mlx5_2:1").unwrap();
        assert!(!s.allows("mlx5_2", 1) && !s.allows("mlx5_20", 1) && s.allows("mlx5_2", 2));
        for bad in ["mlx5:0", "mlx5:x", "mlx5:1:2", "^", "=", "a,^b"] {
            let err = HcaSpec::parse(bad).unwrap_err();
            assert!(err.starts_with("OXCCL_IB_HCA="), "{bad}: {err}");
        }
    }

    fn gid(index: u32, bytes: &[u8], kind: GidType) -> GidEntry {
        let mut g = [0u8; 16];
        g[16 - bytes.len()..].copy_from_slice(bytes);
        GidEntry { index, gid: g, kind }
    }

    #[test]
    fn the_gid_of_a_roce_port_is_chosen_as_nccl_does() {
        let mut link_local = [0u8; 16];
        link_local[..2].copy_from_slice(&[0xfe, 0x80]);
        link_local[15] = 7;
        let table = vec![
            GidEntry { index: 0, gid: link_local, kind: GidType::RoceV1 },
            GidEntry { index: 1, gid: link_local, kind: GidType::RoceV2 },
            gid(2, &[0xff, 0xff, 198, 18, 0, 1], GidType::RoceV1),
            gid(3, &[0xff, 0xff, 198, 18, 0, 1], GidType::RoceV2),
        ];
        assert_eq!(choose_gid(LinkLayer::Ethernet, &table, None), Ok(3));
        assert_eq!(table[3].to_string(), "GID 3 (RoCE v2, 198.18.0.1)");
        // No IPv4 entry: the first RoCE v2 that is not link-local, then any RoCE v2.
        let v6 = gid(5, &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9], GidType::RoceV2);
        assert_eq!(choose_gid(LinkLayer::Ethernet, &[table[0].clone(), table[1].clone(), v6.clone()], None), Ok(5));
        assert_eq!(choose_gid(LinkLayer::Ethernet, &table[..2], None), Ok(1));
        assert_eq!(choose_gid(LinkLayer::Ethernet, &table[..1], None), Ok(0));
        // An index asked for is taken if the table has it.
        assert_eq!(choose_gid(LinkLayer::Ethernet, &table, Some(2)), Ok(2));
        let err = choose_gid(LinkLayer::Ethernet, &table, Some(9)).unwrap_err();
        assert!(err.contains("OXCCL_IB_GID_INDEX=9"), "{err}");
        // InfiniBand: LID routing, index 0; a RoCE port with no valid entry says why.
        assert_eq!(choose_gid(LinkLayer::InfiniBand, &[], None), Ok(0));
        let err = choose_gid(LinkLayer::Ethernet, &[gid(0, &[0], GidType::RoceV2)], None).unwrap_err();
        assert!(err.contains("no valid entry"), "{err}");
    }
}
