//! The sending side of a [`Channel`]: inject, the queue, heads and pieces, the CTS it waits
//! for.

use crate::error::Result;
use crate::link::{MemSlice, Tag};
use crate::proto::verbs::{Part, Verbs, WireId};
use crate::proto::wire::{self, Cts, CTS_BYTES, LARGE_HEAD, SMALL_HEAD};

use super::{on_device, Channel, OpPart, Rdv, SendMsg, CTS_SLOT, INJECT_MAX};

impl<M> Channel<M> {
    /// Whether a `len`-byte message could go whole by inject now (nothing queued ahead of it).
    pub fn can_inject(&self, len: usize) -> bool {
        len <= self.cfg.wire.inline
            && SMALL_HEAD + len <= self.cfg.inject_bytes
            && self.sends.is_empty()
            && self.failed.is_none()
    }
    /// Sends a small message whole by [`Verbs::inject`] when no send is queued ahead of it:
    /// done when this returns. It takes and gives back a gate slot at once (its bytes count
    /// for the lower classes' credit). `Some(sequence number)` if it went.
    pub fn inject<V: Verbs<Mr = M>>(&mut self, tag: Tag, src: MemSlice, v: &mut V) -> Result<Option<u64>> {
        let len = src.len();
        if !self.can_inject(len) {
            return Ok(None);
        }
        let bytes = SMALL_HEAD + len;
        let (gate, class) = (&self.cfg.gate, self.cfg.class);
        let gated = gate.contended();
        if gated && !gate.try_take(class, self.cfg.max_inflight, bytes) {
            return Ok(None);
        }
        let h = wire::small_head(tag);
        // Not zeroed (4 KiB on the latency path): only the first `bytes` are written and read.
        let mut buf = [const { std::mem::MaybeUninit::<u8>::uninit() }; INJECT_MAX];
        let p = buf.as_mut_ptr() as *mut u8;
        // SAFETY: buf holds INJECT_MAX >= inject_bytes >= bytes (clamped by `new`, checked by
        // `can_inject`); the source holds len bytes
        // (MemSlice contract). The slice covers exactly the bytes written.
        let msg = unsafe {
            std::ptr::copy_nonoverlapping(h.as_ptr(), p, SMALL_HEAD);
            self.cfg.copy(p.add(SMALL_HEAD), src.ptr() as *const u8, len, (false, on_device(&src)));
            std::slice::from_raw_parts(p as *const u8, bytes)
        };
        let r = v.inject(msg, WireId { seq: self.base[0], part: Part::Head });
        if gated {
            match r {
                // Nothing stays in flight: the slot is back at once, the credit spent.
                Ok(true) => gate.done(class),
                _ => gate.undo(class, bytes),
            }
        }
        match r {
            Ok(true) => {
                let seq = self.posted[0];
                self.posted[0] += 1;
                self.base[0] += 1;
                self.done[0] += 1;
                self.injected += 1;
                Ok(Some(seq))
            }
            Ok(false) => Ok(None),
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }
    /// Queues a send; returns its sequence number and whether it is alone in its queue (the
    /// transport may then post it at once, without waiting for the next progress call).
    pub fn queue_send(&mut self, tag: Tag, src: MemSlice) -> (u64, bool) {
        let (w, len) = (self.cfg.wire, src.len());
        self.sends.push_back(SendMsg {
            tag,
            src,
            n: w.pieces(len, self.cfg.send_chunk),
            chunk: w.piece_size(len, self.cfg.send_chunk),
            next: 0,
            outstanding: 0,
            mr: None,
            rdv: if w.rendezvous(len, self.cfg.rma_min_send) { Rdv::Want } else { Rdv::No },
        });
        self.queued(0)
    }
    /// Posts what it can of queued sends; stops where the verbs or the in-flight limit say.
    pub fn post_sends<V: Verbs<Mr = M>>(&mut self, v: &mut V) -> Result<()> {
        for k in 0..self.sends.len() {
            let seq = self.base[0] + k as u64;
            while self.sends[k].next <= self.sends[k].n {
                if self.inflight[0] >= self.cfg.max_inflight {
                    return Ok(());
                }
                let m = &self.sends[k];
                if m.next >= 1 && matches!(m.rdv, Rdv::Want | Rdv::Posted) {
                    break; // its pieces wait for the CTS; later messages may go on
                }
                let bytes = if m.next == 0 { self.cfg.wire.head_len(m.src.len()) } else { m.chunk };
                // One class alone on this NIC in the process: no gate (one atomic load).
                let class = self.cfg.class;
                let gated = self.cfg.gate.contended();
                if gated && !self.cfg.gate.try_take(class, self.cfg.max_inflight, bytes) {
                    return Ok(());
                }
                // Given back below if the verbs say no room or the post fails.
                self.gated += usize::from(gated);
                self.next_gated = gated;
                let r = self.post_one_send(v, k, seq);
                self.next_gated = false;
                if gated && !matches!(r, Ok(true)) {
                    self.gated -= 1;
                    self.cfg.gate.undo(class, bytes);
                }
                if !r? {
                    return Ok(());
                }
                self.inflight[0] += 1;
                let m = &mut self.sends[k];
                m.next += 1;
                m.outstanding += 1;
                if m.next > m.n {
                    self.to_post[0] -= 1;
                }
            }
        }
        Ok(())
    }
    /// Posts the next operation of send `k` (head or piece); false if the verbs had no room
    /// (nothing was posted).
    fn post_one_send<V: Verbs<Mr = M>>(&mut self, v: &mut V, k: usize, seq: u64) -> Result<bool> {
        let m = &self.sends[k];
        if m.next == 0 && m.rdv == Rdv::Want {
            // The CTS's receive goes first (the receiver may have sent it already).
            let Some(slot) = self.cts_in.free.pop() else { return Ok(false) };
            let p = self.cts_in.ptr(slot);
            let desc = self.cts_in.desc::<V>();
            // Not gated: the gate slot taken for this call is the head's.
            let n = self.new_op(seq, OpPart::CtsIn(slot), false);
            // SAFETY: the CTS slot is ours until the completion.
            let ok = unsafe { v.recv(p, CTS_SLOT, desc, WireId { seq, part: Part::Cts }, n) };
            if !matches!(ok, Ok(true)) {
                self.take_op(n);
                self.cts_in.free.push(slot);
                return ok;
            }
            let m = &mut self.sends[k];
            m.rdv = Rdv::Posted;
            m.outstanding += 1;
            self.inflight[0] += 1;
        }
        let gated = self.next_gated;
        let m = &self.sends[k];
        if m.next == 0 {
            let Some(slot) = self.heads_out.free.pop() else { return Ok(false) };
            let (src, len, mtag) = (m.src, m.src.len(), m.tag);
            let p = self.heads_out.ptr(slot);
            let mut h = [0u8; LARGE_HEAD];
            let (at, inline) = if len <= self.cfg.wire.inline {
                h[..SMALL_HEAD].copy_from_slice(&wire::small_head(mtag));
                (SMALL_HEAD, len)
            } else {
                h = wire::large_head(mtag, len);
                (LARGE_HEAD, 0)
            };
            // SAFETY: the head slot holds head_bytes >= at + inline; the source holds len
            // bytes (MemSlice contract) and inline <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(h.as_ptr(), p, at);
                self.cfg.copy(p.add(at), src.ptr() as *const u8, inline, (false, on_device(&src)));
            }
            let desc = self.heads_out.desc::<V>();
            let n = self.new_op(seq, OpPart::SendHead(slot), gated);
            // SAFETY: the head slot is ours until this operation completes (it returns to
            // the pool only then).
            let ok = unsafe { v.send(p, at + inline, desc, WireId { seq, part: Part::Head }, n) };
            if !matches!(ok, Ok(true)) {
                self.take_op(n);
                self.heads_out.free.push(slot);
            }
            return ok;
        }
        if m.next == 1 && m.mr.is_none() {
            let src = m.src;
            let mr = self.register(v, src, false)?;
            self.sends[k].mr = mr;
        }
        let m = &self.sends[k];
        let piece = m.next;
        let off = (piece - 1) * m.chunk;
        let len = m.chunk.min(m.src.len() - off);
        // SAFETY: off < len of the source (piece numbering).
        let p = unsafe { m.src.ptr().add(off) } as *const u8;
        let desc = m.mr.as_ref().map_or(std::ptr::null_mut(), V::desc);
        let rdv = m.rdv;
        let n = self.new_op(seq, OpPart::SendPiece, gated);
        let ok = match rdv {
            Rdv::Rma { addr, key, cookie } => {
                // SAFETY: the CTS named a registered buffer of exactly this message's length
                // (checked on arrival), so off + len stays inside it; the source stays valid
                // until the message completes, which waits for this write.
                unsafe { v.write(p, len, desc, cookie, addr + off as u64, key, n) }
            }
            // SAFETY: the caller's buffer stays valid until the message completes (MemSlice
            // contract), which waits for this operation.
            _ => unsafe { v.send(p, len, desc, WireId { seq, part: Part::Piece(piece) }, n) },
        };
        if !matches!(ok, Ok(true)) {
            self.take_op(n);
            return ok;
        }
        match rdv {
            Rdv::Rma { .. } => self.writes += 1,
            _ => self.tagged += 1,
        }
        Ok(true)
    }
    /// The CTS for send `seq` arrived in CTS slot `slot`: check it names this message.
    pub(super) fn take_cts(&mut self, seq: u64, slot: usize, bytes: usize) -> Result<()> {
        let k = (seq - self.base[0]) as usize;
        let p = self.cts_in.ptr(slot);
        let mut c = [0u8; CTS_BYTES];
        // SAFETY: the slot holds 64 >= CTS_BYTES bytes (those past `bytes` are not read as
        // the CTS's: a CTS of another length is refused).
        unsafe { std::ptr::copy_nonoverlapping(p, c.as_mut_ptr(), CTS_BYTES) };
        let m = &self.sends[k];
        let cts = wire::check_cts(&c, bytes, self.cfg.me, self.cfg.peer, m.tag, m.src.len(), self.cfg.has_rma)
            .map_err(|e| self.named(e))?;
        self.sends[k].rdv = match cts {
            Cts::Rma { addr, key, cookie } => Rdv::Rma { addr, key, cookie },
            Cts::Tagged => Rdv::Tagged,
        };
        Ok(())
    }
}
