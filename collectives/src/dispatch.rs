//! MoE dispatch without a separate exchange of the counts: an all_to_all_v whose receive
//! counts travel with the data ([`Communicator::all_to_all_v_dynamic`]).
//!
//! A MoE layer's dispatch usually takes two collectives: an all_to_all of the counts (every
//! rank must know what it will receive before it posts its receives), then the
//! all_to_all_v. Here each block leaves at once, right behind an 8-byte count: a rank posts
//! every count and block as sends that progress on their own, receives the counts, then the
//! blocks. Nobody waits for the whole counts exchange to finish before data moves, which is
//! what small per-peer messages (decode steps) pay most for.

use oxccl_core::{Element, Error, Result};

use crate::comm::Communicator;
use crate::raw::RawBuf;
use crate::work::Work;

fn raw<T: Element>(s: &[T]) -> RawBuf {
    RawBuf::host(s.as_ptr() as *const u8, s.len(), T::DTYPE)
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
        let (n, me) = (self.world_size(), self.rank());
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
        // 1. Every count, then every block, as sends that complete on their own.
        let counts_out: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let mut sends: Vec<Work<()>> = Vec::with_capacity(2 * n);
        let posted = (|| -> Result<()> {
            for k in 1..n {
                let p = (me + k) % n;
                // SAFETY: counts_out and send outlive every send: each is waited below.
                unsafe {
                    sends.push(self.send_async_raw(raw(&counts_out[p..p + 1]), p)?);
                    if send_counts[p] > 0 {
                        sends.push(self.send_async_raw(raw(&send[offs[p]..offs[p] + send_counts[p]]), p)?);
                    }
                }
            }
            Ok(())
        })();
        // Every send is waited for, also after an error: their buffers are ours.
        let finish = |sends: Vec<Work<()>>, r: Result<()>| -> Result<()> {
            let mut first = r.err();
            for w in sends {
                if let Err(e) = w.wait() {
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(()), Err)
        };
        if let Err(e) = posted {
            return finish(sends, Err(e)).map(|_| Vec::new());
        }
        // 2. The counts from every rank.
        let mut counts_in = vec![0u64; n];
        counts_in[me] = send_counts[me] as u64;
        let got = (|| -> Result<()> {
            let mut g = self.group();
            for (p, c) in counts_in.iter_mut().enumerate() {
                if p != me {
                    g.recv(std::slice::from_mut(c), p)?;
                }
            }
            g.run()
        })();
        if let Err(e) = got {
            return finish(sends, Err(e)).map(|_| Vec::new());
        }
        let recv_counts: Vec<usize> = counts_in.iter().map(|&c| c as usize).collect();
        let need = recv_counts.iter().try_fold(0usize, |a, &b| a.checked_add(b)).unwrap_or(usize::MAX);
        // 3. The blocks: into recv, or (too small) into memory of their own.
        let blocks = if need <= recv.len() {
            let mut at = 0;
            let mut own = None;
            let mut g = self.group();
            let mut rest: &mut [T] = recv;
            for (p, &c) in recv_counts.iter().enumerate() {
                let (block, tail) = std::mem::take(&mut rest).split_at_mut(c);
                rest = tail;
                if p == me {
                    own = Some((block, at));
                } else if c > 0 {
                    g.recv(block, p)?;
                }
                at += c;
            }
            if let Some((block, _)) = own {
                block.copy_from_slice(&send[offs[me]..offs[me] + send_counts[me]]);
            }
            g.run()
        } else {
            let mut spill: Vec<Vec<T>> = recv_counts
                .iter()
                .enumerate()
                .map(|(p, &c)| if p == me { Vec::new() } else { vec![T::default(); c] })
                .collect();
            let mut g = self.group();
            for (p, b) in spill.iter_mut().enumerate() {
                if !b.is_empty() {
                    g.recv(b, p)?;
                }
            }
            g.run().and(Err(Error::invalid_arg(format!(
                "all_to_all_v_dynamic: {need} elements arrived (from each rank: {recv_counts:?}), recv holds {}; \
                 they were received and dropped",
                recv.len()
            ))))
        };
        finish(sends, blocks)?;
        Ok(recv_counts)
    }
}
