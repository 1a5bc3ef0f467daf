//! Doorbells: how a waiting rank sleeps and how its peers wake it.
//!
//! One small shared segment per communicator and host holds a cache line per local rank:
//! a futex word `seq` and a count of `sleeping` threads. A rank about to sleep raises
//! `sleeping`, reads `seq`, checks its links one last time, then waits on `seq`. A peer that
//! publishes data or frees space calls [`Doorbells::ring`], which bumps `seq` and wakes only
//! when somebody sleeps; both sides separate their store from their load with a SeqCst fence,
//! so either the sleeper sees the new data or the peer sees the sleeper (no lost wake-up).

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

use oxccl_core::Result;

use super::shm::{futex_wait, futex_wake, Mapping};

#[repr(C, align(64))]
struct Bell {
    seq: AtomicU32,
    sleeping: AtomicU32,
}

/// The doorbells of the ranks of one host in one communicator.
#[derive(Debug)]
pub struct Doorbells {
    map: Mapping,
    n: usize,
}

impl Doorbells {
    /// Bytes needed for `n` local ranks.
    pub fn bytes(n: usize) -> usize {
        (n.max(1) * std::mem::size_of::<Bell>()).next_multiple_of(4096)
    }
    /// Creates the segment (zeroed by the kernel) for `n` local ranks.
    pub fn create(name: &str, n: usize) -> Result<Doorbells> {
        let mut map = Mapping::create(name, Self::bytes(n))?;
        // The name is removed by the last rank to map it, or by `HostStaging::close` of the
        // creator once everybody has: not when the creator's mapping goes.
        map.keep_name();
        Ok(Doorbells { map, n })
    }
    /// Maps a segment another rank created.
    pub fn open(name: &str, n: usize) -> Result<Doorbells> {
        Ok(Doorbells { map: Mapping::open(name, Self::bytes(n))?, n })
    }
    /// Doorbells private to one process (no file), for a host with a single rank.
    pub fn private() -> Result<Doorbells> {
        // A single-rank host never rings anyone; an anonymous page stands in.
        Ok(Doorbells { map: Mapping::anonymous(Self::bytes(1))?, n: 1 })
    }
    fn bell(&self, i: usize) -> &Bell {
        assert!(i < self.n, "doorbell {i} of {}", self.n);
        // SAFETY: the mapping holds n Bells, 64-byte aligned (page-aligned base); zero is a
        // valid Bell; all access is atomic.
        unsafe { &*(self.map.ptr() as *const Bell).add(i) }
    }

    /// Wakes local rank `i` if it sleeps. Call after publishing what it may wait for.
    #[inline]
    pub fn ring(&self, i: usize) {
        let b = self.bell(i);
        fence(Ordering::SeqCst);
        if b.sleeping.load(Ordering::Relaxed) != 0 {
            b.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake(&b.seq);
        }
    }

    /// Sleeps as local rank `i` for at most `timeout`, unless `ready()` (called after the
    /// rank is marked asleep) says there is something to do. Returns early when rung.
    pub fn sleep(&self, i: usize, timeout: Duration, ready: impl FnOnce() -> bool) {
        let b = self.bell(i);
        b.sleeping.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        let token = b.seq.load(Ordering::SeqCst);
        if !ready() {
            futex_wait(&b.seq, token, timeout);
        }
        b.sleeping.fetch_sub(1, Ordering::SeqCst);
    }
}
