//! Kinds of memory a buffer can be in, and sets of them.

use std::fmt;

/// Where a buffer's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MemKind {
    /// Ordinary (pageable) host memory.
    Host,
    /// Page-locked host memory a GPU can copy to and from directly.
    PinnedHost,
    /// Memory of GPU `ordinal`.
    Device(u32),
}

impl MemKind {
    /// The set bit of this kind in a [`MemKinds`].
    const fn bit(self) -> u8 {
        match self {
            MemKind::Host => 1,
            MemKind::PinnedHost => 2,
            MemKind::Device(_) => 4,
        }
    }
}

impl fmt::Display for MemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemKind::Host => f.write_str("host memory"),
            MemKind::PinnedHost => f.write_str("pinned host memory"),
            MemKind::Device(n) => write!(f, "memory of GPU {n}"),
        }
    }
}

/// A set of memory kinds (devices of any ordinal count as one kind).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MemKinds(u8);

impl MemKinds {
    /// Host memory, pageable or pinned: what every transport moves.
    pub const HOST: MemKinds = MemKinds(MemKind::Host.bit() | MemKind::PinnedHost.bit());
    /// Host and device memory.
    pub const ALL: MemKinds = MemKinds(Self::HOST.0 | MemKind::Device(0).bit());

    /// Whether `k` is in the set.
    pub const fn contains(self, k: MemKind) -> bool {
        self.0 & k.bit() != 0
    }
    /// The set with `k` added.
    pub const fn with(self, k: MemKind) -> MemKinds {
        MemKinds(self.0 | k.bit())
    }
}

impl fmt::Debug for MemKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut v = Vec::new();
        for (k, n) in [(MemKind::Host, "host"), (MemKind::PinnedHost, "pinned"), (MemKind::Device(0), "device")] {
            if self.contains(k) {
                v.push(n);
            }
        }
        write!(f, "{{{}}}", v.join(", "))
    }
}

impl serde::Serialize for MemKinds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(format!("{self:?}").trim_matches(['{', '}']).split(", ").filter(|x| !x.is_empty()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_of_kinds() {
        assert!(MemKinds::HOST.contains(MemKind::Host) && MemKinds::HOST.contains(MemKind::PinnedHost));
        assert!(!MemKinds::HOST.contains(MemKind::Device(3)));
        assert!(MemKinds::ALL.contains(MemKind::Device(0)) && MemKinds::ALL.contains(MemKind::Device(7)));
        assert_eq!(MemKinds::default().with(MemKind::Device(1)), MemKinds(4));
        assert_eq!(format!("{:?}", MemKinds::ALL), "{host, pinned, device}");
        assert_eq!(serde_json::to_string(&MemKinds::HOST).unwrap(), r#"["host","pinned"]"#);
        assert_eq!(MemKind::Device(2).to_string(), "memory of GPU 2");
    }
}
