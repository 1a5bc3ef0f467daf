//! The collective and point-to-point calls, with their argument checks.
//!
//! Counts are the lengths of the slices passed in. Every check happens before any byte
//! moves; a failed check returns `InvalidArgument` and leaves the communicator usable. A
//! zero-length operation is a valid no-op on every rank.

use std::marker::PhantomData;

use oxccl_core::mem::MemKind;
use oxccl_core::{DataType, Element, Error, ReduceOp, Result};

use crate::comm::Communicator;
use crate::engine::{Coll, P2p};
use crate::raw::{Plan, RawBuf, RawCall};

/// A slice as a raw buffer (host memory).
fn of<T: Element>(s: &[T]) -> RawBuf {
    RawBuf::host(s.as_ptr() as *const u8, s.len(), T::DTYPE)
}

/// A mutable slice as a raw buffer (host memory).
fn of_mut<T: Element>(s: &mut [T]) -> RawBuf {
    RawBuf::host(s.as_mut_ptr() as *const u8, s.len(), T::DTYPE)
}

fn arg(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Codes of the data type and operator in the argument digest of a tag.
pub(crate) fn dcode(d: DataType) -> u64 {
    d.index() as u64
}
pub(crate) fn ocode(o: ReduceOp) -> u64 {
    o.index() as u64
}

impl Communicator {
    fn check_rank(&self, what: &str, r: usize) -> Result<()> {
        if r >= self.world {
            return Err(arg(format!("{what} {r} is out of range: the communicator has {} ranks", self.world)));
        }
        Ok(())
    }

    /// Runs a validated call on this thread, in call order with queued `Work`.
    pub(crate) fn call(&self, plan: Plan) -> Result<()> {
        let Plan { coll, dtype, count, send, recv, kind, digest } = plan;
        // Before anything: can this communicator's transports move this memory?
        self.check_memory(kind)?;
        self.check_usable()?;
        let mut deadline = self.deadline()?;
        let t = self.shared.turns.ticket();
        let turn = crate::shared::Turn(&self.shared.turns, t);
        let r = (|| {
            self.shared.turns.wait_turn(t, &mut deadline, &self.shared.abort)?;
            let mut st = self.state()?;
            // SAFETY: the public wrappers checked the buffer lengths against the count, and
            // hold the borrows of the buffers for the whole call.
            unsafe {
                st.run(&coll, dtype, count, send, recv, kind, digest.as_slice(), &mut deadline, &self.shared.abort)
            }
        })();
        drop(turn);
        if let Err(e) = &r {
            self.record(e);
        }
        r
    }

    /// Runs a typed call through the same checks as raw ones ([`Communicator::plan`]).
    #[inline(always)]
    fn typed(&self, call: RawCall, send: RawBuf, recv: RawBuf) -> Result<()> {
        self.call(self.plan(&call, &send, &recv)?)
    }

    /// Element-wise reduction across ranks: every rank gets `op` over all ranks' `send`.
    /// `send` and `recv` have equal lengths. Small messages use recursive doubling, large ones
    /// the ring (see docs/algorithms.md); `OXCCL_ALGO` overrides.
    pub fn all_reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.typed(RawCall::AllReduce { op }, of(send), of_mut(recv))
    }

    /// [`Communicator::all_reduce`] in place.
    pub fn all_reduce_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let b = of_mut(buf);
        self.typed(RawCall::AllReduce { op }, b, b)
    }

    /// Copies `root`'s `send` into every rank's `recv`. Only the root reads `send` (others
    /// may pass an empty slice); at the root, `send` and `recv` have equal lengths.
    pub fn broadcast<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.typed(RawCall::Broadcast { root }, of(send), of_mut(recv))
    }

    /// [`Communicator::broadcast`] in place: the root's `buf` is copied into everyone's.
    pub fn broadcast_in_place<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let b = of_mut(buf);
        self.typed(RawCall::Broadcast { root }, b, b)
    }

    /// Copies the data that every rank in `roots` holds in `send` (the same on each) into
    /// every rank's `recv`, with every root sending a share: the buffer is cut into stripes,
    /// each root sends its own stripes, and the receivers relay them to each other, so every
    /// sender NIC and every link carries part of it instead of one root's NIC carrying all of
    /// it (the weight refit of RL, where every trainer rank holds the new weights). When the
    /// roots span several hosts, one root per host sends. Every rank passes the same `roots`
    /// in the same order; non-roots may pass an empty `send`. [`Communicator::explain`] shows
    /// the stripes and relay order of the last call; [`Communicator::plan_broadcast_from_roots`]
    /// shows them before.
    pub fn broadcast_from_roots<T: Element>(&self, send: &[T], recv: &mut [T], roots: &[usize]) -> Result<()> {
        self.typed(RawCall::BroadcastRoots { roots: roots.to_vec() }, of(send), of_mut(recv))
    }

    /// [`Communicator::broadcast_from_roots`] in place: the roots' `buf` goes to everyone's.
    pub fn broadcast_from_roots_in_place<T: Element>(&self, buf: &mut [T], roots: &[usize]) -> Result<()> {
        let b = of_mut(buf);
        self.typed(RawCall::BroadcastRoots { roots: roots.to_vec() }, b, b)
    }

    /// The stripes and relay chains a [`Communicator::broadcast_from_roots`] of `count`
    /// elements from `roots` would use, from where the ranks are; nothing moves.
    pub fn plan_broadcast_from_roots(&self, count: usize, roots: &[usize]) -> Result<oxccl_core::algo::StripedPlan> {
        let probe = RawBuf::host(std::ptr::NonNull::<u8>::dangling().as_ptr(), 0, DataType::U8);
        self.plan(&RawCall::BroadcastRoots { roots: roots.to_vec() }, &probe, &probe)?;
        let st = self.state()?;
        Ok(oxccl_core::algo::striped_plan(st.hosts(), count, roots))
    }

    /// Reduces every rank's `send` into `root`'s `recv`. Only the root writes `recv` (others
    /// may pass an empty slice); at the root, `send` and `recv` have equal lengths.
    pub fn reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        self.typed(RawCall::Reduce { op, root }, of(send), of_mut(recv))
    }

    /// [`Communicator::reduce`] in place: the root's `buf` receives the result; other ranks'
    /// `buf` is only read.
    pub fn reduce_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        let b = of_mut(buf);
        self.typed(RawCall::Reduce { op, root }, b, b)
    }

    /// Gathers every rank's `send` into everyone's `recv`, block `k` from rank `k`;
    /// `recv.len() == world_size * send.len()`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.typed(RawCall::AllGather, of(send), of_mut(recv))
    }

    /// [`Communicator::all_gather`] in place: this rank's block of `buf` (block `rank`) is its
    /// input; `buf.len()` is a multiple of the world size.
    pub fn all_gather_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        if buf.len() % self.world != 0 {
            return Err(arg(format!(
                "all_gather_in_place: {} elements do not split into {} equal blocks",
                buf.len(),
                self.world
            )));
        }
        let n = buf.len() / self.world;
        let all = of_mut(buf);
        let own = RawBuf { addr: all.addr + self.rank * n * T::DTYPE.size(), count: n, ..all };
        self.typed(RawCall::AllGather, own, all)
    }

    /// Reduces block `k` of every rank's `send` into rank `k`'s `recv`;
    /// `send.len() == world_size * recv.len()`.
    pub fn reduce_scatter<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        self.typed(RawCall::ReduceScatter { op }, of(send), of_mut(recv))
    }

    /// [`Communicator::reduce_scatter`] in place: the result lands in block `rank` of `buf`.
    pub fn reduce_scatter_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        op.check(T::DTYPE)?;
        if buf.len() % self.world != 0 {
            return Err(arg(format!(
                "reduce_scatter_in_place: {} elements do not split into {} equal blocks",
                buf.len(),
                self.world
            )));
        }
        let n = buf.len() / self.world;
        let all = of_mut(buf);
        let own = RawBuf { addr: all.addr + self.rank * n * T::DTYPE.size(), count: n, ..all };
        self.typed(RawCall::ReduceScatter { op }, all, own)
    }

    /// Block `k` of `send` goes to rank `k`; block `k` of `recv` comes from rank `k`. Both
    /// hold `world_size` equal blocks.
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.typed(RawCall::AllToAll, of(send), of_mut(recv))
    }

    /// [`Communicator::all_to_all`] in place (the input is copied once into a temporary).
    pub fn all_to_all_in_place<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        let copy = buf.to_vec();
        self.all_to_all(&copy, buf)
    }

    /// All-to-all with per-peer counts (MoE dispatch): `send_counts[k]` elements go to rank
    /// `k`, packed in rank order from the start of `send`; `recv_counts[k]` come from rank
    /// `k`, packed likewise in `recv`. Each pair must agree (`send_counts[k]` on rank `r`
    /// equals `recv_counts[r]` on rank `k`): a receiver that gets a different length fails
    /// with `InvalidUsage` naming both sizes, and the communicator is then unusable on every
    /// rank (the sender's next operation fails at its deadline at the latest).
    pub fn all_to_all_v<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
        recv_counts: &[usize],
    ) -> Result<()> {
        let call = RawCall::AllToAllV { send_counts: send_counts.to_vec(), recv_counts: recv_counts.to_vec() };
        self.typed(call, of(send), of_mut(recv))
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        self.typed(RawCall::Barrier, RawBuf::none(DataType::U8), RawBuf::none(DataType::U8))
    }

    /// Sends `buf` to `peer`, which posts a matching [`Communicator::recv`] of equal length.
    /// Messages between two ranks match in order.
    pub fn send<T: Element>(&self, buf: &[T], peer: usize) -> Result<()> {
        let mut g = self.group();
        g.send(buf, peer)?;
        g.run()
    }

    /// Receives from `peer` into `buf` (the message must be exactly `buf`'s length).
    pub fn recv<T: Element>(&self, buf: &mut [T], peer: usize) -> Result<()> {
        let mut g = self.group();
        g.recv(buf, peer)?;
        g.run()
    }

    /// Starts a batch of sends and receives that are posted together (as
    /// `ncclGroupStart/End`): pairs of ranks that send to each other in one group do not
    /// deadlock, whatever the order.
    pub fn group(&self) -> Group<'_> {
        Group { comm: self, ops: Vec::new(), kind: None, _bufs: PhantomData }
    }
}

