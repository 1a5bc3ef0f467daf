//! The TCP rendezvous store: [`TcpStoreServer`] (a tokio current-thread runtime on its own
//! thread) and [`TcpStore`], a blocking client implementing
//! [`Store`](oxccl_core::store::Store).
//!
//! # Protocol
//!
//! Every message is a frame: a `u32` little-endian length of what follows, a one-byte opcode,
//! then the fields. Byte strings are a `u32` little-endian length and the bytes; integers are
//! little-endian. The client opens with `HELLO {magic: u32 = "OXST", version: u16}`; the
//! server answers `HELLO` with its own magic and version, or `ERROR {message}` and closes.
//! Then every request gets one reply:
//!
//! | request                       | reply                                  |
//! |-------------------------------|----------------------------------------|
//! | `SET {key, value}`            | `OK`                                   |
//! | `GET {key, wait_ms: u64}`     | `VALUE {value}` or `TIMEOUT`           |
//! | `TRY_GET {key}`               | `VALUE {value}` or `NOT_FOUND`         |
//! | `ADD {key, delta: i64}`       | `COUNTER {i64}` or `ERROR {message}`   |
//! | `DELETE {key}`                | `DELETED {u8: 0 or 1}`                 |
//! | `WATCH {n: u32, actions}`     | `OK`                                   |
//! | `DISARM`                      | `OK`                                   |
//!
//! `WATCH` registers loss actions (`u8` kind, then `SET_IF_ABSENT {key, value}`,
//! `ADD {key, delta: i64}` or `DELETE {key}`) that the server carries out if the connection
//! ends before a `DISARM`: how the store learns that a rank's process was lost
//! (docs/reliability.md). Version 2 added them; a version-1 peer is refused at hello.
//!
//! Counters are stored as decimal text, like [`MemStore`](oxccl_core::store::MemStore), so
//! [`parse_counter`](oxccl_core::store::parse_counter) applies to them. A frame longer than [`MAX_FRAME`], an unknown opcode, a
//! bad hello or a truncated frame makes the server close that connection (with a warning in
//! the log); other connections are not affected. A client that asks for a newer or older
//! protocol version gets `ERROR` naming both versions before the close.

use std::time::Duration;

mod client;
mod server;
mod wire;

pub use client::TcpStore;
pub use server::TcpStoreServer;

/// The largest frame (value of the length field) either side accepts: 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
const MAGIC: u32 = u32::from_le_bytes(*b"OXST");
/// The longest single server-side wait; longer client waits are split into several requests.
const MAX_WAIT_CHUNK: Duration = Duration::from_secs(3600);
/// The server never waits longer than this for one `GET`, whatever the client asks.
const MAX_SERVER_WAIT: Duration = Duration::from_secs(86_400);
/// Floor of the client's socket timeout for replies that do not wait.
const MIN_IO_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests;

/// Turns on TCP keepalive (first probe after 10 s idle, then every 5 s, 3 probes): a watch
/// connection whose other end vanished without closing ends within about 25 s.
pub(crate) fn keepalive(s: &impl std::os::fd::AsRawFd) {
    let fd = s.as_raw_fd();
    let set = |level, opt, v: libc::c_int| {
        // SAFETY: setsockopt on a socket we own, with a valid int option.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}
