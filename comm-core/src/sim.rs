//! A deterministic in-memory world for testing schedules and the executor with no I/O.
//!
//! Every rank's links share one [`SimWorld`]: a bounded FIFO per ordered pair of ranks. A
//! send completes when its bytes have been copied into the FIFO (so a full FIFO makes the
//! sender wait, as a full staging ring does); a receive completes when the message at the
//! head of its FIFO has been copied or combined into the destination. Tags and lengths are
//! checked exactly as a real transport checks them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::link::{Link, LinkSet, MemSlice, RecvMode, Tag, TransportKind};

struct Msg {
    tag: Tag,
    len: usize,
    // u64 words keep the payload 8-byte aligned for the reduction kernels.
    data: Vec<u64>,
}

struct World {
    n: usize,
    capacity: usize,
    fifos: Vec<VecDeque<Msg>>,
    /// Pairs whose lower rank has asked for the link (as host-staging: the lower rank
    /// creates the segment, the higher one can connect only after that).
    created: Vec<bool>,
    /// Directed pairs `from * n + to` whose sending side's link was dropped.
    closed: Vec<bool>,
}

/// The shared state of a simulated cluster.
#[derive(Clone)]
pub struct SimWorld {
    inner: Arc<Mutex<World>>,
}

impl std::fmt::Debug for SimWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimWorld")
    }
}

impl SimWorld {
    /// `n` ranks; at most `capacity` messages (>= 1) wait in each direction of each pair.
    pub fn new(n: usize, capacity: usize) -> Self {
        let fifos = (0..n * n).map(|_| VecDeque::new()).collect();
        SimWorld {
            inner: Arc::new(Mutex::new(World {
                n,
                capacity: capacity.max(1),
                fifos,
                created: vec![false; n * n],
                closed: vec![false; n * n],
            })),
        }
    }
    /// The link set of rank `me`.
    pub fn links(&self, me: usize) -> SimLinks {
        let n = self.inner.lock().expect("sim world lock").n;
        SimLinks { me, world: self.clone(), links: (0..n).map(|_| None).collect() }
    }
    /// The links of ranks `a` and `b` to each other, connected (for the link conformance
    /// suite).
    pub fn pair(&self, a: usize, b: usize) -> (SimLink, SimLink) {
        (SimLink::new(self.clone(), a, b), SimLink::new(self.clone(), b, a))
    }
    /// Messages still waiting in any FIFO (a finished, matched run leaves none).
    pub fn in_flight(&self) -> usize {
        self.inner.lock().expect("sim world lock").fifos.iter().map(|f| f.len()).sum()
    }
}

/// One rank's links in a [`SimWorld`], created on first use.
#[derive(Debug)]
pub struct SimLinks {
    me: usize,
    world: SimWorld,
    links: Vec<Option<SimLink>>,
}

impl LinkSet for SimLinks {
    fn link(&mut self, peer: usize) -> Result<Option<&mut dyn Link>> {
        if peer >= self.links.len() || peer == self.me {
            return Err(Error::Internal(format!("rank {} asked for a link to {peer}", self.me)));
        }
        if self.links[peer].is_none() {
            let mut w = self.world.inner.lock().expect("sim world lock");
            let (a, b) = (self.me.min(peer), self.me.max(peer));
            let n = w.n;
            if self.me == a {
                w.created[a * n + b] = true;
            } else if !w.created[a * n + b] {
                return Ok(None);
            }
        }
        let l = self.links[peer].get_or_insert_with(|| SimLink::new(self.world.clone(), self.me, peer));
        Ok(Some(l))
    }
}

/// A simulated link.
#[derive(Debug)]
pub struct SimLink {
    me: usize,
    peer: usize,
    world: SimWorld,
    sends: VecDeque<(Tag, MemSlice)>,
    recvs: VecDeque<(Tag, MemSlice, RecvMode)>,
    posted: [u64; 2],
    done: [u64; 2],
}

