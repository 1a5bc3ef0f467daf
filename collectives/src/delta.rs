//! Delta refit: a broadcast that sends only the elements that changed since the version
//! every receiver holds (RL weight updates between two refits are often small).
//!
//! The root compares its new buffer with the previous version, element by element (by
//! bits: `-0.0` against `0.0`, or a NaN payload, counts as a change), and picks the smallest
//! encoding: an index list (4 or 8 bytes per changed element, plus its value), a bitmask (one
//! bit per element, plus the changed values), or the whole buffer once more than half of it
//! would be sent anyway. Two broadcasts carry it: a 32-byte header (encoding, changed
//! elements, payload bytes, buffer length), then the payload. The receivers apply it to their copy, so the
//! result is exactly the root's buffer.

use oxccl_core::{Element, Error, Result};

use crate::comm::Communicator;

/// How a delta went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaEncoding {
    /// Nothing changed: only the header went out.
    Unchanged,
    /// The changed elements' indices, then their values.
    Indices,
    /// One bit per element, then the changed values.
    Bitmask,
    /// The whole buffer (most of it changed).
    Full,
}

/// What [`Communicator::broadcast_delta`] sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaStats {
    /// The encoding chosen.
    pub encoding: DeltaEncoding,
    /// Elements that changed.
    pub changed: usize,
    /// Bytes broadcast, header included (a full broadcast: the buffer's bytes).
    pub bytes: usize,
}

const HEADER: usize = 4;

fn code(e: DeltaEncoding) -> u64 {
    match e {
        DeltaEncoding::Unchanged => 0,
        DeltaEncoding::Indices => 1,
        DeltaEncoding::Bitmask => 2,
        DeltaEncoding::Full => 3,
    }
}

fn bytes_of<T: Element>(v: &[T]) -> &[u8] {
    // SAFETY: Element types are plain numbers (no padding, any bit pattern valid to read).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bytes_of_mut<T: Element>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in bytes_of; every bit pattern is a valid value of these types.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// One bit per element (`es` bytes each), set where the bits of `new` and `old` differ, as
/// 64-bit words, and how many are set: one pass whatever the density (an index list kept
/// during the pass cost 537 MB of pushes at 50% of a 1 GiB buffer, only to be dropped).
/// Elements are compared as integers of their width (a byte-slice comparison per element
/// cost 4 ns an element).
fn changed_mask(new: &[u8], old: &[u8], es: usize) -> (Vec<u64>, usize) {
    let n = new.len() / es.max(1);
    let mut mask = vec![0u64; n.div_ceil(64)];
    fn fill<W: Copy + PartialEq>(a: &[W], b: &[W], mask: &mut [u64]) -> usize {
        let mut k = 0;
        for ((wa, wb), m) in a.chunks(64).zip(b.chunks(64)).zip(mask.iter_mut()) {
            // A sparse change leaves most runs of 64 equal: one block comparison each.
            if wa == wb {
                continue;
            }
            let mut word = 0u64;
            for (i, (x, y)) in wa.iter().zip(wb).enumerate() {
                word |= u64::from(x != y) << i;
            }
            k += word.count_ones() as usize;
            *m = word;
        }
        k
    }
    macro_rules! as_words {
        ($w:ty) => {{
            // SAFETY: the buffers are slices of Element values of this width, so they are
            // aligned for it and a whole number of words; any bits are a valid integer.
            let (a, b) = unsafe { (new.align_to::<$w>(), old.align_to::<$w>()) };
            if a.0.is_empty() && b.0.is_empty() && a.2.is_empty() && b.2.is_empty() {
                let k = fill(a.1, b.1, &mut mask);
                return (mask, k);
            }
        }};
    }
    match es {
        1 => as_words!(u8),
        2 => as_words!(u16),
        4 => as_words!(u32),
        8 => as_words!(u64),
        _ => {}
    }
    let mut k = 0;
    for i in 0..n {
        if new[i * es..(i + 1) * es] != old[i * es..(i + 1) * es] {
            mask[i / 64] |= 1 << (i % 64);
            k += 1;
        }
    }
    (mask, k)
}

/// The set bits of `mask`, in order.
fn set_bits(mask: &[u64]) -> impl Iterator<Item = usize> + '_ {
    mask.iter().enumerate().flat_map(|(w, &word)| {
        let mut m = word;
        std::iter::from_fn(move || {
            (m != 0).then(|| {
                let b = m.trailing_zeros() as usize;
                m &= m - 1;
                w * 64 + b
            })
        })
    })
}

