//! The net-tcp link: one or more TCP streams to one peer, ordered delivery, striping.
//!
//! Every message is cut into pieces of at most `chunk` bytes (an empty message is one empty
//! piece). Piece number `p` of a direction (counted over all messages) travels on stream
//! `p mod streams`, so both sides know, from the lengths of the messages alone, which piece
//! each stream carries next. The receiver checks every header against that expectation: a
//! different tag or length is `InvalidUsage` (the ranks called different operations), and
//! anything else (garbage, an absurd length, a truncated stream) fails the link. Nothing on
//! the wire decides an allocation. Receives complete in posting order.

use crate::tls::Sock;
use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice, Read, Write};

use oxccl_core::link::{Link, MemSlice, RecvMode, Tag, TransportKind};
use oxccl_core::{Error, Result};

use super::wire::{PieceHeader, HEADER};

const T: oxccl_core::link::TransportKind = oxccl_core::link::TransportKind::NetTcp;

struct OutPiece {
    hdr: [u8; HEADER],
    ptr: *const u8,
    len: usize,
    op: u64,
}

struct InPiece {
    op: u64,
    offset: usize,
    len: usize,
}

struct Stream {
    sock: Sock,
    out: VecDeque<OutPiece>,
    written: usize,
    /// The front piece holds a slot of the class gate (given back once it is all written).
    taken: bool,
    /// The gate held the front piece back (the socket may well be writable: a sleeper does
    /// not wait for that, it naps and asks again).
    held: bool,
    inq: VecDeque<InPiece>,
    hdr: [u8; HEADER],
    hdr_got: usize,
    payload_got: usize,
    bounce: Vec<u64>,
}

struct RecvRec {
    tag: Tag,
    dst: MemSlice,
    mode: RecvMode,
    remaining: usize,
}

/// A link to one peer on another host.
pub struct TcpLink {
    me: usize,
    peer: usize,
    chunk: usize,
    streams: Vec<Stream>,
    send_piece: u64,
    sends: VecDeque<usize>,
    send_base: u64,
    posted: [u64; 2],
    done: [u64; 2],
    recv_piece: u64,
    recvs: VecDeque<RecvRec>,
    recv_base: u64,
    /// Bandwidth priority: the process's gate for this interface, this link's class, and
    /// whether the link counts itself busy there (sends queued).
    prio: Option<(std::sync::Arc<oxccl_core::budget::ClassGate>, oxccl_core::budget::TrafficClass)>,
    /// While a higher class is in the middle of its traffic, this link (of a lower class)
    /// keeps at most this many bytes in its sockets' queues, all streams together (not yet
    /// acknowledged): the higher class's next message waits behind that much at most, not
    /// behind megabytes of socket buffer (`OXCCL_TCP_LOWER_CLASS_QUEUE`). Until 2026-12-02
    /// it was 64 KiB per socket: with four streams, 2 ms at 1 Gbit/s.
    lower_queue: usize,
    busy: bool,
}

/// Bytes a socket holds not yet acknowledged by the peer.
fn unacked(sock: &Sock) -> usize {
    use std::os::fd::AsRawFd;
    let sock = sock.tcp();
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) on a TCP socket writes one int.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

// SAFETY: raw pointers in queued pieces are covered by the MemSlice contract (valid until the
// operation completes); the link is used by one thread at a time.
unsafe impl Send for TcpLink {}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("me", &self.me)
            .field("peer", &self.peer)
            .field("streams", &self.streams.len())
            .finish()
    }
}

fn pieces(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk).max(1)
}