/// Checks all_to_all_v's counts against the world and the buffers; returns the send total.
pub(crate) fn check_v_counts(
    c: &Communicator,
    send_len: usize,
    send_counts: &[usize],
    recv_len: usize,
    recv_counts: &[usize],
) -> Result<usize> {
    if send_counts.len() != c.world || recv_counts.len() != c.world {
        return Err(arg(format!(
            "all_to_all_v: {} send counts and {} recv counts given, expected one per rank ({})",
            send_counts.len(),
            recv_counts.len(),
            c.world
        )));
    }
    let total = |c: &[usize]| c.iter().try_fold(0usize, |a, &b| a.checked_add(b));
    let (Some(ts), Some(tr)) = (total(send_counts), total(recv_counts)) else {
        return Err(arg("all_to_all_v: the counts add up to more than any buffer can hold".into()));
    };
    if send_len < ts || recv_len < tr {
        return Err(arg(format!(
            "all_to_all_v: counts need {ts} send and {tr} recv elements, buffers hold {} and {}",
            send_len, recv_len
        )));
    }
    if send_counts[c.rank] != recv_counts[c.rank] {
        return Err(arg(format!(
            "all_to_all_v: this rank sends itself {} elements but expects {}",
            send_counts[c.rank], recv_counts[c.rank]
        )));
    }
    Ok(ts)
}

