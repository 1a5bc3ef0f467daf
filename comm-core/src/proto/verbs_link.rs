//! A [`Link`] made of the protocol core's [`Channel`] and verbs that report completions as
//! events ([`EventVerbs`]): in-memory verbs in the tests, RC queue pairs in net-ibverbs.

use crate::error::{Error, Result};
use crate::link::{Link, MemSlice, RecvMode, Tag, TransportKind};

use super::channel::{Channel, ChannelCfg};
use super::verbs::{Event, EventVerbs};

/// A [`Link`] over a [`Channel`] and `V`.
pub struct VerbsLink<V: EventVerbs> {
    // Declared first: the verbs (a queue pair) go before the channel's memory that their
    // posted work may still read.
    verbs: V,
    ch: Channel<V::Mr>,
    events: Vec<Event>,
}

impl<V: EventVerbs> std::fmt::Debug for VerbsLink<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsLink").field("peer", &self.ch.peer()).finish_non_exhaustive()
    }
}

impl<V: EventVerbs> VerbsLink<V> {
    /// A link over `verbs`, its channel made with `cfg`.
    pub fn over(mut verbs: V, cfg: ChannelCfg) -> Result<VerbsLink<V>> {
        let ch = Channel::new(cfg, &mut verbs)?;
        Ok(VerbsLink { verbs, ch, events: Vec::new() })
    }

    /// The verbs.
    pub fn verbs(&self) -> &V {
        &self.verbs
    }

    /// Pieces sent as RMA writes and as tagged sends; messages injected.
    pub fn counts(&self) -> (u64, u64, u64) {
        let (w, t) = self.ch.pieces_sent();
        (w, t, self.ch.injected())
    }

    fn checked<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.ch.fail(e);
        }
        r
    }
}

impl<V: EventVerbs + Send> Link for VerbsLink<V>
where
    V::Mr: Send,
{
    fn peer(&self) -> usize {
        self.ch.peer()
    }
    fn kind(&self) -> TransportKind {
        self.ch.kind()
    }
    fn post_send(&mut self, tag: Tag, src: MemSlice) -> Result<u64> {
        self.ch.check_memory(&src)?;
        if self.ch.can_inject(src.len()) {
            let r = self.ch.inject(tag, src, &mut self.verbs)?;
            if let Some(seq) = r {
                return Ok(seq);
            }
        }
        let (seq, alone) = self.ch.queue_send(tag, src);
        if alone {
            let r = self.ch.post_sends(&mut self.verbs);
            self.checked(r)?;
        }
        Ok(seq)
    }
    fn post_recv(&mut self, tag: Tag, dst: MemSlice, mode: RecvMode) -> Result<u64> {
        crate::link::check_reducing_recv(&dst, &mode)?;
        self.ch.check_memory(&dst)?;
        let (seq, alone) = self.ch.queue_recv(tag, dst, mode);
        if alone {
            let r = self.ch.post_recvs(&mut self.verbs);
            self.checked(r)?;
        }
        Ok(seq)
    }
    fn progress(&mut self) -> Result<usize> {
        if let Some(e) = self.ch.failed() {
            return Err(Error::Remote { rank: self.ch.peer(), what: e.to_string() });
        }
        let r = self.ch.run(&mut self.verbs);
        self.checked(r)?;
        let polled = self.verbs.events(&mut self.events);
        let work = self.events.len();
        // Every completion is accounted for, even after an error: its operation is over.
        let mut r = polled;
        for e in self.events.drain(..) {
            let one = match e {
                Event::Done(op, res) => self.ch.complete(op, res),
                Event::Landed(cookie, res) => self.ch.landed(cookie, res),
            };
            if r.is_ok() {
                r = one;
            }
        }
        self.checked(r)?;
        let r = self.ch.finish();
        self.checked(r)?;
        Ok(work)
    }
    fn sends_done(&self) -> u64 {
        self.ch.sends_done()
    }
    fn recvs_done(&self) -> u64 {
        self.ch.recvs_done()
    }
    fn op_end(&mut self) {
        self.ch.op_end();
        self.verbs.op_end();
    }
}

impl<V: EventVerbs> Drop for VerbsLink<V> {
    fn drop(&mut self) {
        // The peer learns the link is gone: the goodbye is given a moment (at most 100 ms)
        // to leave, its completion polled, before the verbs and the channel's memory go;
        // then nothing may write into the buffers of receives still posted.
        if matches!(self.ch.say_bye(&mut self.verbs), Ok(true)) {
            let end = std::time::Instant::now() + std::time::Duration::from_millis(100);
            while self.ch.bye_pending() && std::time::Instant::now() < end {
                let mut evs = std::mem::take(&mut self.events);
                if self.verbs.events(&mut evs).is_err() {
                    break;
                }
                for e in evs.drain(..) {
                    let _ = match e {
                        Event::Done(op, res) => self.ch.complete(op, res),
                        Event::Landed(cookie, res) => self.ch.landed(cookie, res),
                    };
                }
                self.events = evs;
            }
        }
        self.verbs.cancel_all();
        self.ch.leave_gate();
    }
}
