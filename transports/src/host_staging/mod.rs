//! `host-staging`: processes of one host exchange data through shared-memory rings.
//!
//! Each pair of local ranks that talks gets one segment under /dev/shm holding a ring per
//! direction (see [`ring`]). The lower rank creates it and publishes its name through the
//! rendezvous store; the higher rank maps it and removes the name at once, so after that
//! nothing is left in /dev/shm even if both processes crash. Segments are created on first
//! use: only peers an algorithm actually talks to cost memory.
//!
//! Waiting: a rank with nothing to do sleeps on its doorbell (see [`bells`]) after its driver
//! has spun and yielded for a while; peers ring it when they publish data or free space.

pub mod bells;
pub mod ring;
pub mod shm;
pub(crate) mod transport;

use std::sync::Arc;
use std::time::Duration;

use oxccl_core::store::Store;
use oxccl_core::{Error, Result};

pub use bells::Doorbells;
pub use ring::HostStagingLink;
use shm::Mapping;
pub use transport::{HostStagingTransport, HOST_STAGING};

/// Settings of the host-staging transport (all ranks of a communicator must agree).
#[derive(Debug, Clone, Copy)]
pub struct HostStagingConfig {
    /// Staging ring bytes per direction per peer (`OXCCL_STAGING_BYTES`).
    pub staging_bytes: usize,
    /// Largest piece of a message in the ring (`OXCCL_CHUNK_BYTES`).
    pub chunk_bytes: usize,
    /// Smallest message the receiver reads straight from the sender's memory, single copy
    /// (`OXCCL_SINGLE_COPY_BYTES`; 0: never).
    pub single_copy_bytes: usize,
}

impl HostStagingConfig {
    /// Shared memory one connected peer costs: one segment of two rings.
    pub fn bytes_per_peer(&self) -> usize {
        ring::segment_bytes(self.staging_bytes)
    }
}

/// Where a [`HostStaging`] keeps its names: store keys under `keys`, files after `nonce`.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// The store keys' prefix.
    pub keys: &'static str,
    /// Unique to the communicator (and to this set of rings within it).
    pub nonce: &'a str,
}

/// The host-staging transport of one communicator on one rank.
#[derive(Debug)]
pub struct HostStaging {
    cfg: HostStagingConfig,
    prefix: String,
    /// Where its keys go in the communicator's store (`host-staging`; p2p's control rings
    /// have their own).
    keys: &'static str,
    me: usize,
    /// Local index of every rank of the communicator on this host (None: other host).
    local_index: Vec<Option<usize>>,
    bells: Arc<Doorbells>,
    /// Set on the rank that created the doorbells: (store key, file name, local ranks).
    bells_created: Option<(String, String, usize)>,
}

impl HostStaging {
    /// Sets up the transport; collective over the ranks of this host (`local_ranks`, in rank
    /// order, must include `me`). `nonce` makes file names unique to this communicator.
    pub fn new(
        store: &dyn Store,
        me: usize,
        world: usize,
        local_ranks: &[usize],
        nonce: &str,
        cfg: HostStagingConfig,
        timeout: Duration,
    ) -> Result<HostStaging> {
        Self::named(Names { keys: "host-staging", nonce }, store, (me, world), local_ranks, cfg, timeout)
    }

    /// As [`HostStaging::new`], with the store keys under `names.keys` and the files named
    /// after `names.nonce`: a second set of rings beside a communicator's own (p2p's
    /// control rings).
    pub fn named(
        names: Names<'_>,
        store: &dyn Store,
        (me, world): (usize, usize),
        local_ranks: &[usize],
        cfg: HostStagingConfig,
        timeout: Duration,
    ) -> Result<HostStaging> {
        let (keys, nonce) = (names.keys, names.nonce);
        let mut local_index = vec![None; world];
        for (i, &r) in local_ranks.iter().enumerate() {
            local_index[r] = Some(i);
        }
        let first = local_ranks[0];
        let n = local_ranks.len();
        let prefix = format!("oxccl-{nonce}");
        let mut bells_created = None;
        let bells = if n == 1 {
            Doorbells::private()?
        } else {
            let name = format!("{prefix}-bells-{first}");
            let key = format!("{keys}/bells/{first}");
            let b = if me == first {
                let b = Doorbells::create(&name, n)?;
                store.set(&key, name.as_bytes())?;
                bells_created = Some((format!("{key}/attached"), name.clone(), n));
                b
            } else {
                store.get(&key, timeout)?;
                Doorbells::open(&name, n)?
            };
            // The last rank of the host to map the doorbells removes their name.
            if store.add(&format!("{key}/attached"), 1)? == n as i64 {
                Mapping::unlink_name(&name);
            }
            b
        };
        tracing::debug!(rank = me, local = n, "{keys}: doorbells ready");
        Ok(HostStaging { cfg, prefix, keys, me, local_index, bells: Arc::new(bells), bells_created })
    }

