//! The wire format of the TCP store: opcodes, a frame builder and a bounds-checked field reader.

use super::MAX_FRAME;

/// Opcodes: requests below 0x80, replies from 0x80.
pub(super) mod op {
    pub const HELLO: u8 = 0x01;
    pub const SET: u8 = 0x10;
    pub const GET: u8 = 0x11;
    pub const TRY_GET: u8 = 0x12;
    pub const ADD: u8 = 0x13;
    pub const DELETE: u8 = 0x14;
    pub const WATCH: u8 = 0x15;
    pub const DISARM: u8 = 0x16;
    pub const OK: u8 = 0x80;
    pub const VALUE: u8 = 0x81;
    pub const NOT_FOUND: u8 = 0x82;
    pub const TIMEOUT: u8 = 0x83;
    pub const COUNTER: u8 = 0x84;
    pub const DELETED: u8 = 0x85;
    pub const ERROR: u8 = 0xEE;
}

/// Builds one frame.
pub(super) struct FrameBuf(Vec<u8>);

impl FrameBuf {
    pub(super) fn new(opcode: u8) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(opcode);
        FrameBuf(v)
    }
    pub(super) fn put(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub(super) fn u16(self, x: u16) -> Self {
        self.put(&x.to_le_bytes())
    }
    pub(super) fn u32(self, x: u32) -> Self {
        self.put(&x.to_le_bytes())
    }
    pub(super) fn u64(self, x: u64) -> Self {
        self.put(&x.to_le_bytes())
    }
    pub(super) fn i64(self, x: i64) -> Self {
        self.put(&x.to_le_bytes())
    }
    pub(super) fn bytes(self, b: &[u8]) -> Self {
        // A field over 4 GiB makes the frame too long, which `finish` rejects.
        let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
        self.u32(n).put(b)
    }
    /// The encoded frame, or the body length when it is over [`MAX_FRAME`].
    pub(super) fn finish(mut self) -> std::result::Result<Vec<u8>, usize> {
        let body = self.0.len() - 4;
        if body > MAX_FRAME {
            return Err(body);
        }
        self.0[..4].copy_from_slice(&(body as u32).to_le_bytes());
        Ok(self.0)
    }
}

/// Reads the fields of a frame body, never trusting a length it contains.
pub(super) struct Fields<'a>(pub(super) &'a [u8]);

impl<'a> Fields<'a> {
    pub(super) fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("frame too short for its {what} ({n} bytes wanted, {} left)", self.0.len()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(super) fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    pub(super) fn u8(&mut self, what: &str) -> std::result::Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(super) fn u16(&mut self, what: &str) -> std::result::Result<u16, String> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(super) fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(super) fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    pub(super) fn i64(&mut self, what: &str) -> std::result::Result<i64, String> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }
    pub(super) fn bytes(&mut self, what: &str) -> std::result::Result<&'a [u8], String> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    pub(super) fn str(&mut self, what: &str) -> std::result::Result<&'a str, String> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| format!("{what} is not UTF-8"))
    }
    pub(super) fn end(&self) -> std::result::Result<(), String> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(format!("{n} unexpected bytes at the end of the frame")),
        }
    }
}

/// Kinds of loss actions in a `WATCH` request.
pub(super) mod loss {
    pub const SET_IF_ABSENT: u8 = 1;
    pub const ADD: u8 = 2;
    pub const DELETE: u8 = 3;
}

/// Encodes the actions of a `WATCH` request.
pub(super) fn put_actions(mut f: FrameBuf, actions: &[oxccl_core::store::LossAction]) -> FrameBuf {
    use oxccl_core::store::LossAction;
    f = f.u32(u32::try_from(actions.len()).unwrap_or(u32::MAX));
    for a in actions {
        f = match a {
            LossAction::SetIfAbsent { key, value } => f.put(&[loss::SET_IF_ABSENT]).bytes(key.as_bytes()).bytes(value),
            LossAction::Add { key, delta } => f.put(&[loss::ADD]).bytes(key.as_bytes()).i64(*delta),
            LossAction::Delete { key } => f.put(&[loss::DELETE]).bytes(key.as_bytes()),
        };
    }
    f
}

/// Decodes the actions of a `WATCH` request (at most `MAX_ACTIONS`; the frame limit bounds
/// their bytes).
pub(super) fn take_actions(f: &mut Fields<'_>) -> std::result::Result<Vec<oxccl_core::store::LossAction>, String> {
    use oxccl_core::store::LossAction;
    const MAX_ACTIONS: u32 = 4096;
    let n = f.u32("action count")?;
    if n > MAX_ACTIONS {
        return Err(format!("{n} loss actions (at most {MAX_ACTIONS})"));
    }
    let mut v = Vec::new();
    for _ in 0..n {
        let kind = f.u8("action kind")?;
        let key = f.str("key")?.to_string();
        v.push(match kind {
            loss::SET_IF_ABSENT => LossAction::SetIfAbsent { key, value: f.bytes("value")?.to_vec() },
            loss::ADD => LossAction::Add { key, delta: f.i64("delta")? },
            loss::DELETE => LossAction::Delete { key },
            other => return Err(format!("unknown loss action kind {other}")),
        });
    }
    f.end()?;
    Ok(v)
}
