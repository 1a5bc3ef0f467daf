//! The rendezvous store: how ranks find each other.
//!
//! A small key-value interface (Gloo's `set/get/wait/add`). Every call that waits takes a
//! deadline and fails with [`Error::Timeout`] naming the keys it waited for. Implementations:
//! [`MemStore`] here (ranks as threads of one process), and the TCP and file stores in the
//! `oxccl` crate.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A rendezvous key-value store shared by all ranks.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value`, replacing any earlier value, and wakes waiters.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// The value of `key`, or `None` if it is not set. Does not wait.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// The value of `key`, waiting until it is set or `timeout` passes.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
    /// Adds `delta` to the integer at `key` (missing counts as 0) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64>;
    /// Removes `key`; true if it was there.
    fn delete(&self, key: &str) -> Result<bool>;
    /// [`Store::try_get`] that gives up after about `limit` (no reconnect attempts beyond
    /// it): for checks made while an operation with its own deadline waits.
    fn try_get_within(&self, key: &str, limit: Duration) -> Result<Option<Vec<u8>>> {
        let _ = limit;
        self.try_get(key)
    }
    /// [`Store::add`] that gives up after about `limit`.
    fn add_within(&self, key: &str, delta: i64, limit: Duration) -> Result<i64> {
        let _ = limit;
        self.add(key, delta)
    }
    /// [`Store::set`] that gives up after about `limit`.
    fn set_within(&self, key: &str, value: &[u8], limit: Duration) -> Result<()> {
        let _ = limit;
        self.set(key, value)
    }
    /// Registers `actions` for the store to carry out if this process goes away without
    /// dropping the returned [`Watch`] first (it was killed, or its host vanished): how the
    /// other ranks learn of a lost rank, and how the dead's entries are cleaned up. `Ok(None)`:
    /// this store cannot tell (in-process and file stores).
    fn watch(&self, actions: &[LossAction]) -> Result<Option<Box<dyn Watch>>> {
        let _ = actions;
        Ok(None)
    }
    /// Waits until every key in `keys` is set, or `timeout` passes.
    fn wait(&self, keys: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for k in keys {
            self.get(k, deadline.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }
}

/// What a store does when a watching process is lost ([`Store::watch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossAction {
    /// Sets `key` to `value` unless it is set already (the first report wins).
    SetIfAbsent {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Adds `delta` to the counter at `key`.
    Add {
        /// Key.
        key: String,
        /// Amount.
        delta: i64,
    },
    /// Removes `key`.
    Delete {
        /// Key.
        key: String,
    },
}

impl LossAction {
    /// The same action on `prefix/key`.
    pub fn prefixed(&self, prefix: &str) -> LossAction {
        let k = |key: &String| format!("{prefix}/{key}");
        match self {
            LossAction::SetIfAbsent { key, value } => LossAction::SetIfAbsent { key: k(key), value: value.clone() },
            LossAction::Add { key, delta } => LossAction::Add { key: k(key), delta: *delta },
            LossAction::Delete { key } => LossAction::Delete { key: k(key) },
        }
    }
}

/// A registration of [`LossAction`]s. Dropping it cancels them (an orderly goodbye).
pub trait Watch: Send + Sync + std::fmt::Debug {
    /// True once the store itself is known to be gone (its connection ended): the process
    /// hosting it died or closed it. Never blocks.
    fn store_gone(&self) -> bool;
}

/// The timeout error every store returns.
pub fn timeout_error(key: &str, timeout: Duration) -> Error {
    Error::Timeout {
        after: timeout,
        what: format!(
            "store key '{key}' was not set; is every rank started, with the same world size and store address?"
        ),
    }
}

/// A store that prefixes every key, so several communicators can share one store.
#[derive(Debug, Clone)]
pub struct PrefixStore {
    prefix: String,
    inner: Arc<dyn Store>,
}

impl PrefixStore {
    /// Keys become `prefix/key`.
    pub fn new(prefix: impl Into<String>, inner: Arc<dyn Store>) -> Self {
        PrefixStore { prefix: prefix.into(), inner }
    }
    fn k(&self, key: &str) -> String {
        format!("{}/{}", self.prefix, key)
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.inner.set(&self.k(key), value)
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.try_get(&self.k(key))
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.inner.get(&self.k(key), timeout)
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        self.inner.add(&self.k(key), delta)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        self.inner.delete(&self.k(key))
    }
    fn try_get_within(&self, key: &str, limit: Duration) -> Result<Option<Vec<u8>>> {
        self.inner.try_get_within(&self.k(key), limit)
    }
    fn add_within(&self, key: &str, delta: i64, limit: Duration) -> Result<i64> {
        self.inner.add_within(&self.k(key), delta, limit)
    }
    fn set_within(&self, key: &str, value: &[u8], limit: Duration) -> Result<()> {
        self.inner.set_within(&self.k(key), value, limit)
    }
    fn watch(&self, actions: &[LossAction]) -> Result<Option<Box<dyn Watch>>> {
        let a: Vec<LossAction> = actions.iter().map(|a| a.prefixed(&self.prefix)).collect();
        self.inner.watch(&a)
    }
}

/// An in-process store (ranks as threads, or tests).
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    cv: Condvar,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Parses a counter value as stored by `add` (decimal text).
pub fn parse_counter(key: &str, v: &[u8]) -> Result<i64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| Error::Store(format!("key '{key}' does not hold a counter")))
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_string(), value.to_vec());
        self.cv.notify_all();
        Ok(())
    }
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut m = self.lock();
        loop {
            if let Some(v) = m.get(key) {
                return Ok(v.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timeout_error(key, timeout));
            }
            m = self.cv.wait_timeout(m, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let mut m = self.lock();
        let cur = match m.get(key) {
            Some(v) => parse_counter(key, v)?,
            None => 0,
        };
        let new = cur.wrapping_add(delta);
        m.insert(key.to_string(), new.to_string().into_bytes());
        drop(m);
        self.cv.notify_all();
        Ok(new)
    }
    fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.lock().remove(key).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_store_basics() {
        let s: Arc<dyn Store> = Arc::new(MemStore::new());
        let p = PrefixStore::new("c1", s.clone());
        p.set("a", b"x").unwrap();
        assert_eq!(s.try_get("c1/a").unwrap().unwrap(), b"x");
        assert_eq!(p.add("n", 2).unwrap(), 2);
        assert_eq!(p.add("n", -5).unwrap(), -3);
        let e = p.get("missing", Duration::from_millis(20)).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("missing"));
        p.set("a", b"not a number").unwrap();
        assert!(p.add("a", 1).is_err());
        assert!(p.delete("a").unwrap());
        assert!(!p.delete("a").unwrap());
    }

    #[test]
    fn get_waits_for_set() {
        let s = Arc::new(MemStore::new());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.get("k", Duration::from_secs(10)).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        s.set("k", b"v").unwrap();
        assert_eq!(t.join().unwrap(), b"v");
    }
}
