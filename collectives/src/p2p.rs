//! Non-blocking sends and receives in flight (`send_async`, `recv_async`), progressed
//! independently of each other and of later calls, as MPI's `Isend`/`Irecv` and torch's
//! `isend`/`irecv` are: a rank may post a receive and then a send to the same peer, and its
//! peer the same, without either waiting for the other.
//!
//! A flight is posted to its link as soon as the link is up, in call order; a link keeps the
//! order of its messages in each direction, so order holds per peer and direction (the only
//! order point-to-point promises). Whoever runs the engine polls the flights: a blocking call
//! on its thread while it waits, else the communicator's progress thread. A call that comes
//! after a flight (a collective, another flight) waits only for it to be *posted* (so that
//! its own messages follow on the link), never for it to complete.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use oxccl_core::exec::PollStatus;
use oxccl_core::link::{LinkSet, MemSlice, RecvMode, Tag};
use oxccl_core::{Error, Result};

/// What a finished flight hands its result to (it owns the buffer: a `Work`'s slot).
pub(crate) type Finish = Box<dyn FnOnce(Result<()>) + Send>;

/// One send or receive in flight.
pub(crate) struct Flight {
    pub peer: usize,
    pub send: bool,
    /// The caller's tag (0 unless given): carried in the message's tag and checked by the
    /// receiving link, so that tags met in a different order are an error, not swapped data.
    pub user_tag: u32,
    /// The buffer, valid until `finish` runs (the flight owns it through `finish`).
    pub buf: MemSlice,
    /// Its sequence number on the link, once posted.
    posted: Option<u64>,
    /// Its index in the flight recorder.
    pub index: u64,
    /// When it was called, and when it must be done.
    pub started: Instant,
    pub deadline: Instant,
    finish: Option<Finish>,
}

impl Flight {
    /// A flight of `buf` to or from `peer`.
    pub(crate) fn new(
        (peer, send, user_tag): (usize, bool, u32),
        buf: MemSlice,
        index: u64,
        when: (Instant, Instant),
        finish: Finish,
    ) -> Self {
        Flight {
            peer,
            send,
            user_tag,
            buf,
            posted: None,
            index,
            started: when.0,
            deadline: when.1,
            finish: Some(finish),
        }
    }

    /// "send of 4096 bytes to rank 2".
    pub(crate) fn describe(&self) -> String {
        if self.send {
            format!("send of {} bytes to rank {}", self.buf.len(), self.peer)
        } else {
            format!("recv of {} bytes from rank {}", self.buf.len(), self.peer)
        }
    }
}

/// The flights of a communicator, oldest first.
#[derive(Default)]
pub(crate) struct Flights {
    list: VecDeque<Flight>,
    /// Peers found still connecting during a posting pass (their later flights wait).
    blocked: Vec<usize>,
    /// The idle clock of the flights driven alone, kept across the progress thread's short
    /// drives, so that their health checks come due as a waiting call's do.
    pub(crate) idle: IdleClock,
}

/// How long nothing has moved, and when failures elsewhere were last looked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdleClock {
    pub since: Option<Instant>,
    pub last_check: Option<Instant>,
    pub every: Duration,
}

impl Default for IdleClock {
    fn default() -> Self {
        IdleClock { since: None, last_check: None, every: crate::health::CHECK_EVERY }
    }
}

/// Point-to-point messages carry this tag: grouped ones and untagged ones `user_tag` 0.
pub(crate) fn tag(user_tag: u32) -> Tag {
    Tag::new(oxccl_core::link::opcode::SEND_RECV, 0, user_tag as u64)
}

impl Flights {
    /// True when nothing is in flight.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// True when every flight is posted to its link.
    pub(crate) fn all_posted(&self) -> bool {
        self.list.iter().all(|f| f.posted.is_some())
    }

    /// Adds a flight after the others.
    pub(crate) fn push(&mut self, f: Flight) {
        self.list.push_back(f);
    }

    /// The peers the flights wait on.
    pub(crate) fn waiting_on(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.list.iter().map(|f| f.peer).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The earliest deadline of a flight.
    pub(crate) fn earliest_deadline(&self) -> Option<Instant> {
        self.list.iter().map(|f| f.deadline).min()
    }

    /// How long the oldest flight has waited by `now` (zero: none in flight).
    pub(crate) fn longest_wait(&self, now: Instant) -> Duration {
        self.list.iter().map(|f| now.saturating_duration_since(f.started)).max().unwrap_or_default()
    }

    /// The flight whose deadline passed first, if one did by `now`.
    pub(crate) fn expired(&self, now: Instant) -> Option<&Flight> {
        self.list.iter().filter(|f| f.deadline <= now).min_by_key(|f| f.deadline)
    }

    /// Posts what can be posted, in order (a peer still connecting holds back its later
    /// flights, so order per peer holds), moves bytes, and finishes completed flights
    /// (`done` is told each one's recorder index). Never blocks.
    pub(crate) fn poll(&mut self, links: &mut dyn LinkSet, done: &mut dyn FnMut(u64)) -> Result<PollStatus> {
        let mut work = 0;
        if self.list.is_empty() {
            return Ok(PollStatus { done: true, work });
        }
        self.blocked.clear();
        for f in self.list.iter_mut().filter(|f| f.posted.is_none()) {
            if self.blocked.contains(&f.peer) {
                continue;
            }
            let Some(link) = links.link(f.peer)? else {
                self.blocked.push(f.peer);
                continue;
            };
            let tag = tag(f.user_tag);
            f.posted =
                Some(if f.send { link.post_send(tag, f.buf)? } else { link.post_recv(tag, f.buf, RecvMode::Copy)? });
            work += 1;
        }
        // Move bytes on each link with a flight posted (once per link), then finish what is
        // complete, in any order.
        let mut polled: Vec<usize> = Vec::new();
        let mut i = 0;
        while i < self.list.len() {
            let f = &self.list[i];
            let Some(seq) = f.posted else {
                i += 1;
                continue;
            };
            let link = links.link(f.peer)?.ok_or_else(|| Error::Internal(format!("link to {} vanished", f.peer)))?;
            if !polled.contains(&f.peer) {
                work += link.progress()?;
                polled.push(f.peer);
            }
            let complete = if f.send { link.sends_done() > seq } else { link.recvs_done() > seq };
            if complete {
                // The buffer goes back to its owner: the link keeps nothing about it.
                link.op_end();
                let mut f = self.list.remove(i).expect("in range");
                done(f.index);
                if let Some(finish) = f.finish.take() {
                    finish(Ok(()));
                }
                work += 1;
            } else {
                i += 1;
            }
        }
        Ok(PollStatus { done: self.list.is_empty(), work })
    }

    /// Ends every flight with `e` (the communicator failed: its links, which point at the
    /// flights' buffers, are about to go). Returns the recorder indexes of the flights.
    pub(crate) fn fail_all(&mut self, e: &Error) -> Vec<u64> {
        self.list
            .drain(..)
            .map(|mut f| {
                if let Some(finish) = f.finish.take() {
                    finish(Err(e.duplicate()));
                }
                f.index
            })
            .collect()
    }
}

impl Drop for Flights {
    fn drop(&mut self) {
        // Never leave a waiter without an answer.
        self.fail_all(&Error::Aborted("the communicator is gone".into()));
    }
}