/// A batch of point-to-point operations, posted together by [`Group::run`].
#[derive(Debug)]
pub struct Group<'a> {
    comm: &'a Communicator,
    ops: Vec<P2p>,
    /// The kind of memory of its buffers (one kind per group), once a buffer was added.
    kind: Option<MemKind>,
    _bufs: PhantomData<&'a mut [u8]>,
}

impl<'a> Group<'a> {
    /// Adds a send of `buf` to `peer` (it may be this rank: then a receive from this rank in
    /// the same group gets it).
    pub fn send<T: Element>(&mut self, buf: &'a [T], peer: usize) -> Result<&mut Self> {
        let len = std::mem::size_of_val(buf);
        self.push(P2p { peer, send: true, addr: buf.as_ptr().expose_provenance(), len }, MemKind::Host)
    }
    /// Adds a receive into `buf` from `peer`.
    pub fn recv<T: Element>(&mut self, buf: &'a mut [T], peer: usize) -> Result<&mut Self> {
        let len = std::mem::size_of_val(buf);
        self.push(P2p { peer, send: false, addr: buf.as_mut_ptr().expose_provenance(), len }, MemKind::Host)
    }

    pub(crate) fn push(&mut self, op: P2p, kind: MemKind) -> Result<&mut Self> {
        self.comm.check_rank("peer", op.peer)?;
        match self.kind {
            Some(k) if k != kind && op.len > 0 => {
                return Err(arg(format!(
                    "group: a buffer in {kind} after buffers in {k}: the buffers of one group must be in one kind of \
                     memory (run two groups)"
                )));
            }
            None if op.len > 0 => self.kind = Some(kind),
            _ => {}
        }
        self.ops.push(op);
        Ok(self)
    }
    /// Posts everything and waits until all of it is done.
    pub fn run(self) -> Result<()> {
        let me = self.comm.rank;
        let selfs: Vec<usize> = self.ops.iter().filter(|p| p.peer == me && p.send).map(|p| p.len).collect();
        let selfr: Vec<usize> = self.ops.iter().filter(|p| p.peer == me && !p.send).map(|p| p.len).collect();
        if selfs != selfr {
            return Err(arg(format!(
                "group: sends to self ({selfs:?} bytes) and receives from self ({selfr:?} bytes) do not match"
            )));
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        let mut b = [0u8; 1];
        let p = b.as_mut_ptr();
        let coll = Coll::Group { ops: self.ops };
        self.comm.call(Plan {
            coll,
            dtype: DataType::U8,
            count: 0,
            send: p,
            recv: p,
            kind: self.kind.unwrap_or(MemKind::Host),
            digest: Default::default(),
        })
    }
}
