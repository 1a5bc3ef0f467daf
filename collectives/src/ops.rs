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

fn arg(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// Codes of the data type and operator in the argument digest of a tag.
pub(crate) fn dcode(d: DataType) -> u64 {
    DataType::ALL.iter().position(|x| *x == d).unwrap_or(0) as u64
}
pub(crate) fn ocode(o: ReduceOp) -> u64 {
    ReduceOp::ALL.iter().position(|x| *x == o).unwrap_or(0) as u64
}

impl Communicator {
    fn check_rank(&self, what: &str, r: usize) -> Result<()> {
        if r >= self.world {
            return Err(arg(format!("{what} {r} is out of range: the communicator has {} ranks", self.world)));
        }
        Ok(())
    }

    /// Runs a validated call on this thread, in call order with queued `Work`.
    pub(crate) fn call(
        &self,
        coll: Coll,
        dtype: DataType,
        count: usize,
        send: *const u8,
        recv: *mut u8,
        digest: &[u64],
    ) -> Result<()> {
        // Before anything: the public calls take host memory.
        self.check_memory(MemKind::Host)?;
        self.check_usable()?;
        let mut deadline = self.deadline()?;
        let t = self.shared.turns.ticket();
        // Releases the turn even if the operation panics (later calls then fail at once on
        // the poisoned state instead of waiting for their deadline).
        struct Turn<'a>(&'a crate::shared::Turnstile, u64);
        impl Drop for Turn<'_> {
            fn drop(&mut self) {
                self.0.done(self.1);
            }
        }
        let turn = Turn(&self.shared.turns, t);
        let r = (|| {
            self.shared.turns.wait_turn(t, &mut deadline, &self.shared.abort)?;
            let mut st = self.state()?;
            // SAFETY: the public wrappers checked the buffer lengths against the count, and
            // hold the borrows of the buffers for the whole call.
            unsafe { st.run(&coll, dtype, count, send, recv, MemKind::Host, digest, &mut deadline, &self.shared.abort) }
        })();
        drop(turn);
        if let Err(e) = &r {
            self.record(e);
        }
        r
    }

    /// Element-wise reduction across ranks: every rank gets `op` over all ranks' `send`.
    /// `send` and `recv` have equal lengths. Small messages use recursive doubling, large ones
    /// the ring (see docs/algorithms.md); `OXCCL_ALGO` overrides.
    pub fn all_reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        op.check(T::DTYPE)?;
        if send.len() != recv.len() {
            return Err(arg(format!(
                "all_reduce: send has {} elements but recv has {}; they must be equal",
                send.len(),
                recv.len()
            )));
        }
        let n = send.len();
        self.call(
            Coll::AllReduce { op },
            T::DTYPE,
            n,
            send.as_ptr() as *const u8,
            recv.as_mut_ptr() as *mut u8,
            &[dcode(T::DTYPE), n as u64, ocode(op)],
        )
    }

    /// [`Communicator::all_reduce`] in place.
    pub fn all_reduce_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        op.check(T::DTYPE)?;
        let n = buf.len();
        let p = buf.as_mut_ptr() as *mut u8;
        self.call(Coll::AllReduce { op }, T::DTYPE, n, p, p, &[dcode(T::DTYPE), n as u64, ocode(op)])
    }

    /// Copies `root`'s `send` into every rank's `recv`. Only the root reads `send` (others
    /// may pass an empty slice); at the root, `send` and `recv` have equal lengths.
    pub fn broadcast<T: Element>(&self, send: &[T], recv: &mut [T], root: usize) -> Result<()> {
        self.check_rank("root", root)?;
        let n = recv.len();
        if self.rank == root && send.len() != n {
            return Err(arg(format!("broadcast: at the root, send has {} elements but recv has {}", send.len(), n)));
        }
        let sp = if self.rank == root { send.as_ptr() as *const u8 } else { recv.as_ptr() as *const u8 };
        self.call(
            Coll::Broadcast { root },
            T::DTYPE,
            n,
            sp,
            recv.as_mut_ptr() as *mut u8,
            &[dcode(T::DTYPE), n as u64, root as u64],
        )
    }

    /// [`Communicator::broadcast`] in place: the root's `buf` is copied into everyone's.
    pub fn broadcast_in_place<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_rank("root", root)?;
        let n = buf.len();
        let p = buf.as_mut_ptr() as *mut u8;
        self.call(Coll::Broadcast { root }, T::DTYPE, n, p, p, &[dcode(T::DTYPE), n as u64, root as u64])
    }

    /// Reduces every rank's `send` into `root`'s `recv`. Only the root writes `recv` (others
    /// may pass an empty slice); at the root, `send` and `recv` have equal lengths.
    pub fn reduce<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        op.check(T::DTYPE)?;
        self.check_rank("root", root)?;
        let n = send.len();
        if self.rank == root && recv.len() != n {
            return Err(arg(format!("reduce: at the root, send has {n} elements but recv has {}", recv.len())));
        }
        let rp = if self.rank == root { recv.as_mut_ptr() as *mut u8 } else { std::ptr::null_mut() };
        self.call(
            Coll::Reduce { op, root },
            T::DTYPE,
            n,
            send.as_ptr() as *const u8,
            rp,
            &[dcode(T::DTYPE), n as u64, ocode(op), root as u64],
        )
    }

    /// [`Communicator::reduce`] in place: the root's `buf` receives the result; other ranks'
    /// `buf` is only read.
    pub fn reduce_in_place<T: Element>(&self, buf: &mut [T], op: ReduceOp, root: usize) -> Result<()> {
        op.check(T::DTYPE)?;
        self.check_rank("root", root)?;
        let n = buf.len();
        let p = buf.as_mut_ptr() as *mut u8;
        self.call(Coll::Reduce { op, root }, T::DTYPE, n, p, p, &[dcode(T::DTYPE), n as u64, ocode(op), root as u64])
    }

    /// Gathers every rank's `send` into everyone's `recv`, block `k` from rank `k`;
    /// `recv.len() == world_size * send.len()`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = send.len();
        if Some(recv.len()) != n.checked_mul(self.world) {
            return Err(arg(format!(
                "all_gather: recv has {} elements, expected {} x {n} = {}",
                recv.len(),
                self.world,
                n.saturating_mul(self.world)
            )));
        }
        self.call(
            Coll::AllGather,
            T::DTYPE,
            n,
            send.as_ptr() as *const u8,
            recv.as_mut_ptr() as *mut u8,
            &[dcode(T::DTYPE), n as u64],
        )
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
        let base = buf.as_mut_ptr();
        // SAFETY: rank * n < buf.len() (or n == 0), inside the slice.
        let own = unsafe { base.add(self.rank * n) } as *const u8;
        self.call(Coll::AllGather, T::DTYPE, n, own, base as *mut u8, &[dcode(T::DTYPE), n as u64])
    }

    /// Reduces block `k` of every rank's `send` into rank `k`'s `recv`;
    /// `send.len() == world_size * recv.len()`.
    pub fn reduce_scatter<T: Element>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        op.check(T::DTYPE)?;
        let n = recv.len();
        if Some(send.len()) != n.checked_mul(self.world) {
            return Err(arg(format!(
                "reduce_scatter: send has {} elements, expected {} x {n} = {}",
                send.len(),
                self.world,
                n.saturating_mul(self.world)
            )));
        }
        self.call(
            Coll::ReduceScatter { op },
            T::DTYPE,
            n,
            send.as_ptr() as *const u8,
            recv.as_mut_ptr() as *mut u8,
            &[dcode(T::DTYPE), n as u64, ocode(op)],
        )
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
        let base = buf.as_mut_ptr();
        // SAFETY: rank * n <= buf.len(), inside the slice (or one past its end when n == 0).
        let own = unsafe { base.add(self.rank * n) } as *mut u8;
        self.call(
            Coll::ReduceScatter { op },
            T::DTYPE,
            n,
            base as *const u8,
            own,
            &[dcode(T::DTYPE), n as u64, ocode(op)],
        )
    }

    /// Block `k` of `send` goes to rank `k`; block `k` of `recv` comes from rank `k`. Both
    /// hold `world_size` equal blocks.
    pub fn all_to_all<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        if send.len() != recv.len() || send.len() % self.world != 0 {
            return Err(arg(format!(
                "all_to_all: send ({}) and recv ({}) must have equal lengths, a multiple of the world size {}",
                send.len(),
                recv.len(),
                self.world
            )));
        }
        let n = send.len() / self.world;
        self.call(
            Coll::AllToAll,
            T::DTYPE,
            n,
            send.as_ptr() as *const u8,
            recv.as_mut_ptr() as *mut u8,
            &[dcode(T::DTYPE), n as u64],
        )
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
        let ts = check_v_counts(self, send.len(), send_counts, recv.len(), recv_counts)?;
        let coll = Coll::AllToAllV { send_counts: send_counts.to_vec(), recv_counts: recv_counts.to_vec() };
        self.call(coll, T::DTYPE, ts, send.as_ptr() as *const u8, recv.as_mut_ptr() as *mut u8, &[dcode(T::DTYPE)])
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        let mut b = [0u8; 1];
        let p = b.as_mut_ptr();
        self.call(Coll::Barrier, DataType::U8, 0, p, p, &[])
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
        Group { comm: self, ops: Vec::new(), _bufs: PhantomData }
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
    _bufs: PhantomData<&'a mut [u8]>,
}

impl<'a> Group<'a> {
    /// Adds a send of `buf` to `peer` (it may be this rank: then a receive from this rank in
    /// the same group gets it).
    pub fn send<T: Element>(&mut self, buf: &'a [T], peer: usize) -> Result<&mut Self> {
        self.comm.check_rank("peer", peer)?;
        self.ops.push(P2p {
            peer,
            send: true,
            addr: buf.as_ptr().expose_provenance(),
            len: std::mem::size_of_val(buf),
        });
        Ok(self)
    }
    /// Adds a receive into `buf` from `peer`.
    pub fn recv<T: Element>(&mut self, buf: &'a mut [T], peer: usize) -> Result<&mut Self> {
        self.comm.check_rank("peer", peer)?;
        self.ops.push(P2p {
            peer,
            send: false,
            addr: buf.as_mut_ptr().expose_provenance(),
            len: std::mem::size_of_val(buf),
        });
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
        self.comm.call(Coll::Group { ops: self.ops }, DataType::U8, 0, p, p, &[])
    }
}
