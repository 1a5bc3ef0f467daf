//! The receiving side of a [`Channel`]: the queue, heads and their checks, pieces into the
//! destination or bounce buffers, the CTS it sends, the remote writes it counts.

use crate::error::Result;
use crate::link::{MemSlice, RecvMode, Tag};
use crate::proto::verbs::{Part, Verbs, WireId};
use crate::proto::wire::{self, Cts, CTS_BYTES, LARGE_HEAD, SMALL_HEAD};

use super::{on_device, reduce_from_host, Channel, OpPart, Pool, RecvMsg};

impl<M> Channel<M> {
    /// Queues a receive; as [`Channel::queue_send`].
    pub fn queue_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> (u64, bool) {
        let (w, len) = (self.cfg.wire, dst.len());
        self.recvs.push_back(RecvMsg {
            tag,
            dst,
            mode,
            n: w.pieces(len, self.cfg.recv_chunk),
            chunk: w.piece_size(len, self.cfg.recv_chunk),
            next: 0,
            outstanding: 0,
            head_seen: false,
            mr: None,
            rdv: w.rendezvous(len, self.cfg.rma_min_recv),
            cts_sent: false,
            rma_left: 0,
            cookie: None,
        });
        self.queued(1)
    }
    /// Posts what it can of queued receives (heads, pieces, CTS).
    pub fn post_recvs<V: Verbs<Mr = M>>(&mut self, v: &mut V) -> Result<()> {
        for k in 0..self.recvs.len() {
            let seq = self.base[1] + k as u64;
            while self.recvs[k].next <= self.recvs[k].n {
                if self.inflight[1] >= self.cfg.max_inflight {
                    return Ok(());
                }
                let m = &self.recvs[k];
                if m.next == 0 && m.rdv && !m.cts_sent && !self.send_cts(v, k, seq)? {
                    return Ok(());
                }
                if !self.post_one_recv(v, k, seq)? {
                    return Ok(());
                }
                self.inflight[1] += 1;
                let m = &mut self.recvs[k];
                m.next += 1;
                m.outstanding += 1;
                if m.next == 1 && m.cookie.is_some() {
                    // RMA rendezvous: the pieces arrive as remote writes, none is posted.
                    m.next = m.n + 1;
                }
                if m.next > m.n {
                    self.to_post[1] -= 1;
                }
            }
        }
        Ok(())
    }
    /// Posts the next receive of message `k` (head or piece); false: no room now.
    fn post_one_recv<V: Verbs<Mr = M>>(&mut self, v: &mut V, k: usize, seq: u64) -> Result<bool> {
        let m = &self.recvs[k];
        if m.next == 0 {
            let Some(slot) = self.heads_in.free.pop() else { return Ok(false) };
            let p = self.heads_in.ptr(slot);
            let desc = self.heads_in.desc::<V>();
            let n = self.new_op(seq, OpPart::RecvHead(slot), false);
            // SAFETY: the head slot is ours until the completion.
            let ok = unsafe { v.recv(p, self.cfg.head_bytes, desc, WireId { seq, part: Part::Head }, n) };
            if !matches!(ok, Ok(true)) {
                self.take_op(n);
                self.heads_in.free.push(slot);
            }
            return ok;
        }
        let piece = m.next;
        let off = (piece - 1) * m.chunk;
        let len = m.chunk.min(m.dst.len() - off);
        let (p, desc, bounce) = match m.mode {
            RecvMode::Copy => {
                if piece == 1 && m.mr.is_none() {
                    let dst = m.dst;
                    let mr = self.register(v, dst, false)?;
                    self.recvs[k].mr = mr;
                }
                let m = &self.recvs[k];
                // SAFETY: off < dst.len() (piece numbering).
                (unsafe { m.dst.ptr().add(off) }, m.mr.as_ref().map_or(std::ptr::null_mut(), V::desc), None)
            }
            RecvMode::Reduce { mem, .. } => {
                let size = self.cfg.wire.piece_size(m.dst.len(), self.cfg.recv_chunk);
                // Pieces of a GPU buffer land on the GPU where the transport moves GPU memory.
                let dev = self.device_bounce(&m.dst).then(|| (mem, m.dst.kind()));
                let (slots, register) = (self.cfg.bounce_slots, self.cfg.register);
                let pool = if dev.is_some() { &mut self.dev_bounce } else { &mut self.bounce };
                let fits = pool.as_ref().map(|b| b.size >= len);
                let make = |v: &mut V, size: usize| match dev {
                    Some(d) => Pool::new_device(v, slots, size, d),
                    None => Pool::new(v, slots, size, register),
                };
                match fits {
                    None => *pool = Some(make(v, size)?),
                    // A bigger message than the pool was made for: remake it once nothing is
                    // in it.
                    Some(false) => {
                        if pool.as_ref().is_some_and(|b| b.free.len() < slots) {
                            return Ok(false);
                        }
                        *pool = Some(make(v, len)?);
                    }
                    Some(true) => {}
                }
                let b = pool.as_mut().expect("made above");
                let Some(i) = b.free.pop() else { return Ok(false) };
                (b.ptr(i), b.desc::<V>(), Some(i))
            }
        };
        let n = self.new_op(seq, OpPart::RecvPiece { piece, bounce }, false);
        // SAFETY: the destination (caller's buffer or our bounce slot) stays valid until this
        // operation completes.
        let ok = unsafe { v.recv(p, len, desc, WireId { seq, part: Part::Piece(piece) }, n) };
        if !matches!(ok, Ok(true)) {
            self.take_op(n);
            let dst = self.recvs[k].dst;
            let pool = if self.device_bounce(&dst) { self.dev_bounce.as_mut() } else { self.bounce.as_mut() };
            if let (Some(i), Some(b)) = (bounce, pool) {
                b.free.push(i);
            }
        }
        ok
    }
    /// Sends receive `k`'s CTS: where to write it (a plain copy, with RMA on both ends) or
    /// that tagged pieces are wanted. False: no room now (nothing was sent).
    fn send_cts<V: Verbs<Mr = M>>(&mut self, v: &mut V, k: usize, seq: u64) -> Result<bool> {
        if self.heads_out.free.is_empty() {
            return Ok(false);
        }
        let (dst, mode) = (self.recvs[k].dst, self.recvs[k].mode);
        let rma = self.cfg.rma_recv && matches!(mode, RecvMode::Copy);
        if rma && self.recvs[k].cookie.is_none() {
            let reg = self.register(v, dst, true)?.expect("a rendezvous message is not empty");
            let cookie = v.new_cookie();
            let m = &mut self.recvs[k];
            m.mr = Some(reg);
            m.cookie = Some(cookie);
            m.rma_left = m.n;
        }
        let m = &self.recvs[k];
        let cts = match (&m.mr, m.cookie) {
            (Some(mr), Some(cookie)) if rma => {
                let (addr, key) = v.rma_target(mr, dst);
                Cts::Rma { addr, key, cookie }
            }
            _ => Cts::Tagged,
        };
        let c = wire::write_cts(m.tag, dst.len(), cts);
        let slot = self.heads_out.free.pop().expect("checked above");
        let p = self.heads_out.ptr(slot);
        // SAFETY: the slot holds head_bytes >= CTS_BYTES.
        unsafe { std::ptr::copy_nonoverlapping(c.as_ptr(), p, CTS_BYTES) };
        let desc = self.heads_out.desc::<V>();
        let n = self.new_op(seq, OpPart::CtsOut(slot), false);
        // SAFETY: the slot is ours until this send completes.
        let ok = unsafe { v.send(p, CTS_BYTES, desc, WireId { seq, part: Part::Cts }, n) };
        if !matches!(ok, Ok(true)) {
            self.take_op(n);
            self.heads_out.free.push(slot);
            return ok;
        }
        self.inflight[1] += 1;
        let m = &mut self.recvs[k];
        m.cts_sent = true;
        m.outstanding += 1;
        Ok(true)
    }
    /// A remote write carrying `cookie` landed (`bytes`, or the error in words): one piece of
    /// an RMA rendezvous receive.
    pub fn landed(&mut self, cookie: u32, result: std::result::Result<usize, String>) -> Result<()> {
        let bytes = result.map_err(|e| self.err("remote write", e))?;
        let Some(m) = self.recvs.iter_mut().find(|m| m.cookie == Some(cookie)) else {
            return Err(self.remote(format!("a remote write (cookie {cookie}) for no receive in progress")));
        };
        if m.rma_left == 0 || bytes > m.chunk {
            let (left, chunk) = (m.rma_left, m.chunk);
            return Err(
                self.remote(format!("a remote write of {bytes} bytes with {left} pieces of at most {chunk} bytes due"))
            );
        }
        m.rma_left -= 1;
        Ok(())
    }
    pub(super) fn check_head(&mut self, seq: u64, slot: usize, bytes: usize) -> Result<()> {
        let k = (seq - self.base[1]) as usize;
        let (tag, dst, mode) = (self.recvs[k].tag, self.recvs[k].dst, self.recvs[k].mode);
        let p = self.heads_in.ptr(slot);
        let mut h = [0u8; LARGE_HEAD];
        // SAFETY: the slot holds head_bytes >= LARGE_HEAD bytes (those past `bytes` are not
        // read as the message's).
        unsafe { std::ptr::copy_nonoverlapping(p, h.as_mut_ptr(), LARGE_HEAD) };
        self.cfg.wire.check_head(&h, bytes, self.cfg.me, self.cfg.peer, tag, dst.len()).map_err(|e| self.named(e))?;
        if dst.len() <= self.cfg.wire.inline && !dst.is_empty() {
            let n = dst.len();
            // SAFETY: the slot holds SMALL_HEAD + n bytes that arrived; dst holds n bytes
            // (MemSlice contract), local likewise for a reduction. The payload starts 16
            // bytes into an 8-aligned slot.
            unsafe {
                let src = p.add(SMALL_HEAD);
                match mode {
                    RecvMode::Copy => self.cfg.copy(dst.ptr(), src, n, (on_device(&dst), false)),
                    RecvMode::Reduce { dtype, op, local, mem } => {
                        reduce_from_host(mem, &mut self.dev_tmp, (dtype, op), dst, 0, local, src, n / dtype.size())?
                    }
                }
            }
        }
        Ok(())
    }
}
