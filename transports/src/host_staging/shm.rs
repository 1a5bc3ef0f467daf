//! Shared-memory files and futexes: the only system calls of the host-staging transport.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use oxccl_core::{Error, Result};

const T: oxccl_core::link::TransportKind = oxccl_core::link::TransportKind::HostStaging;

/// A mapped shared-memory file under /dev/shm.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    /// The file name while we may still have to unlink it.
    name: Option<String>,
}

// SAFETY: the mapping is plain shared memory; all concurrent access goes through atomics or
// through the ownership protocol of the ring (see ring.rs).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

fn cname(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| Error::Internal(format!("shared-memory name {name:?} contains NUL")))
}

impl Mapping {
    /// Creates `/dev/shm/<name>` (which must not exist), sizes it to `len` and maps it. The
    /// file stays until [`Mapping::unlink`] or drop.
    pub fn create(name: &str, len: usize) -> Result<Mapping> {
        let c = cname(name)?;
        // SAFETY: c is a valid NUL-terminated string.
        let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600) };
        if fd < 0 {
            return Err(Error::os(T, "shm_open(create)", None, std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a valid descriptor we own.
        let r = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: fd valid; c valid.
            unsafe {
                libc::close(fd);
                libc::shm_unlink(c.as_ptr());
            }
            return Err(Error::os(T, "ftruncate", None, e));
        }
        let m = Self::map(fd, len, Some(name.to_string()));
        if m.is_err() {
            // SAFETY: c valid.
            unsafe { libc::shm_unlink(c.as_ptr()) };
        }
        m
    }

    /// Removes `/dev/shm/<name>` if it exists.
    pub fn unlink_name(name: &str) {
        if let Ok(c) = cname(name) {
            // SAFETY: c valid; ENOENT is fine.
            unsafe { libc::shm_unlink(c.as_ptr()) };
        }
    }

    /// Maps an existing `/dev/shm/<name>` of at least `len` bytes (the name stays; see
    /// [`Mapping::unlink_name`]).
    pub fn open(name: &str, len: usize) -> Result<Mapping> {
        let c = cname(name)?;
        // SAFETY: c is a valid NUL-terminated string.
        let fd = unsafe { libc::shm_open(c.as_ptr(), libc::O_RDWR, 0) };
        if fd < 0 {
            return Err(Error::os(T, "shm_open(open)", None, std::io::Error::last_os_error()));
        }
        // SAFETY: fd valid; st is plain data.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(Error::os(T, "fstat", None, e));
            }
            st.st_size as usize
        };
        if size < len {
            // SAFETY: fd valid.
            unsafe { libc::close(fd) };
            return Err(Error::invalid_usage(format!(
                "shared-memory file {name} is {size} bytes, this rank expects {len}: \
                 every rank must use the same OXCCL_STAGING_BYTES"
            )));
        }
        Self::map(fd, len, None)
    }

    fn map(fd: libc::c_int, len: usize, name: Option<String>) -> Result<Mapping> {
        // SAFETY: fresh shared mapping of a file we hold open; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: the mapping (if any) keeps the memory; the descriptor is no longer needed.
        unsafe { libc::close(fd) };
        if p == libc::MAP_FAILED {
            return Err(Error::os(T, "mmap", None, err));
        }
        let ptr = NonNull::new(p as *mut u8).ok_or_else(|| Error::Internal("mmap returned null".into()))?;
        Ok(Mapping { ptr, len, name })
    }

    /// Stops this mapping from removing the file name when dropped.
    pub fn keep_name(&mut self) {
        self.name = None;
    }

    /// Removes the file name (the mapping stays). Idempotent.
    pub fn unlink(&mut self) {
        if let Some(n) = self.name.take() {
            if let Ok(c) = cname(&n) {
                // SAFETY: c valid; ENOENT (the peer unlinked it already) is fine.
                unsafe { libc::shm_unlink(c.as_ptr()) };
            }
        }
    }

    /// Base address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.unlink();
        // SAFETY: we own the mapping; nothing references it after drop (links own theirs).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// Sleeps while `*word == expected`, at most `timeout` (a shared futex: works across
/// processes). Returns early on wake-up, signal, or value change.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts =
        libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
    // SAFETY: word is a valid, aligned u32 in (shared) memory; ts lives across the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

/// Wakes every sleeper on `word`.
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: word is a valid, aligned u32; FUTEX_WAKE does not dereference other arguments.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
    }
}

impl Mapping {
    /// Anonymous private memory of `len` bytes (no file), zeroed.
    pub fn anonymous(len: usize) -> Result<Mapping> {
        // SAFETY: anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let err = std::io::Error::last_os_error();
        let ptr = if p == libc::MAP_FAILED { None } else { NonNull::new(p as *mut u8) };
        ptr.map(|ptr| Mapping { ptr, len, name: None }).ok_or_else(|| Error::os(T, "mmap(anonymous)", None, err))
    }
}
