//! The registration cache: memory registrations kept across messages.
//!
//! Registering memory is expensive on NICs (EFA and verbs pin the pages and program the NIC),
//! so a registration is made once for a page-aligned range and reused by every message that
//! lies inside it, on every link and communicator of the endpoint (net-libfabric) or port
//! (net-ibverbs). The cache holds the transport's registration type `M`; the transport
//! registers through the closure it passes. Each user of
//! a registration holds an `Arc`; an entry nobody holds is *idle*.
//!
//! What makes reuse safe is knowing the memory behind an address is still the same. The
//! cache knows it for the caller's buffers only while the operation that passed them runs
//! (the call borrows them): when an operation ends, the engine calls `Link::op_end`; idle
//! entries are closed and entries still in use (by another communicator's operation) are
//! marked stale: they serve their holders to the end, and no new lookup finds them
//! ([`MrCache::release_idle`]). Registrations of memory that outlives operations (OxCCL's own
//! pools) are not in the cache: each pool holds its own. Keeping registrations across
//! operations would need to know when memory is unmapped (a memory monitor, as EFA's own
//! provider cache has underneath): not done.

use std::sync::Arc;

use oxccl_core::mem::MemKind;

const PAGE: usize = 4096;

/// A registration covering a message, and the address its range starts at.
#[derive(Debug)]
pub struct Reg<M> {
    pub(crate) mr: Arc<M>,
    pub(crate) base: usize,
}

impl<M> Clone for Reg<M> {
    fn clone(&self) -> Self {
        Reg { mr: self.mr.clone(), base: self.base }
    }
}

#[derive(Debug)]
struct Entry<M> {
    start: usize,
    end: usize,
    remote: bool,
    mr: Arc<M>,
    last: u64,
    /// An operation ended while it was in use: no new lookup may find it.
    stale: bool,
}

/// Registrations by address range; see the module's text.
#[derive(Debug)]
pub(crate) struct MrCache<M> {
    entries: Vec<Entry<M>>,
    cap: usize,
    tick: u64,
    /// Lookups answered without a new registration.
    pub(crate) hits: u64,
    /// Lookups that registered.
    pub(crate) misses: u64,
}

impl<M> MrCache<M> {
    /// A cache of at most `cap` idle entries (more while they are in use).
    pub(crate) fn new(cap: usize) -> MrCache<M> {
        MrCache { entries: Vec::new(), cap: cap.max(1), tick: 0, hits: 0, misses: 0 }
    }

    /// A registration covering `len` bytes at `ptr`, memory of `kind` (for remote writes
    /// too, when `remote`); a new one made by `register(start, len, remote, kind)` over the
    /// range the cache chooses (whole pages of host memory, a device range as given).
    ///
    /// # Safety
    /// `ptr..ptr+len` is mapped memory of this process, of `kind`, that stays mapped, with
    /// the same pages, until the operation using it ends and `release_idle` has run; the
    /// closure may register the whole range it is given.
    pub(crate) unsafe fn get(
        &mut self,
        ptr: *const u8,
        len: usize,
        kind: MemKind,
        remote: bool,
        register: impl FnOnce(*const u8, usize, bool, MemKind) -> Result<M, String>,
    ) -> Result<Reg<M>, String> {
        self.tick += 1;
        let (a, b) = (ptr as usize, ptr as usize + len);
        if let Some(e) =
            self.entries.iter_mut().find(|e| !e.stale && e.start <= a && b <= e.end && (e.remote || !remote))
        {
            e.last = self.tick;
            self.hits += 1;
            return Ok(Reg { mr: e.mr.clone(), base: e.start });
        }
        self.evict();
        // The buffer says what memory it is (the executor was told; nothing is sniffed).
        let dev = match kind {
            MemKind::Device(d) => Some(d),
            MemKind::Host | MemKind::PinnedHost => None,
        };
        // Host memory by whole pages; a device allocation exactly as given (the driver
        // knows device allocations, not pages of them).
        let (start, end) = if dev.is_some() { (a, b) } else { (a / PAGE * PAGE, b.div_ceil(PAGE) * PAGE) };
        // The whole pages holding a mapped buffer are mapped; the caller keeps them so while
        // the registration may be used (this function's contract).
        let mr = Arc::new(register(start as *const u8, end - start, remote, kind)?);
        self.misses += 1;
        self.entries.push(Entry { start, end, remote, mr: mr.clone(), last: self.tick, stale: false });
        Ok(Reg { mr, base: start })
    }

    /// Drops least recently used idle entries until there is room for one more.
    fn evict(&mut self) {
        while self.entries.len() >= self.cap {
            let Some(i) = (0..self.entries.len())
                .filter(|&i| Arc::strong_count(&self.entries[i].mr) == 1)
                .min_by_key(|&i| self.entries[i].last)
            else {
                return; // every entry is in use: grow past the cap for now
            };
            self.entries.swap_remove(i);
        }
    }

    /// An operation ended: its buffers may go now, so registrations nobody holds go, and
    /// those still held are found by no new lookup. Call it with the endpoint's lock held
    /// (the registrations are closed here).
    pub(crate) fn release_idle(&mut self) {
        self.entries.retain(|e| Arc::strong_count(&e.mr) > 1);
        for e in &mut self.entries {
            e.stale = true;
        }
    }

    /// Entries held now.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registration is made once per page range and reused inside it; an operation's end
    /// closes idle entries and marks those in use stale (they serve their holders, no new
    /// lookup finds them); a remote registration serves local use, not the reverse.
    #[test]
    fn registrations_are_reused_within_an_operation_and_released_at_its_end() {
        let mut c: MrCache<usize> = MrCache::new(4);
        let mut made = Vec::new();
        let get = |c: &mut MrCache<usize>, p: usize, len: usize, remote: bool, made: &mut Vec<(usize, usize)>| {
            // SAFETY: nothing is mapped or touched: the "registration" is a number.
            unsafe {
                c.get(p as *const u8, len, MemKind::Host, remote, |s, l, _, _| {
                    made.push((s as usize, l));
                    Ok(made.len())
                })
            }
            .unwrap()
        };
        let a = get(&mut c, 0x10010, 100, false, &mut made);
        let b = get(&mut c, 0x10800, 100, false, &mut made);
        assert_eq!((a.base, *a.mr, *b.mr, made.clone()), (0x10000, 1, 1, vec![(0x10000, 4096)]), "one page, reused");
        let r = get(&mut c, 0x10010, 10, true, &mut made);
        assert_eq!(*r.mr, 2, "a local registration does not serve remote writes");
        let l = get(&mut c, 0x10020, 10, false, &mut made);
        assert_eq!((*l.mr, c.hits), (1, 2));
        drop((a, b, l));
        c.release_idle();
        assert_eq!(c.len(), 1, "the idle entry closed, the held one kept");
        let again = get(&mut c, 0x10010, 10, true, &mut made);
        assert_eq!(*again.mr, 3, "the held entry is stale: not found again");
        drop((r, again));
        c.release_idle();
        assert_eq!(c.len(), 0);
    }
}