impl SimLink {
    fn new(world: SimWorld, me: usize, peer: usize) -> SimLink {
        SimLink { me, peer, world, sends: VecDeque::new(), recvs: VecDeque::new(), posted: [0, 0], done: [0, 0] }
    }
}

impl Drop for SimLink {
    fn drop(&mut self) {
        let mut w = self.world.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.n;
        w.closed[self.me * n + self.peer] = true;
    }
}

impl Link for SimLink {
    fn peer(&self) -> usize {
        self.peer
    }
    fn kind(&self) -> TransportKind {
        TransportKind::Sim
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        self.sends.push_back((tag, src));
        self.posted[0] += 1;
        Ok(self.posted[0] - 1)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        self.recvs.push_back((tag, dst, mode));
        self.posted[1] += 1;
        Ok(self.posted[1] - 1)
    }
    fn progress(&mut self) -> Result<usize> {
        let mut w = self.world.inner.lock().expect("sim world lock");
        let n = w.n;
        let mut work = 0;
        let out = self.me * n + self.peer;
        while w.fifos[out].len() < w.capacity {
            let Some((tag, src)) = self.sends.pop_front() else {
                break;
            };
            let mut data = vec![0u64; src.len().div_ceil(8)];
            // SAFETY: the poster guaranteed `src` valid until this send completes, which is now.
            unsafe { std::ptr::copy_nonoverlapping(src.ptr(), data.as_mut_ptr() as *mut u8, src.len()) };
            w.fifos[out].push_back(Msg { tag, len: src.len(), data });
            self.done[0] += 1;
            work += 1;
        }
        let inb = self.peer * n + self.me;
        while !self.recvs.is_empty() && !w.fifos[inb].is_empty() {
            let msg = w.fifos[inb].pop_front().expect("checked non-empty");
            let (tag, dst, mode) = self.recvs.pop_front().expect("checked non-empty");
            if msg.tag != tag || msg.len != dst.len() {
                return Err(Error::invalid_usage(format!(
                    "rank {} expected {} bytes with tag {:#x} from rank {}, got {} bytes with tag {:#x}",
                    self.me,
                    dst.len(),
                    tag.0,
                    self.peer,
                    msg.len,
                    msg.tag.0
                )));
            }
            let src = msg.data.as_ptr() as *const u8;
            // SAFETY: `dst` (and `local`) were promised valid for this receive; the payload
            // holds exactly `dst.len()` bytes, aligned to 8.
            unsafe {
                match mode {
                    RecvMode::Copy => std::ptr::copy_nonoverlapping(src, dst.ptr(), dst.len()),
                    RecvMode::Reduce { dtype, op, local, mem } => {
                        mem.reduce(dtype, op, dst.ptr(), local.ptr(), src, dst.len() / dtype.size())
                    }
                }
            }
            self.done[1] += 1;
            work += 1;
        }
        if !self.recvs.is_empty() && w.fifos[inb].is_empty() && w.closed[inb] {
            return Err(Error::Remote {
                rank: self.peer,
                what: format!("closed the link with {} receive(s) of rank {} waiting", self.recvs.len(), self.me),
            });
        }
        Ok(work)
    }
    fn sends_done(&self) -> u64 {
        self.done[0]
    }
    fn recvs_done(&self) -> u64 {
        self.done[1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{self, LinkPair};

    struct Sim;
    impl LinkPair for Sim {
        fn name(&self) -> String {
            "sim".into()
        }
        fn piece(&self) -> usize {
            // Whole messages: any size is one piece; boundaries around 64 KiB are as good as any.
            64 << 10
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            let (a, b) = SimWorld::new(2, 4).pair(0, 1);
            (Box::new(a), Box::new(b))
        }
    }

    #[test]
    fn the_simulator_keeps_the_link_contract() {
        conformance::run(&mut Sim);
    }
}
