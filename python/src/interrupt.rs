//! Ctrl-C during a blocking call. The call runs in Rust with the GIL released, so Python's
//! own handler only sets a flag that nobody reads until the call returns. OxCCL chains a
//! SIGINT handler in front of Python's: it writes a byte to a pipe (async-signal-safe) and
//! calls Python's handler. A thread reading the pipe aborts the communicators that are in a
//! blocking call from Python; the call returns `AbortedError` within milliseconds, and the
//! wrapper then raises the `KeyboardInterrupt` Python's handler prepared.
//!
//! Nothing is installed while SIGINT is ignored or left to the default action (a program
//! that chose those keeps them).

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

use oxccl::Communicator;

/// The handler OxCCL chained in front of (Python's), leaked so the handler can read it.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());
/// The pipe's write end (-1: not made).
static WAKE: OnceLock<libc::c_int> = OnceLock::new();
/// Communicators in a blocking call, by call number.
static BUSY: Mutex<Vec<(u64, Arc<Communicator>)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
/// When the disposition was last looked at (coarse seconds; `u64::MAX`: never).
static LOOKED: AtomicU64 = AtomicU64::new(u64::MAX);

/// Seconds of the coarse monotonic clock (a few nanoseconds to read).
fn coarse_secs() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64
}

extern "C" fn on_sigint(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if let Some(fd) = WAKE.get() {
        let b = 1u8;
        // SAFETY: write(2) is async-signal-safe; a full pipe just drops the byte.
        unsafe { libc::write(*fd, (&b as *const u8).cast(), 1) };
    }
    let prev = PREVIOUS.load(Ordering::Acquire);
    if prev.is_null() {
        return;
    }
    // SAFETY: `prev` was leaked by `install` and is never freed; it holds the handler that
    // was installed before this one, called as the kernel would have called it.
    unsafe {
        let p = &*prev;
        if p.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(p.sa_sigaction);
            f(sig, info, ctx);
        } else if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
            f(sig);
        }
    }
}

/// Chains the handler in front of the current SIGINT handler (once it is a function: Python
/// installs its own at start), and starts the thread that aborts busy communicators. Called
/// when a communicator is made and before each blocking call (one `sigaction` read).
pub(crate) fn install() {
    static THREAD: Once = Once::new();
    THREAD.call_once(|| {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: a valid array of two descriptors for pipe2.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            tracing::warn!("Ctrl-C will not abort blocking calls: pipe2: {}", std::io::Error::last_os_error());
            return;
        }
        // The reader blocks: clear O_NONBLOCK on its end.
        // SAFETY: fcntl on a descriptor just made.
        unsafe { libc::fcntl(fds[0], libc::F_SETFL, 0) };
        let _ = WAKE.set(fds[1]);
        let read_end = fds[0];
        let spawned = std::thread::Builder::new().name("oxccl-sigint".into()).spawn(move || loop {
            let mut b = [0u8; 64];
            // SAFETY: reading into a local buffer of its length.
            let n = unsafe { libc::read(read_end, b.as_mut_ptr().cast(), b.len()) };
            if n <= 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
            for (_, c) in BUSY.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                c.abort();
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("Ctrl-C will not abort blocking calls: {e}");
        }
    });
    // Python may install another handler later (signal.signal): look again at most once a
    // second (a system call; blocking calls come far more often).
    let now = coarse_secs();
    if LOOKED.swap(now, Ordering::Relaxed) == now {
        return;
    }
    // SAFETY: reading the current disposition into a zeroed struct.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a null new action only reads.
    if unsafe { libc::sigaction(libc::SIGINT, std::ptr::null(), &mut cur) } != 0 {
        return;
    }
    let ours = on_sigint as *const () as libc::sighandler_t;
    if cur.sa_sigaction == ours || cur.sa_sigaction == libc::SIG_DFL || cur.sa_sigaction == libc::SIG_IGN {
        return;
    }
    let prev = Box::into_raw(Box::new(cur));
    PREVIOUS.store(prev, Ordering::Release);
    // SAFETY: a zeroed sigaction with our handler, SA_SIGINFO (three arguments) and
    // SA_RESTART, and the previous mask.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ours;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        sa.sa_mask = cur.sa_mask;
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// A blocking call in progress on a communicator (Ctrl-C aborts it).
pub(crate) struct Busy(u64);

impl Busy {
    pub(crate) fn enter(c: &Arc<Communicator>) -> Busy {
        install();
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        BUSY.lock().unwrap_or_else(|e| e.into_inner()).push((id, c.clone()));
        Busy(id)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _)| *id != self.0);
    }
}
