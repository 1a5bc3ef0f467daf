//! A rendezvous store over a directory on a shared file system (NFS, Lustre, a local tmpfs).
//!
//! Each key is one file. `set` writes a temporary file and renames it over the key's file, so
//! readers see the old value or the new one, never a part. `get` polls with backoff (1 ms
//! growing to 50 ms). `add` holds an exclusive `flock` on the directory's lock file for its
//! read-modify-write. Keys are percent-encoded into file names (`/` becomes `%2F`); very long
//! keys are shortened and given a hash.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use oxccl_core::store::{parse_counter, timeout_error, Store};
use oxccl_core::{Error, Result};

/// Longest encoded key used as is; longer ones are cut and given a hash.
const MAX_NAME: usize = 180;
const POLL_MIN: Duration = Duration::from_millis(1);
const POLL_MAX: Duration = Duration::from_millis(50);
/// Names of value files start with this; temporary and lock files start with a dot.
const KEY_PREFIX: &str = "k_";
const LOCK_FILE: &str = ".lock";

/// Makes temporary file names unique among the threads of this process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A [`Store`] over a directory shared by all ranks.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// FNV-1a, 64 bits: stable across processes and builds (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The file name of `key`: `[A-Za-z0-9_-]` kept, every other byte `%XX`.
fn encode_key(key: &str) -> String {
    let mut name = String::with_capacity(KEY_PREFIX.len() + key.len());
    name.push_str(KEY_PREFIX);
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    if name.len() > MAX_NAME {
        // Cut at a character boundary (the name is ASCII), then add a hash of the whole key.
        name.truncate(MAX_NAME - 17);
        name.push_str(&format!("~{:016x}", fnv1a(key.as_bytes())));
    }
    name
}

fn store_err(dir: &Path, what: impl std::fmt::Display, e: std::io::Error) -> Error {
    Error::Store(format!("file store {}: {what}: {e}", dir.display()))
}

/// An exclusive `flock` on an open file, released on drop.
struct FlockGuard(File);

impl FlockGuard {
    fn lock(path: &Path) -> std::io::Result<FlockGuard> {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        loop {
            // SAFETY: `f` is an open file for the whole call; flock only takes its descriptor.
            let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if r == 0 {
                return Ok(FlockGuard(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for FlockGuard {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes it prompt on NFS.
        // SAFETY: the descriptor is still open (the `File` is dropped after this).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl FileStore {
    /// A store in `dir`, created (with its parents) if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<FileStore> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| store_err(&dir, "cannot create the directory", e))?;
        Ok(FileStore { dir })
    }

    /// The directory it uses.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(encode_key(key))
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let p = self.path(key);
        match std::fs::read(&p) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(store_err(&self.dir, format_args!("cannot read key '{key}' ({})", p.display()), e)),
        }
    }

    /// Writes `value` to a temporary file, then renames it onto the key's file.
    fn write(&self, key: &str, value: &[u8]) -> Result<()> {
        let name = encode_key(key);
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp.{}.{seq}.{name}", std::process::id()));
        let r = File::create(&tmp).and_then(|mut f| f.write_all(value));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(store_err(&self.dir, format_args!("cannot write key '{key}' ({})", tmp.display()), e));
        }
        std::fs::rename(&tmp, self.dir.join(&name)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            store_err(&self.dir, format_args!("cannot rename {} into place for key '{key}'", tmp.display()), e)
        })
    }
}

impl Store for FileStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.write(key, value)
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.read(key)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        let mut pause = POLL_MIN;
        loop {
            if let Some(v) = self.read(key)? {
                return Ok(v);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(timeout_error(key, timeout));
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let lock = self.dir.join(LOCK_FILE);
        let _guard = FlockGuard::lock(&lock)
            .map_err(|e| store_err(&self.dir, format_args!("cannot lock {}", lock.display()), e))?;
        let cur = match self.read(key)? {
            Some(v) => parse_counter(key, &v)?,
            None => 0,
        };
        let new = cur.wrapping_add(delta);
        self.write(key, new.to_string().as_bytes())?;
        Ok(new)
    }

    fn delete(&self, key: &str) -> Result<bool> {
        let p = self.path(key);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(store_err(&self.dir, format_args!("cannot delete key '{key}' ({})", p.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            TempDir(std::env::temp_dir().join(format!("oxccl-file-store-{tag}-{}-{n}", std::process::id())))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn basics() {
        let d = TempDir::new("basics");
        let s = FileStore::new(d.0.join("nested/dir")).unwrap();
        assert!(s.dir().is_dir());
        s.set("a", b"x").unwrap();
        assert_eq!(s.get("a", Duration::from_secs(1)).unwrap(), b"x");
        assert_eq!(s.try_get("a").unwrap().unwrap(), b"x");
        assert_eq!(s.try_get("b").unwrap(), None);
        s.set("a", b"y").unwrap();
        assert_eq!(s.try_get("a").unwrap().unwrap(), b"y");
        assert_eq!(s.add("n", 2).unwrap(), 2);
        assert_eq!(s.add("n", -5).unwrap(), -3);
        assert_eq!(s.try_get("n").unwrap().unwrap(), b"-3");
        let e = s.add("a", 1).unwrap_err();
        assert!(e.to_string().contains("does not hold a counter"), "{e}");
        assert!(s.delete("a").unwrap());
        assert!(!s.delete("a").unwrap());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(s.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
    }

    #[test]
    fn keys_are_encoded_to_distinct_safe_names() {
        let d = TempDir::new("keys");
        let s = FileStore::new(&d.0).unwrap();
        let long_a = format!("{}a", "x/".repeat(300));
        let long_b = format!("{}b", "x/".repeat(300));
        let keys = ["a/b", "a%2Fb", "a_b", "..", ".lock", "", "ключ", long_a.as_str(), long_b.as_str()];
        for (i, k) in keys.iter().enumerate() {
            s.set(k, i.to_string().as_bytes()).unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(s.try_get(k).unwrap().unwrap(), i.to_string().as_bytes(), "key {k:?}");
            let name = encode_key(k);
            assert!(name.len() <= MAX_NAME && !name.contains('/') && name.starts_with(KEY_PREFIX), "{name}");
        }
        assert_eq!(std::fs::read_dir(&d.0).unwrap().count(), keys.len());
    }

    #[test]
    fn get_waits_then_times_out() {
        let d = TempDir::new("wait");
        let s = Arc::new(FileStore::new(&d.0).unwrap());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.get("late", Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(30));
        s.set("late", b"v").unwrap();
        assert_eq!(t.join().unwrap().unwrap(), b"v");

        let start = Instant::now();
        let e = s.get("never", Duration::from_millis(80)).unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }) && e.to_string().contains("never"), "{e}");
        assert!(start.elapsed() >= Duration::from_millis(80) && start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn concurrent_add() {
        let d = TempDir::new("add");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                // Each thread has its own store object, as separate processes would.
                let s = FileStore::new(&d.0).unwrap();
                std::thread::spawn(move || (0..25).map(|_| s.add("count", 1).unwrap()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen: Vec<i64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (1..=200).collect::<Vec<i64>>(), "every add saw a distinct value");
        assert_eq!(FileStore::new(&d.0).unwrap().add("count", 0).unwrap(), 200);
    }
}
