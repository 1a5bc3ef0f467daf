//! Schedules: what one rank does for one collective, as data.
//!
//! A schedule is a list of *steps*; each step is a set of actions that may proceed at the same
//! time. A step starts when every action of the previous step has completed: first its local
//! actions run (copy, reduce, scale), then its sends and receives are posted. The executor
//! ([`crate::exec`]) runs a schedule over any [`crate::link::Link`]s; the generators in
//! [`crate::algo`] are pure functions of `(rank, world size, sizes)`.
//!
//! Regions are byte ranges of three buffers: the caller's send buffer, the caller's receive
//! buffer, and a scratch buffer the executor provides (`Schedule::scratch_bytes` long).

/// Which buffer a region lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufId {
    /// The caller's input.
    Send,
    /// The caller's output (may be the same memory as `Send` for in-place calls).
    Recv,
    /// Executor-owned temporary memory.
    Scratch,
    /// No buffer: `off` is an absolute address (grouped point-to-point calls, whose buffers
    /// are unrelated). Built only from exposed pointers (`ptr.expose_provenance()`).
    Abs,
}

/// A byte range of one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    /// Buffer.
    pub buf: BufId,
    /// Offset in bytes.
    pub off: usize,
    /// Length in bytes.
    pub len: usize,
}

impl Region {
    /// Region of `len` elements at element offset `off`, elements `es` bytes wide.
    pub const fn elems(buf: BufId, off: usize, len: usize, es: usize) -> Region {
        Region { buf, off: off * es, len: len * es }
    }
}

/// One thing a rank does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send `src` to `peer`.
    Send {
        /// Destination rank.
        peer: usize,
        /// What to send.
        src: Region,
    },
    /// Receive from `peer` into `dst`.
    Recv {
        /// Source rank.
        peer: usize,
        /// Where the bytes land.
        dst: Region,
    },
    /// Receive from `peer` and combine: `dst = local op incoming`.
    RecvReduce {
        /// Source rank.
        peer: usize,
        /// Result.
        dst: Region,
        /// Local operand (may be `dst`).
        local: Region,
    },
    /// Local copy (skipped when source and destination are the same memory).
    Copy {
        /// Destination.
        dst: Region,
        /// Source.
        src: Region,
    },
    /// Local combine: `dst = a op b` (`a` may be `dst`).
    Reduce {
        /// Result.
        dst: Region,
        /// Left operand.
        a: Region,
        /// Right operand.
        b: Region,
    },
    /// Divide by the world size (the end of avg).
    Scale {
        /// Region to divide in place.
        dst: Region,
    },
}

impl Action {
    /// True for actions that move bytes between ranks.
    pub fn is_comm(&self) -> bool {
        matches!(self, Action::Send { .. } | Action::Recv { .. } | Action::RecvReduce { .. })
    }
    /// Every region this action touches.
    pub fn regions(&self) -> impl Iterator<Item = Region> {
        let (a, b, c) = match *self {
            Action::Send { src, .. } => (Some(src), None, None),
            Action::Recv { dst, .. } => (Some(dst), None, None),
            Action::RecvReduce { dst, local, .. } => (Some(dst), Some(local), None),
            Action::Copy { dst, src } => (Some(dst), Some(src), None),
            Action::Reduce { dst, a, b } => (Some(dst), Some(a), Some(b)),
            Action::Scale { dst } => (Some(dst), None, None),
        };
        a.into_iter().chain(b).chain(c)
    }
}

/// The ordered steps of one rank for one operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    actions: Vec<Action>,
    step_ends: Vec<usize>,
    /// Bytes of scratch memory the executor must provide.
    pub scratch_bytes: usize,
}

impl Schedule {
    /// An empty schedule.
    pub fn new() -> Self {
        Schedule::default()
    }
    /// Appends an action to the step being built.
    pub fn push(&mut self, a: Action) {
        self.actions.push(a);
    }
    /// Closes the step being built (an empty step is dropped).
    pub fn end_step(&mut self) {
        let start = self.step_ends.last().copied().unwrap_or(0);
        if self.actions.len() > start {
            self.step_ends.push(self.actions.len());
        }
    }
    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.step_ends.len()
    }
    /// The actions of step `i`.
    pub fn step(&self, i: usize) -> &[Action] {
        let start = if i == 0 { 0 } else { self.step_ends[i - 1] };
        &self.actions[start..self.step_ends[i]]
    }
    /// All actions, in order.
    pub fn actions(&self) -> &[Action] {
        &self.actions
    }
    /// Largest number of communication actions in one step (how many operations can be in
    /// flight at once).
    pub fn max_width(&self) -> usize {
        (0..self.steps()).map(|i| self.step(i).iter().filter(|a| a.is_comm()).count()).max().unwrap_or(0)
    }
    /// Appends `other`'s steps after this schedule's (scratch: the larger of the two).
    pub fn append(&mut self, other: Schedule) {
        let base = self.actions.len();
        self.actions.extend(other.actions);
        self.step_ends.extend(other.step_ends.into_iter().map(|e| e + base));
        self.scratch_bytes = self.scratch_bytes.max(other.scratch_bytes);
    }

    /// Renames peers (a schedule made for a sub-group, in its own numbering, into ranks).
    pub fn map_peers(mut self, f: impl Fn(usize) -> usize) -> Schedule {
        for a in &mut self.actions {
            match a {
                Action::Send { peer, .. } | Action::Recv { peer, .. } | Action::RecvReduce { peer, .. } => {
                    *peer = f(*peer)
                }
                _ => {}
            }
        }
        self
    }

    /// Makes every region of buffer `from` refer to buffer `to` (a later stage that works on
    /// the output buffer in place).
    pub fn map_buf(mut self, from: BufId, to: BufId) -> Schedule {
        let fix = |r: &mut Region| {
            if r.buf == from {
                r.buf = to;
            }
        };
        for a in &mut self.actions {
            match a {
                Action::Send { src, .. } => fix(src),
                Action::Recv { dst, .. } => fix(dst),
                Action::RecvReduce { dst, local, .. } => {
                    fix(dst);
                    fix(local)
                }
                Action::Copy { dst, src } => {
                    fix(dst);
                    fix(src)
                }
                Action::Reduce { dst, a, b } => {
                    fix(dst);
                    fix(a);
                    fix(b)
                }
                Action::Scale { dst } => fix(dst),
            }
        }
        self
    }

    /// Checks every region against the buffer lengths; `Err` names the first one out of bounds.
    pub fn check_bounds(&self, send_len: usize, recv_len: usize) -> Result<(), String> {
        for a in &self.actions {
            for r in a.regions() {
                let lim = match r.buf {
                    BufId::Send => send_len,
                    BufId::Recv => recv_len,
                    BufId::Scratch => self.scratch_bytes,
                    BufId::Abs => continue,
                };
                if r.off.checked_add(r.len).is_none_or(|end| end > lim) {
                    return Err(format!("{a:?}: region {r:?} exceeds buffer of {lim} bytes"));
                }
            }
        }
        Ok(())
    }
}
