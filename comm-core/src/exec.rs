//! The executor: runs one rank's [`Schedule`] over [`Link`]s, without blocking.
//!
//! [`Exec::poll`] does as much as it can and returns; whoever drives it (a blocking call on
//! the caller's thread, a progress thread, or the simulator) decides how to wait between
//! polls. The executor never sees a concrete transport.

use crate::dtype::{DataType, ReduceOp};
use crate::error::{Error, Result};
use crate::link::{LinkSet, MemSlice, RecvMode, Tag};
use crate::mem::{LocalMem, MemKind};
use crate::schedule::{Action, BufId, Region, Schedule};

/// Base addresses of the three buffers a schedule refers to, the kind of memory they are in,
/// and the local memory work for that kind.
#[derive(Debug, Clone, Copy)]
pub struct Bufs {
    /// Send buffer (input).
    pub send: *const u8,
    /// Receive buffer (output).
    pub recv: *mut u8,
    /// Scratch buffer, at least `Schedule::scratch_bytes` long.
    pub scratch: *mut u8,
    /// The kind of memory of all three.
    pub kind: MemKind,
    /// Copy, reduce and scale for that kind.
    pub mem: &'static dyn LocalMem,
}

impl Bufs {
    /// Buffers in host memory.
    pub fn host(send: *const u8, recv: *mut u8, scratch: *mut u8) -> Bufs {
        Bufs { send, recv, scratch, kind: MemKind::Host, mem: &crate::mem::HOST }
    }
}

// SAFETY: plain addresses; `Exec::new`'s contract keeps the memory valid.
unsafe impl Send for Bufs {}

/// Memory an executor needs, recycled between executors so that the small-message path
/// allocates nothing ([`Exec::with_mem`], [`Exec::into_mem`]).
#[derive(Debug, Default)]
pub struct ExecMem {
    pending: Vec<Pending>,
    posted: Vec<bool>,
    ahead: Vec<bool>,
    blocked: Vec<usize>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    peer: usize,
    send: bool,
    seq: u64,
    /// The step the action belongs to, and its index there.
    step: usize,
    idx: usize,
}

/// What one poll achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollStatus {
    /// The whole schedule has completed.
    pub done: bool,
    /// Units of work done by this poll (0: nothing moved; the driver may back off).
    pub work: usize,
}

/// Running state of one schedule on one rank.
#[derive(Debug)]
pub struct Exec<'s> {
    sched: &'s Schedule,
    bufs: Bufs,
    tag: Tag,
    dtype: DataType,
    op: ReduceOp,
    world: usize,
    step: usize,
    /// Which actions of the current step are posted, and how many communication actions
    /// are not yet.
    posted: Vec<bool>,
    unposted: usize,
    /// Which actions of the next step are already posted (the look-ahead), and whether all
    /// of its communication actions are.
    ahead: Vec<bool>,
    ahead_all: bool,
    /// Peers found still connecting during this posting pass.
    blocked: Vec<usize>,
    locals_done: bool,
    pending: Vec<Pending>,
}

impl<'s> Exec<'s> {
    /// Prepares to run `sched`.
    ///
    /// # Safety
    /// Every region of `sched` lies inside the corresponding buffer of `bufs`
    /// ([`Schedule::check_bounds`]), the receive and scratch buffers are writable, and all
    /// three stay valid and untouched by anyone else until the executor is done or dropped
    /// together with the links it posted to.
    pub unsafe fn new(sched: &'s Schedule, bufs: Bufs, tag: Tag, dtype: DataType, op: ReduceOp, world: usize) -> Self {
        // SAFETY: forwarded contract.
        unsafe { Self::with_mem(sched, bufs, tag, dtype, op, world, ExecMem::default()) }
    }

    /// [`Exec::new`] reusing the memory of an earlier executor (no allocation on the
    /// small-message path).
    ///
    /// # Safety
    /// As for [`Exec::new`].
    pub unsafe fn with_mem(
        sched: &'s Schedule,
        bufs: Bufs,
        tag: Tag,
        dtype: DataType,
        op: ReduceOp,
        world: usize,
        mem: ExecMem,
    ) -> Self {
        let mut pending = mem.pending;
        pending.clear();
        Exec {
            sched,
            bufs,
            tag,
            dtype,
            op,
            world,
            step: 0,
            posted: mem.posted,
            unposted: 0,
            ahead: {
                let mut a = mem.ahead;
                a.clear();
                a
            },
            ahead_all: false,
            blocked: mem.blocked,
            locals_done: false,
            pending,
        }
    }