impl TcpLink {
    /// Wraps connected, non-blocking streams (index = stream number).
    pub fn new(me: usize, peer: usize, chunk: usize, socks: Vec<Sock>) -> TcpLink {
        let streams = socks
            .into_iter()
            .map(|sock| Stream {
                sock,
                out: VecDeque::new(),
                written: 0,
                taken: false,
                held: false,
                inq: VecDeque::new(),
                hdr: [0; HEADER],
                hdr_got: 0,
                payload_got: 0,
                bounce: Vec::new(),
            })
            .collect();
        TcpLink {
            me,
            peer,
            chunk: chunk.max(64) / 64 * 64,
            streams,
            send_piece: 0,
            sends: VecDeque::new(),
            send_base: 0,
            posted: [0; 2],
            done: [0; 2],
            recv_piece: 0,
            recvs: VecDeque::new(),
            recv_base: 0,
            prio: None,
            lower_queue: 32 << 10,
            busy: false,
        }
    }

    /// Joins the class gate of its interface: from now on its pieces ask it before they go.
    pub fn set_priority(
        &mut self,
        gate: std::sync::Arc<oxccl_core::budget::ClassGate>,
        class: oxccl_core::budget::TrafficClass,
        lower_queue: usize,
    ) {
        gate.join(class);
        self.prio = Some((gate, class));
        self.lower_queue = lower_queue;
    }

    fn mark_busy(&mut self, on: bool) {
        if self.busy != on {
            self.busy = on;
            if let Some((g, c)) = &self.prio {
                g.set_busy(*c, on);
            }
        }
    }

    fn io_err(&self, op: &'static str, e: std::io::Error) -> Error {
        match e.kind() {
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => {
                Error::Remote { rank: self.peer, what: format!("net-tcp: connection lost during {op}: {e}") }
            }
            _ => Error::os(T, op, Some(self.peer), e),
        }
    }

    fn closed(&self) -> Error {
        Error::Remote { rank: self.peer, what: "net-tcp: the peer closed the connection".into() }
    }

    /// Stream `s`'s front piece is wholly in its socket: off the queue, its gate credit back,
    /// one piece fewer for its send.
    fn piece_sent(&mut self, s: usize) {
        let st = &mut self.streams[s];
        let Some(p) = st.out.pop_front() else { return };
        st.written = 0;
        if std::mem::take(&mut st.taken) {
            if let Some((gate, class)) = &self.prio {
                gate.done(*class);
            }
        }
        self.sends[(p.op - self.send_base) as usize] -= 1;
    }

