//! Kinds of memory a buffer can be in, sets of them, and the local memory work done on each
//! kind ([`LocalMem`]: copy, reduce, scale, scratch), chosen by kind in one place.

use std::fmt;

use crate::dtype::{DataType, ReduceOp};
use crate::error::Result;

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
    /// The kinds in both sets.
    pub const fn and(self, other: MemKinds) -> MemKinds {
        MemKinds(self.0 & other.0)
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

/// The local memory work of the executor and of reducing receives, for one kind of memory:
/// host kernels for host memory ([`HOST`]); GPU kernels for device memory where built.
pub trait LocalMem: Send + Sync + fmt::Debug {
    /// The kinds it works on.
    fn kinds(&self) -> MemKinds;
    /// Copies `len` bytes from `src` to `dst`.
    ///
    /// # Safety
    /// Both ranges are valid memory of [`LocalMem::kinds`], `dst` writable; they do not
    /// overlap.
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize);
    /// `dst[i] = a[i] op b[i]` over `count` elements of `dtype` (avg combines as sum).
    ///
    /// # Safety
    /// The ranges are valid memory of [`LocalMem::kinds`], `dst` writable; `a` is `dst` or
    /// disjoint from it, `b` disjoint from `dst`.
    unsafe fn reduce(&self, dtype: DataType, op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, count: usize);
    /// Divides `count` elements of `dtype` at `dst` by `n` (the end of avg).
    ///
    /// # Safety
    /// The range is valid, writable memory of [`LocalMem::kinds`].
    unsafe fn scale(&self, dtype: DataType, dst: *mut u8, count: usize, n: usize);
    /// Scratch memory of at least `bytes`, of its kind, 8-byte aligned.
    fn scratch(&self, bytes: usize) -> Result<Scratch>;
}

/// Scratch memory from a [`LocalMem`]; freed when dropped.
pub struct Scratch {
    ptr: *mut u8,
    len: usize,
    _owner: Box<dyn std::any::Any + Send>,
}

// SAFETY: the pointer is to memory `_owner` keeps alive; whoever uses it follows the
// executor's contract (one operation at a time).
unsafe impl Send for Scratch {}

impl Scratch {
    /// Scratch at `ptr`, `len` bytes long, alive while `owner` is.
    ///
    /// # Safety
    /// `ptr..ptr+len` is writable memory that stays valid as long as `owner` lives.
    pub unsafe fn new(ptr: *mut u8, len: usize, owner: Box<dyn std::any::Any + Send>) -> Scratch {
        Scratch { ptr, len, _owner: owner }
    }
    /// Its start.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scratch({:p}, {})", self.ptr, self.len)
    }
}

/// Host memory's kernels (`crate::reduce`) and `memcpy`.
#[derive(Debug)]
pub struct HostMem;

/// The one value of it.
pub static HOST: HostMem = HostMem;

impl LocalMem for HostMem {
    fn kinds(&self) -> MemKinds {
        MemKinds::HOST
    }
    unsafe fn copy(&self, dst: *mut u8, src: *const u8, len: usize) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
    }
    unsafe fn reduce(&self, dtype: DataType, op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, count: usize) {
        // SAFETY: the caller's contract.
        unsafe { crate::reduce::reduce_raw(dtype, op, dst, a, b, count) }
    }
    unsafe fn scale(&self, dtype: DataType, dst: *mut u8, count: usize, n: usize) {
        // SAFETY: the caller's contract.
        unsafe { crate::reduce::scale_avg(dtype, dst, count, n) }
    }
    fn scratch(&self, bytes: usize) -> Result<Scratch> {
        let mut v = vec![0u64; bytes.div_ceil(8)];
        let ptr = v.as_mut_ptr() as *mut u8;
        // SAFETY: the vector's heap buffer does not move when the vector does; it lives as
        // long as the box that holds it.
        Ok(unsafe { Scratch::new(ptr, v.len() * 8, Box::new(v)) })
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

    #[test]
    fn host_memory_work() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [10.0f32, 20.0, 30.0];
        let mut d = [0.0f32; 3];
        let s = HOST.scratch(10).unwrap();
        assert!(s.len() >= 10 && s.ptr() as usize % 8 == 0);
        // SAFETY: in-bounds arrays of the right type.
        unsafe {
            HOST.reduce(DataType::F32, ReduceOp::Sum, d.as_mut_ptr() as *mut u8, a.as_ptr() as _, b.as_ptr() as _, 3);
            assert_eq!(d, [11.0, 22.0, 33.0]);
            HOST.scale(DataType::F32, d.as_mut_ptr() as *mut u8, 3, 11);
            assert_eq!(d, [1.0, 2.0, 3.0]);
            HOST.copy(d.as_mut_ptr() as *mut u8, b.as_ptr() as _, 8);
            assert_eq!(d, [10.0, 20.0, 3.0]);
        }
    }
}