impl Communicator {
    /// Broadcasts `root`'s `buf` to every rank as the difference from `previous`, the
    /// version every other rank's `buf` holds now (their `previous` is not read: pass an
    /// empty slice). On return every rank's `buf` equals the root's. Every rank must call it
    /// with buffers of the same length; the root's `previous` has that length too.
    ///
    /// A receiver whose `buf` does not hold `previous` ends up wrong where nothing changed:
    /// the delta is exact only against the version it was computed from.
    pub fn broadcast_delta<T: Element>(&self, buf: &mut [T], previous: &[T], root: usize) -> Result<DeltaStats> {
        if root >= self.world_size() {
            return Err(Error::invalid_arg(format!(
                "broadcast_delta: root {root} is out of range for {} ranks",
                self.world_size()
            )));
        }
        let n = buf.len();
        let es = std::mem::size_of::<T>();
        let mut header = [0u64; HEADER];
        let mut payload: Vec<u8> = Vec::new();
        if self.rank() == root {
            if previous.len() != n {
                return Err(Error::invalid_arg(format!(
                    "broadcast_delta: the root's previous version has {} elements, the buffer {n}",
                    previous.len()
                )));
            }
            let (new, old) = (bytes_of(buf), bytes_of(previous));
            // One pass marks every change; the encoding is read off the mask.
            let (mask, k) = changed_mask(new, old, es);
            let wide = n > u32::MAX as usize;
            let index_bytes = k * if wide { 8 } else { 4 } + k * es;
            let mask_bytes = n.div_ceil(8) + k * es;
            let full_bytes = std::mem::size_of_val(buf);
            let encoding = if k == 0 {
                DeltaEncoding::Unchanged
            } else if index_bytes.min(mask_bytes) * 2 > full_bytes {
                DeltaEncoding::Full
            } else if index_bytes <= mask_bytes {
                DeltaEncoding::Indices
            } else {
                DeltaEncoding::Bitmask
            };
            match encoding {
                DeltaEncoding::Unchanged | DeltaEncoding::Full => {}
                DeltaEncoding::Indices => {
                    payload.reserve(index_bytes);
                    for i in set_bits(&mask) {
                        if wide {
                            payload.extend_from_slice(&(i as u64).to_le_bytes());
                        } else {
                            payload.extend_from_slice(&(i as u32).to_le_bytes());
                        }
                    }
                }
                DeltaEncoding::Bitmask => {
                    payload.reserve(mask_bytes);
                    // The wire's bitmask: bit i of byte i / 8 (the words, little-endian).
                    for w in &mask {
                        payload.extend_from_slice(&w.to_le_bytes());
                    }
                    payload.truncate(n.div_ceil(8));
                }
            }
            if matches!(encoding, DeltaEncoding::Indices | DeltaEncoding::Bitmask) {
                for i in set_bits(&mask) {
                    payload.extend_from_slice(&new[i * es..(i + 1) * es]);
                }
            }
            header = [code(encoding), k as u64, payload.len() as u64, n as u64];
        }
        self.broadcast_in_place(&mut header, root)?;
        let [enc, k, len, root_n] = header;
        if root_n != n as u64 {
            return Err(Error::invalid_usage(format!(
                "broadcast_delta: rank {} has a buffer of {n} elements, the root {root_n}",
                self.rank()
            )));
        }
        let k = k as usize;
        let encoding = match enc {
            0 => DeltaEncoding::Unchanged,
            1 => DeltaEncoding::Indices,
            2 => DeltaEncoding::Bitmask,
            _ => DeltaEncoding::Full,
        };
        let stats = |bytes| DeltaStats { encoding, changed: k, bytes: bytes + HEADER * 8 };
        match encoding {
            DeltaEncoding::Unchanged => return Ok(stats(0)),
            DeltaEncoding::Full => {
                self.broadcast_in_place(buf, root)?;
                return Ok(stats(std::mem::size_of_val(buf)));
            }
            _ => {}
        }
        let len = len as usize;
        if self.rank() != root {
            payload.resize(len, 0);
        }
        self.broadcast_in_place(&mut payload, root)?;
        if self.rank() != root {
            let bad = || Error::Internal("broadcast_delta: the payload does not match its header".into());
            let dst = bytes_of_mut(buf);
            let (indices, values): (Vec<usize>, &[u8]) = if encoding == DeltaEncoding::Indices {
                let w = if n > u32::MAX as usize { 8 } else { 4 };
                let (ix, vals) = payload.split_at_checked(k * w).ok_or_else(bad)?;
                let idx = ix
                    .chunks_exact(w)
                    .map(|c| {
                        if w == 8 {
                            u64::from_le_bytes(c.try_into().expect("8")) as usize
                        } else {
                            u32::from_le_bytes(c.try_into().expect("4")) as usize
                        }
                    })
                    .collect();
                (idx, vals)
            } else {
                let (mask, vals) = payload.split_at_checked(n.div_ceil(8)).ok_or_else(bad)?;
                let words: Vec<u64> = mask
                    .chunks(8)
                    .map(|c| {
                        let mut w = [0u8; 8];
                        w[..c.len()].copy_from_slice(c);
                        u64::from_le_bytes(w)
                    })
                    .collect();
                (set_bits(&words).collect(), vals)
            };
            if indices.len() != k || values.len() != k * es || indices.iter().any(|&i| i >= n) {
                return Err(bad());
            }
            for (j, &i) in indices.iter().enumerate() {
                dst[i * es..(i + 1) * es].copy_from_slice(&values[j * es..(j + 1) * es]);
            }
        }
        Ok(stats(len))
    }
}