    fn push(&mut self) -> Result<usize> {
        let mut work = 0;
        let slots = 2 * self.streams.len();
        for s in 0..self.streams.len() {
            loop {
                if self.streams[s].out.is_empty() {
                    break;
                }
                // With another class on the interface: a new piece asks the gate first, and
                // while a higher class is in the middle of its traffic, this link keeps at
                // most `lower_queue` bytes unacknowledged in its sockets (a piece may be
                // large: it then goes out in bites, as the queues drain).
                let lower = match &self.prio {
                    Some((gate, class)) if gate.contended() && gate.higher_recent(*class) => {
                        Some(self.streams.iter().map(|x| unacked(&x.sock)).sum::<usize>())
                    }
                    _ => None,
                };
                let st = &mut self.streams[s];
                let Some(p) = st.out.front() else { break };
                let total = HEADER + p.len;
                // With TLS a piece is sent once the socket has every record of it (until then
                // the link's fd is polled for writability): no one may wait on records left in
                // rustls by a send already counted done.
                if st.written == total {
                    if let Err(e) = st.sock.flush_tls() {
                        return Err(self.io_err("send", e));
                    }
                    if self.streams[s].sock.wants_write() {
                        break;
                    }
                    self.piece_sent(s);
                    work += 1;
                    continue;
                }
                let mut room = usize::MAX;
                st.held = false;
                if let Some((gate, class)) = &self.prio {
                    if gate.contended() {
                        if let Some(queued) = lower {
                            room = self.lower_queue.saturating_sub(queued);
                            if room == 0 {
                                st.held = true;
                                break;
                            }
                        }
                        if !st.taken {
                            if !gate.try_take(*class, slots, total) {
                                st.held = true;
                                break;
                            }
                            st.taken = true;
                        }
                    }
                }
                // SAFETY: ptr..ptr+len is the posted send buffer (MemSlice contract).
                let payload = unsafe { std::slice::from_raw_parts(p.ptr, p.len) };
                let r = if st.written < HEADER {
                    let body = &payload[..payload.len().min(room.saturating_sub(HEADER - st.written))];
                    st.sock.write_vectored(&[IoSlice::new(&p.hdr[st.written..]), IoSlice::new(body)])
                } else {
                    let rest = &payload[st.written - HEADER..];
                    st.sock.write(&rest[..rest.len().min(room)])
                };
                match r {
                    Ok(0) => return Err(self.closed()),
                    Ok(n) => {
                        st.written += n;
                        if st.written == total && st.sock.is_tls() {
                            // Done at the top of the loop, once its records are out.
                            continue;
                        }
                        if st.written == total {
                            self.piece_sent(s);
                            work += 1;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.io_err("send", e)),
                }
            }
        }
        while self.sends.front() == Some(&0) {
            self.sends.pop_front();
            self.send_base += 1;
            self.done[0] += 1;
        }
        if self.sends.is_empty() {
            self.mark_busy(false);
        }
        Ok(work)
    }

    fn pull(&mut self) -> Result<usize> {
        let mut work = 0;
        for s in 0..self.streams.len() {
            while let Some(exp) = self.streams[s].inq.front() {
                let (op, offset, len) = (exp.op, exp.offset, exp.len);
                let rec = &self.recvs[(op - self.recv_base) as usize];
                let (tag, dst, mode) = (rec.tag, rec.dst, rec.mode);
                let st = &mut self.streams[s];
                if st.hdr_got < HEADER {
                    match st.sock.read(&mut st.hdr[st.hdr_got..]) {
                        Ok(0) => return Err(self.closed()),
                        Ok(n) => st.hdr_got += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(self.io_err("recv", e)),
                    }
                    if st.hdr_got < HEADER {
                        continue;
                    }
                    let h = PieceHeader::decode(&st.hdr).map_err(|e| match e {
                        Error::Remote { what, .. } => Error::Remote { rank: self.peer, what },
                        e => e,
                    })?;
                    if h.tag != tag.0 || h.msg_len != dst.len() as u64 {
                        return Err(oxccl_core::link::mismatch_error(
                            self.me,
                            self.peer,
                            dst.len(),
                            tag,
                            h.msg_len,
                            Tag(h.tag),
                        ));
                    }
                    if h.offset != offset as u64 || h.len as usize != len {
                        return Err(Error::Remote {
                            rank: self.peer,
                            what: format!(
                                "net-tcp: stream {s} carried bytes {}..+{} where {offset}..+{len} were due",
                                h.offset, h.len
                            ),
                        });
                    }
                    if let RecvMode::Reduce { .. } = mode {
                        if st.bounce.len() * 8 < len {
                            st.bounce.resize(len.div_ceil(8), 0);
                        }
                    }
                }
                if st.payload_got < len {
                    let target: &mut [u8] = match mode {
                        // SAFETY: dst is valid for the whole message (MemSlice contract);
                        // offset + len <= dst.len() by construction in post_recv.
                        RecvMode::Copy => unsafe {
                            std::slice::from_raw_parts_mut(dst.ptr().add(offset + st.payload_got), len - st.payload_got)
                        },
                        // SAFETY: bounce holds at least len bytes (resized above).
                        RecvMode::Reduce { .. } => unsafe {
                            std::slice::from_raw_parts_mut(
                                (st.bounce.as_mut_ptr() as *mut u8).add(st.payload_got),
                                len - st.payload_got,
                            )
                        },
                    };
                    match st.sock.read(target) {
                        Ok(0) => return Err(self.closed()),
                        Ok(n) => st.payload_got += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(self.io_err("recv", e)),
                    }
                    if st.payload_got < len {
                        continue;
                    }
                }
                if let RecvMode::Reduce { dtype, op: rop, local, mem } = mode {
                    // SAFETY: dst and local hold the whole message; the piece starts at a
                    // multiple of the chunk (64-byte multiple) so it is element-aligned; bounce
                    // is 8-aligned and holds `len` bytes.
                    unsafe {
                        mem.reduce(
                            dtype,
                            rop,
                            dst.ptr().add(offset),
                            local.ptr().add(offset),
                            st.bounce.as_ptr() as *const u8,
                            len / dtype.size(),
                        )
                    };
                }
                st.inq.pop_front();
                st.hdr_got = 0;
                st.payload_got = 0;
                self.recvs[(op - self.recv_base) as usize].remaining -= 1;
                work += 1;
            }
        }
        while self.recvs.front().is_some_and(|r| r.remaining == 0) {
            self.recvs.pop_front();
            self.recv_base += 1;
            self.done[1] += 1;
        }
        Ok(work)
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.mark_busy(false);
        if let Some((gate, class)) = &self.prio {
            for st in &self.streams {
                if st.taken {
                    gate.done(*class);
                }
            }
            gate.leave(*class);
        }
    }
}

impl Link for TcpLink {
    fn peer(&self) -> usize {
        self.peer
    }
    fn kind(&self) -> TransportKind {
        TransportKind::NetTcp
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        let seq = self.posted[0];
        let len = src.len();
        let n = pieces(len, self.chunk);
        for i in 0..n {
            let off = i * self.chunk;
            let l = self.chunk.min(len - off.min(len));
            let hdr = PieceHeader { len: l as u32, tag: tag.0, msg_len: len as u64, offset: off as u64 }.encode();
            let s = (self.send_piece % self.streams.len() as u64) as usize;
            // SAFETY: off <= len, inside the send buffer.
            let ptr = unsafe { src.ptr().add(off.min(len)) } as *const u8;
            self.streams[s].out.push_back(OutPiece { hdr, ptr, len: l, op: seq });
            self.send_piece += 1;
        }
        self.sends.push_back(n);
        self.posted[0] += 1;
        self.mark_busy(true);
        Ok(seq)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        let seq = self.posted[1];
        let len = dst.len();
        let n = pieces(len, self.chunk);
        for i in 0..n {
            let off = (i * self.chunk).min(len);
            let s = (self.recv_piece % self.streams.len() as u64) as usize;
            self.streams[s].inq.push_back(InPiece { op: seq, offset: off, len: self.chunk.min(len - off) });
            self.recv_piece += 1;
        }
        self.recvs.push_back(RecvRec { tag, dst, mode, remaining: n });
        self.posted[1] += 1;
        Ok(seq)
    }
    fn progress(&mut self) -> Result<usize> {
        let a = if self.sends.is_empty() { 0 } else { self.push()? };
        let b = if self.recvs.is_empty() { 0 } else { self.pull()? };
        // With TLS, a send is done once TLS has its bytes: records the socket did not take
        // yet go on from here.
        let mut failed = None;
        for st in &mut self.streams {
            if st.sock.wants_write() {
                if let Err(e) = st.sock.flush_tls() {
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(self.io_err("send", e));
        }
        Ok(a + b)
    }
    fn sends_done(&self) -> u64 {
        self.done[0]
    }
    fn recvs_done(&self) -> u64 {
        self.done[1]
    }
    fn wait_fds(&self, out: &mut Vec<(std::os::fd::RawFd, bool)>) {
        use std::os::fd::AsRawFd;
        for s in &self.streams {
            if (!s.out.is_empty() && !s.held) || s.sock.wants_write() {
                out.push((s.sock.tcp().as_raw_fd(), true));
            }
            if !s.inq.is_empty() {
                out.push((s.sock.tcp().as_raw_fd(), false));
            }
        }
    }
    fn close(&mut self, deadline: std::time::Instant) {
        // Flush what this side completed from its point of view but the kernel still holds:
        // nothing to do (TCP delivers it after close); just stop writing.
        let _ = deadline;
        for s in &mut self.streams {
            s.sock.shutdown_write();
        }
    }
}
