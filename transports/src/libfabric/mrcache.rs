//! The registration cache: memory registrations kept across messages.
//!
//! Registering memory is expensive on NIC providers (EFA and verbs pin the pages and program
//! the NIC), so a registration is made once for a page-aligned range and reused by every
//! message that lies inside it, on every link and communicator of the endpoint. Each user of
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

use super::fabric::{Endpoint, MemIface, Mr};

const PAGE: usize = 4096;

/// A registration covering a message, and the address its range starts at.
#[derive(Debug, Clone)]
pub(crate) struct Reg {
    pub(crate) mr: Arc<Mr>,
    pub(crate) base: usize,
}

#[derive(Debug)]
struct Entry {
    start: usize,
    end: usize,
    remote: bool,
    mr: Arc<Mr>,
    last: u64,
    /// An operation ended while it was in use: no new lookup may find it.
    stale: bool,
}

/// Registrations by address range; see the module's text.
#[derive(Debug)]
pub(crate) struct MrCache {
    entries: Vec<Entry>,
    cap: usize,
    tick: u64,
    /// Lookups answered without a new registration.
    pub(crate) hits: u64,
    /// Lookups that registered.
    pub(crate) misses: u64,
}

impl MrCache {
    /// A cache of at most `cap` idle entries (more while they are in use).
    pub(crate) fn new(cap: usize) -> MrCache {
        MrCache { entries: Vec::new(), cap: cap.max(1), tick: 0, hits: 0, misses: 0 }
    }

    /// A registration covering `len` bytes at `ptr`, memory of `kind` (for remote writes
    /// too, when `remote`).
    ///
    /// # Safety
    /// `ptr..ptr+len` is mapped memory of this process, of `kind`, that stays mapped, with
    /// the same pages, until the operation using it ends and `release_idle` has run.
    pub(crate) unsafe fn get(
        &mut self,
        ep: &mut Endpoint,
        ptr: *const u8,
        len: usize,
        kind: MemKind,
        remote: bool,
    ) -> Result<Reg, String> {
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
        let mem = MemIface::of(kind);
        // Host memory by whole pages; a device allocation exactly as given (the driver
        // knows device allocations, not pages of them).
        let (start, end) = if dev.is_some() { (a, b) } else { (a / PAGE * PAGE, b.div_ceil(PAGE) * PAGE) };
        // SAFETY: the whole pages holding a mapped buffer are mapped; the caller keeps them
        // so while the registration may be used (this function's contract).
        let mr = Arc::new(unsafe { ep.register_on(start as *const u8, end - start, remote, mem) }?);
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
