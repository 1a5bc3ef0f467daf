//! MoE dispatch without a separate exchange of the counts: an all_to_all_v whose receive
//! counts travel with the data ([`Communicator::all_to_all_v_dynamic`]).
//!
//! A MoE layer's dispatch usually takes two collectives: an all_to_all of the counts (every
//! rank must know what it will receive before it posts its receives), then the
//! all_to_all_v. Here each block leaves at once, right behind an 8-byte count: a rank posts
//! every count and block as sends that progress on their own, receives the counts, then the
//! blocks. Nobody waits for the whole counts exchange to finish before data moves, which is
//! what small per-peer messages (decode steps) pay most for.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oxccl_core::link::MemSlice;
use oxccl_core::mem::MemKind;
use oxccl_core::{DataType, Element, Error, Result};

use crate::comm::Communicator;
use crate::engine::{Coll, P2p};

/// How the sends of one dispatch ended: how many, and the first error.
#[derive(Default)]
struct Ended {
    count: AtomicUsize,
    error: Mutex<Option<Error>>,
}

impl Communicator {
    /// [`Communicator::all_to_all_v`] when the receivers do not know their counts: block `k`
    /// of `send` (`send_counts[k]` elements, blocks packed in rank order) goes to rank `k`,
    /// and the blocks this rank receives land packed in rank order at the start of `recv`,
    /// which only needs to be large enough. Returns the receive counts (element `k`: from
    /// rank `k`). Each block travels right behind its count, so this takes one exchange
    /// where an all_to_all of the counts followed by all_to_all_v takes two: the path for
    /// small per-peer messages (a MoE dispatch at decode time).
    ///
    /// When `recv` is too small for what arrives, every block is still received (into
    /// memory of its own, then dropped) and the call fails with `InvalidArgument` saying how
    /// many elements were needed: the communicator stays usable.
    pub fn all_to_all_v_dynamic<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        recv: &mut [T],
    ) -> Result<Vec<usize>> {
        let n = self.world_size();
        if send_counts.len() != n {
            return Err(Error::invalid_arg(format!(
                "all_to_all_v_dynamic: {} send counts given, expected one per rank ({n})",
                send_counts.len()
            )));
        }
        let total = send_counts.iter().try_fold(0usize, |a, &b| a.checked_add(b));
        if total.is_none_or(|t| t > send.len()) {
            return Err(Error::invalid_arg(format!(
                "all_to_all_v_dynamic: the send counts need {} elements, send holds {}",
                total.map_or("more".to_string(), |t| t.to_string()),
                send.len()
            )));
        }
        let mut offs = Vec::with_capacity(n);
        let mut acc = 0;
        for &c in send_counts {
            offs.push(acc);
            acc += c;
        }
        // SAFETY: the slices outlive the call, and every operation posted on them has ended
        // (or the communicator failed, dropping its queues) when it returns.
        let r = unsafe { self.dispatch_dynamic(send, send_counts, &offs, recv) };
        if let Err(e) = &r {
            self.record(e);
        }
        let (recv_counts, too_small) = r?;
        if too_small {
            let need: usize = recv_counts.iter().sum();
            return Err(Error::invalid_arg(format!(
                "all_to_all_v_dynamic: {need} elements arrived (from each rank: {recv_counts:?}), recv holds {}; \
                 they were received and dropped",
                recv.len()
            )));
        }
        Ok(recv_counts)
    }
}