    /// Gives back the executor's memory for the next one.
    pub fn into_mem(self) -> ExecMem {
        ExecMem { pending: self.pending, posted: self.posted, ahead: self.ahead, blocked: self.blocked }
    }

    /// The step being run (for error messages).
    pub fn step(&self) -> usize {
        self.step
    }

    /// The peers this rank is waiting on right now.
    pub fn waiting_on(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.pending.iter().map(|p| p.peer).chain(self.blocked.iter().copied()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn ptr(&self, r: Region) -> *mut u8 {
        let base = match r.buf {
            BufId::Send => self.bufs.send as *mut u8,
            BufId::Recv => self.bufs.recv,
            BufId::Scratch => self.bufs.scratch,
            BufId::Abs => return std::ptr::with_exposed_provenance_mut(r.off),
        };
        base.wrapping_add(r.off)
    }

    fn slice(&self, r: Region) -> MemSlice {
        // SAFETY: `new`'s contract: the region lies in a live buffer for the executor's life.
        unsafe { MemSlice::new_in(self.ptr(r), r.len, self.bufs.kind) }
    }

    fn run_local(&self, a: &Action) {
        let es = self.dtype.size();
        match *a {
            Action::Copy { dst, src } => {
                let (d, s) = (self.ptr(dst), self.ptr(src));
                if !std::ptr::eq(d, s) {
                    // SAFETY: regions are in bounds (`new`) and of the buffers' kind; a schedule
                    // never copies between partially overlapping regions, and identical ones
                    // are skipped above.
                    unsafe { self.bufs.mem.copy(d, s as *const u8, dst.len.min(src.len)) }
                }
            }
            Action::Reduce { dst, a, b } => {
                // SAFETY: in-bounds regions of `dtype` elements; schedules pass `a == dst` or
                // disjoint regions, and `b` never overlaps `dst`.
                unsafe {
                    self.bufs.mem.reduce(self.dtype, self.op, self.ptr(dst), self.ptr(a), self.ptr(b), dst.len / es)
                }
            }
            Action::Scale { dst } => {
                // SAFETY: in-bounds writable region of `dtype` elements.
                unsafe { self.bufs.mem.scale(self.dtype, self.ptr(dst), dst.len / es, self.world) }
            }
            _ => {}
        }
    }

    /// Posts every communication action of the step whose link is up. An action whose peer
    /// is still connecting waits, and so does every later action to that same peer (order per
    /// peer is kept); actions to other peers go ahead, so a peer that needs our sends before
    /// it can connect to us gets them.
    ///
    /// With `ahead`, the actions are the next step's, posted while the current step's are in
    /// flight: an action that touches memory an unfinished action of the current step writes
    /// (or writes memory it reads) waits, and so does every later action to its peer.
    fn post(&mut self, actions: &[Action], links: &mut dyn LinkSet, ahead: bool) -> Result<usize> {
        self.blocked.clear();
        let step = self.step + usize::from(ahead);
        let mut left = 0;
        for (i, a) in actions.iter().enumerate() {
            if if ahead { self.ahead[i] } else { self.posted[i] } {
                continue;
            }
            let peer = match *a {
                Action::Send { peer, .. } | Action::Recv { peer, .. } | Action::RecvReduce { peer, .. } => peer,
                _ => continue,
            };
            left += 1;
            if self.blocked.contains(&peer) {
                continue;
            }
            if ahead && self.conflicts_with_current(a) {
                self.blocked.push(peer);
                continue;
            }
            let Some(link) = links.link(peer)? else {
                self.blocked.push(peer);
                continue;
            };
            let p = match *a {
                Action::Send { src, .. } => {
                    Pending { peer, send: true, seq: link.post_send(self.tag, self.slice(src))?, step, idx: i }
                }
                Action::Recv { dst, .. } => {
                    let seq = link.post_recv(self.tag, self.slice(dst), RecvMode::Copy)?;
                    Pending { peer, send: false, seq, step, idx: i }
                }
                Action::RecvReduce { dst, local, .. } => {
                    let mode = RecvMode::Reduce {
                        dtype: self.dtype,
                        op: self.op,
                        local: self.slice(local),
                        mem: self.bufs.mem,
                    };
                    Pending { peer, send: false, seq: link.post_recv(self.tag, self.slice(dst), mode)?, step, idx: i }
                }
                _ => continue,
            };
            self.pending.push(p);
            left -= 1;
            if ahead {
                self.ahead[i] = true;
            } else {
                self.posted[i] = true;
                self.unposted -= 1;
            }
        }
        Ok(left)
    }

    /// Address ranges an action reads and writes (empty ranges for the ones it has not).
    fn ranges(&self, a: &Action) -> [(usize, usize); 2] {
        let r = |reg: Region| {
            let p = self.ptr(reg) as usize;
            (p, p + reg.len)
        };
        match *a {
            Action::Send { src, .. } => [r(src), (0, 0)],
            Action::Recv { dst, .. } => [(0, 0), r(dst)],
            Action::RecvReduce { dst, local, .. } => [r(local), r(dst)],
            _ => [(0, 0), (0, 0)],
        }
    }

    /// Whether `a` (of the next step) must wait for an unfinished action of the current step:
    /// one writes what the other reads or writes.
    fn conflicts_with_current(&self, a: &Action) -> bool {
        let overlap = |x: (usize, usize), y: (usize, usize)| x.0 < x.1 && y.0 < y.1 && x.0 < y.1 && y.0 < x.1;
        let [ar, aw] = self.ranges(a);
        let current = self.sched.step(self.step);
        self.pending.iter().filter(|p| p.step == self.step).any(|p| {
            let [br, bw] = self.ranges(&current[p.idx]);
            overlap(aw, br) || overlap(aw, bw) || overlap(ar, bw)
        })
    }

    /// Runs what can run now. Never blocks: a link still connecting leaves its actions for a
    /// later poll.
    pub fn poll(&mut self, links: &mut dyn LinkSet) -> Result<PollStatus> {
        let mut work = 0;
        loop {
            if self.step >= self.sched.steps() {
                return Ok(PollStatus { done: true, work });
            }
            let actions = self.sched.step(self.step);
            if !self.locals_done {
                for a in actions.iter().filter(|a| !a.is_comm()) {
                    self.run_local(a);
                    work += 1;
                }
                self.locals_done = true;
                // What the look-ahead already posted of this step stays posted.
                let pre = self.ahead.len() == actions.len();
                std::mem::swap(&mut self.posted, &mut self.ahead);
                if !pre {
                    self.posted.clear();
                    self.posted.resize(actions.len(), false);
                }
                self.unposted = actions.iter().zip(&self.posted).filter(|(a, p)| a.is_comm() && !**p).count();
                self.ahead.clear();
                self.ahead_all = false;
            }
            if self.unposted > 0 {
                self.post(actions, links, false)?;
            }
            let mut i = 0;
            while i < self.pending.len() {
                let p = self.pending[i];
                let link =
                    links.link(p.peer)?.ok_or_else(|| Error::Internal(format!("link to {} vanished", p.peer)))?;
                work += link.progress()?;
                let done = if p.send { link.sends_done() > p.seq } else { link.recvs_done() > p.seq };
                if done {
                    self.pending.swap_remove(i);
                    work += 1;
                } else {
                    i += 1;
                }
            }
            let step = self.step;
            if self.unposted > 0 || self.pending.iter().any(|p| p.step == step) {
                // Keep the wire busy across the step boundary: post what of the next step does
                // not depend on this one. Only when this step is wholly posted (order per
                // peer) and the next has no local action (those run before its posts).
                if self.unposted == 0 && !self.ahead_all && step + 1 < self.sched.steps() {
                    let next = self.sched.step(step + 1);
                    if next.iter().all(|a| a.is_comm()) {
                        if self.ahead.len() != next.len() {
                            self.ahead.clear();
                            self.ahead.resize(next.len(), false);
                        }
                        self.ahead_all = self.post(next, links, true)? == 0;
                        // Nothing of this step is blocked (it is wholly posted); what the
                        // look-ahead holds back is not what this rank waits on.
                        self.blocked.clear();
                    }
                }
                return Ok(PollStatus { done: false, work });
            }
            self.step += 1;
            self.locals_done = false;
        }
    }
}