    /// An orderly end: the rank that created the doorbells waits (until `deadline`) for every
    /// local rank to have mapped them before their name goes, so a rank that closes early
    /// cannot make a slower one fail to start. A store that no longer answers ends the wait.
    pub fn close(self, store: &dyn Store, deadline: std::time::Instant) {
        if let Some((key, name, n)) = &self.bells_created {
            while std::time::Instant::now() < deadline {
                let seen = match store.try_get(key) {
                    Ok(v) => v.and_then(|v| oxccl_core::store::parse_counter(key, &v).ok()),
                    // The store is gone (its host closed first): nobody can map them any more.
                    Err(e) => {
                        tracing::debug!(rank = self.me, "host-staging close: the store no longer answers: {e}");
                        break;
                    }
                };
                if seen.is_some_and(|k| k >= *n as i64) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Mapping::unlink_name(name);
        }
    }

    /// True when `peer` is on this host (the only peers this transport can reach).
    pub fn can_connect(&self, peer: usize) -> bool {
        peer != self.me && self.local_index.get(peer).copied().flatten().is_some()
    }

    /// The settings in force.
    pub fn config(&self) -> HostStagingConfig {
        self.cfg
    }

    /// Starts or finishes connecting to `peer`; never blocks. `Ok(None)`: the peer has not
    /// created the segment yet; call again.
    pub fn connect(&self, store: &dyn Store, peer: usize) -> Result<Option<HostStagingLink>> {
        let peer_bell = self.local_index.get(peer).copied().flatten().ok_or_else(|| {
            Error::Internal(format!("host-staging asked to reach rank {peer}, which is on another host"))
        })?;
        let (a, b) = (self.me.min(peer), self.me.max(peer));
        let name = format!("{}-{a}-{b}", self.prefix);
        let key = format!("{}/pair/{a}-{b}", self.keys);
        let size = ring::segment_bytes(self.cfg.staging_bytes);
        let map = if self.me == a {
            let m = Mapping::create(&name, size).map_err(|e| peer_err(e, peer))?;
            ring::init_segment(&m, self.cfg.staging_bytes);
            store.set(&key, name.as_bytes())?;
            self.bells.ring(peer_bell);
            m
        } else {
            if store.try_get(&key)?.is_none() {
                return Ok(None);
            }
            let m = Mapping::open(&name, size).map_err(|e| peer_err(e, peer))?;
            Mapping::unlink_name(&name);
            ring::check_segment(&m, self.cfg.staging_bytes)?;
            ring::mark_attached(&m);
            m
        };
        tracing::debug!(rank = self.me, peer, bytes = size, "host-staging: link up");
        Ok(Some(HostStagingLink::new(
            map,
            self.me,
            peer,
            self.cfg.staging_bytes,
            self.cfg.chunk_bytes,
            self.cfg.single_copy_bytes,
            self.bells.clone(),
            peer_bell,
        )))
    }
}

fn peer_err(e: Error, peer: usize) -> Error {
    match e {
        Error::Transport { transport, op, source, .. } => Error::Transport { transport, op, peer: Some(peer), source },
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use oxccl_core::conformance::{self, LinkPair};
    use oxccl_core::link::Link;
    use oxccl_core::store::MemStore;

    use super::*;

    /// Pairs of host-staging links between two "ranks" of this process, each pair on segments
    /// of its own.
    struct Pairs {
        cfg: HostStagingConfig,
    }

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    impl LinkPair for Pairs {
        fn name(&self) -> String {
            format!("host-staging ({} B ring, {} B pieces)", self.cfg.staging_bytes, self.cfg.chunk_bytes)
        }
        fn piece(&self) -> usize {
            self.cfg.chunk_bytes
        }
        fn connect(&mut self) -> (Box<dyn Link>, Box<dyn Link>) {
            let store = MemStore::new();
            let nonce = format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
            let t = Duration::from_secs(5);
            let a = HostStaging::new(&store, 0, 2, &[0, 1], &nonce, self.cfg, t).unwrap();
            let b = HostStaging::new(&store, 1, 2, &[0, 1], &nonce, self.cfg, t).unwrap();
            let la = a.connect(&store, 1).unwrap().expect("the lower rank creates the segment");
            let end = Instant::now() + t;
            let lb = loop {
                if let Some(l) = b.connect(&store, 0).unwrap() {
                    break l;
                }
                assert!(Instant::now() < end, "the higher rank never found the segment");
            };
            (Box::new(la), Box::new(lb))
        }
    }

    #[test]
    fn host_staging_keeps_the_link_contract() {
        conformance::run(&mut Pairs {
            cfg: HostStagingConfig { staging_bytes: 4 << 20, chunk_bytes: 256 << 10, single_copy_bytes: 0 },
        });
    }

    /// The smallest ring the settings allow: two pieces of 4 KiB; every message of more than
    /// a few pieces waits for the receiver.
    /// Messages of 64 KiB and more go by address (single copy), the others through the ring.
    #[test]
    fn host_staging_keeps_the_link_contract_with_single_copy() {
        conformance::run(&mut Pairs {
            cfg: HostStagingConfig { staging_bytes: 4 << 20, chunk_bytes: 256 << 10, single_copy_bytes: 64 << 10 },
        });
    }

    /// A message read by address in several calls: each partial read counts as progress (a
    /// driver seeing none would sleep between reads), and when the sender closes its link
    /// during the read the receive fails rather than delivering memory the sender may
    /// already have reused.
    #[test]
    fn a_read_by_address_progresses_and_fails_when_the_sender_leaves() {
        use oxccl_core::link::{RecvMode, Tag};
        let mut pairs = Pairs {
            cfg: HostStagingConfig { staging_bytes: 4 << 20, chunk_bytes: 256 << 10, single_copy_bytes: 64 << 10 },
        };
        let (mut a, mut b) = pairs.connect();
        let big = 16 << 20;
        let mut x = vec![7u8; big];
        let mut y = vec![0u8; big];
        // SAFETY: x and y outlive both links (dropped at the end of the test).
        let (sx, sy) = unsafe {
            (oxccl_core::link::MemSlice::new(x.as_mut_ptr(), big), oxccl_core::link::MemSlice::new(y.as_mut_ptr(), big))
        };
        // Both sides have probed each other once their links are up: the send goes by address.
        b.progress().unwrap();
        a.post_send(Tag(1), sx).unwrap();
        b.post_recv(Tag(1), sy, RecvMode::Copy).unwrap();
        a.progress().unwrap();
        assert!(b.progress().unwrap() > 0, "a partial read is progress");
        assert_eq!(b.recvs_done(), 0, "16 MiB take more than one call");
        assert!(y[..1 << 20].iter().all(|&v| v == 7), "the first part was read");
        drop(a);
        let e = b.progress().expect_err("the sender left during the read");
        assert!(matches!(e, Error::Remote { rank: 0, .. }), "{e}");
        assert_eq!(b.recvs_done(), 0);
        drop(b);
        drop((x, y));
    }

    /// A large message by address: the reader reads the first quarter and the writer, waiting
    /// for its send, writes the rest into the reader's buffer; a writer that does not
    /// come by leaves the reader to read it all (it withdraws its request), never waiting.
    #[test]
    fn a_large_copy_by_address_is_shared_with_the_writer_or_withdrawn() {
        use oxccl_core::link::{MemSlice, RecvMode, Tag};
        let mut pairs = Pairs {
            cfg: HostStagingConfig { staging_bytes: 4 << 20, chunk_bytes: 256 << 10, single_copy_bytes: 64 << 10 },
        };
        let (mut a, mut b) = pairs.connect();
        b.progress().unwrap();
        let big = 8 << 20;
        let own = big / 4;
        let x: Vec<u8> = (0..big).map(|i| (i % 251) as u8).collect();
        for helped in [true, false] {
            let mut x = x.clone();
            let mut y = vec![0u8; big];
            // SAFETY: x and y outlive the operations (checked done below).
            let (sx, sy) = unsafe { (MemSlice::new(x.as_mut_ptr(), big), MemSlice::new(y.as_mut_ptr(), big)) };
            let sends = a.sends_done();
            let recvs = b.recvs_done();
            a.post_send(Tag(1), sx).unwrap();
            b.post_recv(Tag(1), sy, RecvMode::Copy).unwrap();
            a.progress().unwrap(); // published by address
            b.progress().unwrap(); // asks for help, reads its quarter (within one call's budget)
            assert_eq!(y[..own], x[..own], "the reader's quarter");
            assert!(y[own..].iter().all(|&v| v == 0), "the rest is left to the writer");
            if helped {
                a.progress().unwrap(); // the writer writes the rest
                assert_eq!(y[own..], x[own..], "written by the writer");
                assert!(b.recvs_done() == recvs, "not done before the reader sees it");
            }
            let mut n = 0;
            while b.recvs_done() == recvs {
                b.progress().unwrap();
                n += 1;
                assert!(n < 10, "the reader finishes by itself");
            }
            while a.sends_done() == sends {
                a.progress().unwrap();
            }
            assert_eq!(y, x, "helped: {helped}");
        }
    }

    #[test]
    fn host_staging_keeps_the_link_contract_with_a_tiny_ring() {
        conformance::run(&mut Pairs {
            cfg: HostStagingConfig { staging_bytes: 8 << 10, chunk_bytes: 4 << 10, single_copy_bytes: 0 },
        });
    }

    /// A store that no longer answers (its host went first).
    #[derive(Debug)]
    struct GoneStore;

    impl Store for GoneStore {
        fn set(&self, _: &str, _: &[u8]) -> Result<()> {
            Err(Error::Store("gone".into()))
        }
        fn try_get(&self, _: &str) -> Result<Option<Vec<u8>>> {
            Err(Error::Store("gone".into()))
        }
        fn get(&self, _: &str, _: Duration) -> Result<Vec<u8>> {
            Err(Error::Store("gone".into()))
        }
        fn add(&self, _: &str, _: i64) -> Result<i64> {
            Err(Error::Store("gone".into()))
        }
        fn delete(&self, _: &str) -> Result<bool> {
            Err(Error::Store("gone".into()))
        }
    }

    /// The rank that created the doorbells waits at close for the other local ranks to map
    /// them, but not for a store that is gone: that close hung a Ray group whose store actor
    /// went with the first rank to leave.
    #[test]
    fn close_does_not_wait_on_a_store_that_is_gone() {
        let store = MemStore::new();
        let nonce = format!("t{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let cfg = HostStagingConfig { staging_bytes: 8 << 10, chunk_bytes: 4 << 10, single_copy_bytes: 0 };
        // Rank 0 of two local ranks; rank 1 never maps the doorbells.
        let a = HostStaging::new(&store, 0, 2, &[0, 1], &nonce, cfg, Duration::from_secs(5)).unwrap();
        let start = Instant::now();
        a.close(&GoneStore, Instant::now() + Duration::from_secs(60));
        assert!(start.elapsed() < Duration::from_secs(5), "close waited {:?} on a gone store", start.elapsed());
        // With the store there, it waits for rank 1 until the deadline.
        let store = MemStore::new();
        let b = HostStaging::new(&store, 0, 2, &[0, 1], &format!("{nonce}b"), cfg, Duration::from_secs(5)).unwrap();
        let start = Instant::now();
        b.close(&store, Instant::now() + Duration::from_millis(300));
        assert!(start.elapsed() >= Duration::from_millis(300), "close left after {:?}", start.elapsed());
    }
}