impl Communicator {
    /// The dispatch on the engine, in this call's turn: the counts and blocks go out as
    /// flights (they progress while this rank receives), then a group of receives for the
    /// counts, then one for the blocks (into `recv`, or spilled when it is too small: the
    /// second value says so), then the flights are driven until they have all ended.
    ///
    /// # Safety
    /// `send` and `recv` stay valid and untouched until this returns (it returns only once
    /// every operation on them has ended or the communicator has failed).
    unsafe fn dispatch_dynamic<T: Element>(
        &self,
        send: &[T],
        send_counts: &[usize],
        offs: &[usize],
        recv: &mut [T],
    ) -> Result<(Vec<usize>, bool)> {
        let (n, me, es) = (self.world_size(), self.rank(), std::mem::size_of::<T>());
        self.check_usable()?;
        let mut deadline = self.deadline()?;
        let t = self.shared.turns.ticket();
        let _turn = crate::shared::Turn(&self.shared.turns, t);
        self.shared.turns.wait_turn(t, &mut deadline, &self.shared.abort)?;
        let mut st = self.state()?;
        let abort = &self.shared.abort;
        let counts_out: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let ended = Arc::new(Ended::default());
        let called = Instant::now();
        let until = deadline.at(called);
        let mut flights = 0;
        for k in 1..n {
            let p = (me + k) % n;
            let block = &send[offs[p]..offs[p] + send_counts[p]];
            let header = std::slice::from_ref(&counts_out[p]);
            let parts: [(*const u8, usize); 2] =
                [(header.as_ptr() as *const u8, 8), (block.as_ptr() as *const u8, block.len() * es)];
            for (ptr, len) in parts {
                if len == 0 && ptr != header.as_ptr() as *const u8 {
                    continue;
                }
                let e = ended.clone();
                // SAFETY: counts_out and send outlive the flights: this call drives them to
                // their end (or fails the communicator, which drops them) before returning.
                let slice = unsafe { MemSlice::new(ptr as *mut u8, len) };
                st.push_flight(
                    (p, true, 0),
                    slice,
                    (called, until),
                    Box::new(move |r| {
                        if let Err(err) = r {
                            e.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(err);
                        }
                        e.count.fetch_add(1, Ordering::Release);
                    }),
                );
                flights += 1;
            }
        }
        let group = |st: &mut crate::engine::State, ops: Vec<P2p>, deadline: &mut crate::deadline::Deadline| {
            if ops.is_empty() {
                return Ok(());
            }
            let mut b = [0u8; 1];
            let p = b.as_mut_ptr();
            // SAFETY: the ops' addresses are live buffers of this call (the caller's promise).
            unsafe { st.run(&Coll::Group { ops }, DataType::U8, 0, p, p, MemKind::Host, &[], deadline, abort) }
        };
        let finished = || ended.count.load(Ordering::Acquire) >= flights;
        let result = (|| -> Result<(Vec<usize>, bool)> {
            // The counts.
            let mut counts_in = vec![0u64; n];
            counts_in[me] = send_counts[me] as u64;
            let ops: Vec<P2p> = (1..n)
                .map(|k| (me + n - k) % n)
                .map(|p| P2p { peer: p, send: false, addr: (&raw mut counts_in[p]).expose_provenance(), len: 8 })
                .collect();
            group(&mut st, ops, &mut deadline)?;
            let recv_counts: Vec<usize> = counts_in.iter().map(|&c| c as usize).collect();
            let need = recv_counts.iter().try_fold(0usize, |a, &b| a.checked_add(b)).unwrap_or(usize::MAX);
            // The blocks: into recv, or (too small) into memory of their own.
            let fits = need <= recv.len();
            let mut spill: Vec<Vec<T>> = Vec::new();
            let mut ops = Vec::with_capacity(n);
            let mut at = 0;
            for (p, &c) in recv_counts.iter().enumerate() {
                if p == me || c == 0 {
                    at += if fits { c } else { 0 };
                    continue;
                }
                let addr = if fits {
                    recv[at..at + c].as_mut_ptr().expose_provenance()
                } else {
                    spill.push(vec![T::default(); c]);
                    spill.last_mut().map_or(0, |v| v.as_mut_ptr().expose_provenance())
                };
                ops.push(P2p { peer: p, send: false, addr, len: c * es });
                at += if fits { c } else { 0 };
            }
            group(&mut st, ops, &mut deadline)?;
            if fits {
                let mine: usize = recv_counts[..me].iter().sum();
                recv[mine..mine + send_counts[me]].copy_from_slice(&send[offs[me]..offs[me] + send_counts[me]]);
            }
            Ok((recv_counts, !fits))
        })();
        // Every send ends before the buffers go back to the caller.
        let drained = st.drive_until(&finished, &mut deadline, abort);
        let flight_error = ended.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        let r = result?;
        drained?;
        match flight_error {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }
}
