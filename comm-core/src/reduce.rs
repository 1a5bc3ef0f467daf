//! Host reduction kernels.
//!
//! `dst[i] = a[i] op b[i]` for every supported type and operator. The loops are written over
//! plain slices so that the compiler vectorises them; the two shapes (in place, `dst == a`,
//! and out of place, all three disjoint) get separate loops because Rust may not alias a
//! `&mut [T]` with a `&[T]`. Integers wrap around; 16-bit floats are computed in f32 and
//! rounded once per combine. `avg` is a sum here; [`scale_avg`] divides once at the end.

use half::{bf16, f16};

use crate::dtype::{DataType, ReduceOp};

trait Arith: Copy {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn min(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
}

macro_rules! int_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline(always)] fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline(always)] fn min(self, o: Self) -> Self { Ord::min(self, o) }
            #[inline(always)] fn max(self, o: Self) -> Self { Ord::max(self, o) }
        }
    )*};
}
int_arith!(i8, u8, i32, u32, i64, u64);

macro_rules! float_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { self + o }
            #[inline(always)] fn mul(self, o: Self) -> Self { self * o }
            #[inline(always)] fn min(self, o: Self) -> Self { if o < self { o } else { self } }
            #[inline(always)] fn max(self, o: Self) -> Self { if o > self { o } else { self } }
        }
    )*};
}
float_arith!(f32, f64);

macro_rules! half_arith {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            #[inline(always)] fn add(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() + o.to_f32()) }
            #[inline(always)] fn mul(self, o: Self) -> Self { <$t>::from_f32(self.to_f32() * o.to_f32()) }
            #[inline(always)] fn min(self, o: Self) -> Self { if o < self { o } else { self } }
            #[inline(always)] fn max(self, o: Self) -> Self { if o > self { o } else { self } }
        }
    )*};
}
half_arith!(f16);

/// bf16 <-> f32 by bit arithmetic (round to nearest even, NaN kept quiet), written without
/// branches so the loops vectorise; the same results as `half`'s conversions.
#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}
#[inline(always)]
fn bf16_from_f32(v: f32) -> bf16 {
    let b = v.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x40;
    bf16::from_bits(if v.is_nan() { nan } else { rounded })
}

impl Arith for bf16 {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        bf16_from_f32(bf16_to_f32(self) + bf16_to_f32(o))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        bf16_from_f32(bf16_to_f32(self) * bf16_to_f32(o))
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        if bf16_to_f32(o) < bf16_to_f32(self) {
            o
        } else {
            self
        }
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if bf16_to_f32(o) > bf16_to_f32(self) {
            o
        } else {
            self
        }
    }
}

/// f16 with the F16C instructions (x86-64, detected at run time): 8 lanes converted to f32,
/// combined, rounded back to nearest even: bit-identical to the scalar path.
///
/// # Safety
/// The CPU has AVX and F16C; pointers as for [`reduce_raw`] (unaligned is fine).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_f16c(op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, count: usize) -> usize {
    use std::arch::x86_64::*;
    let (d, x, y) = (dst as *mut u16, a as *const u16, b as *const u16);
    let mut i = 0;
    // SAFETY: i + 8 <= count keeps every 16-byte access inside the caller's ranges; loads
    // and stores are unaligned forms. `dst` may equal `a`: each block is read before written.
    unsafe {
        while i + 8 <= count {
            let va = _mm256_cvtph_ps(_mm_loadu_si128(x.add(i) as *const __m128i));
            let vb = _mm256_cvtph_ps(_mm_loadu_si128(y.add(i) as *const __m128i));
            // Operand order as in the scalar code: min(a, b) = if b < a { b } else { a }.
            let r = match op.combine_op() {
                ReduceOp::Sum => _mm256_add_ps(va, vb),
                ReduceOp::Prod => _mm256_mul_ps(va, vb),
                ReduceOp::Min => _mm256_min_ps(vb, va),
                _ => _mm256_max_ps(vb, va),
            };
            _mm_storeu_si128(d.add(i) as *mut __m128i, _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r));
            i += 8;
        }
    }
    i
}

fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F16C: OnceLock<bool> = OnceLock::new();
        *F16C.get_or_init(|| std::is_x86_feature_detected!("avx") && std::is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[inline(always)]
fn in_place<T: Arith>(dst: &mut [T], src: &[T], f: impl Fn(T, T) -> T) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f(*d, *s);
    }
}

#[inline(always)]
fn out_of_place<T: Arith>(dst: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = f(*x, *y);
    }
}

/// # Safety
/// See [`reduce_raw`].
unsafe fn typed<T: Arith>(op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, count: usize) {
    if count == 0 {
        return;
    }
    // SAFETY: the caller guarantees `count` valid, aligned elements behind each pointer and
    // that `b` does not overlap `dst`; `a` either is `dst` or does not overlap it.
    unsafe {
        let d = std::slice::from_raw_parts_mut(dst as *mut T, count);
        let y = std::slice::from_raw_parts(b as *const T, count);
        if std::ptr::eq(a, dst) {
            match op.combine_op() {
                ReduceOp::Sum => in_place(d, y, T::add),
                ReduceOp::Prod => in_place(d, y, T::mul),
                ReduceOp::Min => in_place(d, y, T::min),
                _ => in_place(d, y, T::max),
            }
        } else {
            let x = std::slice::from_raw_parts(a as *const T, count);
            match op.combine_op() {
                ReduceOp::Sum => out_of_place(d, x, y, T::add),
                ReduceOp::Prod => out_of_place(d, x, y, T::mul),
                ReduceOp::Min => out_of_place(d, x, y, T::min),
                _ => out_of_place(d, x, y, T::max),
            }
        }
    }
}

/// `dst[i] = a[i] op b[i]` for `count` elements of `dtype` (avg combines as sum).
///
/// # Safety
/// * `dst`, `a` and `b` each point to `count` valid elements of `dtype`, aligned for it;
///   `dst` is writable.
/// * `a` is either exactly `dst` (in place) or does not overlap it; `b` does not overlap `dst`.
pub unsafe fn reduce_raw(dtype: DataType, op: ReduceOp, dst: *mut u8, a: *const u8, b: *const u8, count: usize) {
    // SAFETY: forwarded contract.
    unsafe {
        match dtype {
            DataType::F32 => typed::<f32>(op, dst, a, b, count),
            DataType::F64 => typed::<f64>(op, dst, a, b, count),
            DataType::F16 => {
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if has_f16c() {
                    done = f16_f16c(op, dst, a, b, count);
                }
                let _ = has_f16c;
                typed::<f16>(op, dst.add(done * 2), a.add(done * 2), b.add(done * 2), count - done)
            }
            DataType::Bf16 => typed::<bf16>(op, dst, a, b, count),
            DataType::I8 => typed::<i8>(op, dst, a, b, count),
            DataType::U8 => typed::<u8>(op, dst, a, b, count),
            DataType::I32 => typed::<i32>(op, dst, a, b, count),
            DataType::U32 => typed::<u32>(op, dst, a, b, count),
            DataType::I64 => typed::<i64>(op, dst, a, b, count),
            DataType::U64 => typed::<u64>(op, dst, a, b, count),
        }
    }
}

/// Divides `count` elements at `dst` by `n` (the last step of avg). No-op on integers,
/// where avg is rejected before any byte moves.
///
/// # Safety
/// `dst` points to `count` valid, aligned, writable elements of `dtype`.
pub unsafe fn scale_avg(dtype: DataType, dst: *mut u8, count: usize, n: usize) {
    if count == 0 {
        return;
    }
    let inv = n as f64;
    // SAFETY: forwarded contract.
    unsafe {
        match dtype {
            DataType::F32 => {
                std::slice::from_raw_parts_mut(dst as *mut f32, count).iter_mut().for_each(|v| *v /= inv as f32)
            }
            DataType::F64 => std::slice::from_raw_parts_mut(dst as *mut f64, count).iter_mut().for_each(|v| *v /= inv),
            DataType::F16 => std::slice::from_raw_parts_mut(dst as *mut f16, count)
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(v.to_f32() / inv as f32)),
            DataType::Bf16 => std::slice::from_raw_parts_mut(dst as *mut bf16, count)
                .iter_mut()
                .for_each(|v| *v = bf16_from_f32(bf16_to_f32(*v) / inv as f32)),
            _ => {}
        }
    }
}

/// Safe in-place form: `dst[i] = dst[i] op src[i]`.
pub fn reduce_in_place<T: crate::Element>(op: ReduceOp, dst: &mut [T], src: &[T]) {
    let n = dst.len().min(src.len());
    // SAFETY: both slices are valid for `n` elements of T (= T::DTYPE) and cannot overlap
    // (one is borrowed mutably).
    unsafe {
        reduce_raw(T::DTYPE, op, dst.as_mut_ptr() as *mut u8, dst.as_ptr() as *const u8, src.as_ptr() as *const u8, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_and_op() {
        let a: Vec<i32> = vec![3, -7, 100, i32::MAX];
        let b: Vec<i32> = vec![5, 2, -100, 1];
        let mut d = a.clone();
        reduce_in_place(ReduceOp::Sum, &mut d, &b);
        assert_eq!(d, vec![8, -5, 0, i32::MIN]);
        let mut d = a.clone();
        reduce_in_place(ReduceOp::Prod, &mut d, &b);
        assert_eq!(d, vec![15, -14, -10000, i32::MAX]);
        let mut d = a.clone();
        reduce_in_place(ReduceOp::Min, &mut d, &b);
        assert_eq!(d, vec![3, -7, -100, 1]);
        let mut d = a.clone();
        reduce_in_place(ReduceOp::Max, &mut d, &b);
        assert_eq!(d, vec![5, 2, 100, i32::MAX]);

        let x = [f16::from_f32(1.5), f16::from_f32(-2.0)];
        let mut y = [f16::from_f32(0.25), f16::from_f32(4.0)];
        reduce_in_place(ReduceOp::Sum, &mut y, &x);
        assert_eq!(y, [f16::from_f32(1.75), f16::from_f32(2.0)]);
        let mut z = [bf16::from_f32(3.0)];
        reduce_in_place(ReduceOp::Prod, &mut z, &[bf16::from_f32(-0.5)]);
        assert_eq!(z, [bf16::from_f32(-1.5)]);
        let mut u = [200u8];
        reduce_in_place(ReduceOp::Sum, &mut u, &[100u8]);
        assert_eq!(u, [44]);
    }

    /// The fast conversions agree with `half`'s on every bf16 value and on f32 values around
    /// rounding boundaries; the F16C path agrees with the scalar path on every f16 pair tried.
    #[test]
    fn sixteen_bit_paths_match_reference() {
        for bits in 0..=u16::MAX {
            let h = bf16::from_bits(bits);
            let (got, want) = (bf16_to_f32(h), h.to_f32());
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#x}");
        }
        let mut x = 0x3f80_0000u32;
        for _ in 0..200_000 {
            let v = f32::from_bits(x);
            let (got, want) = (bf16_from_f32(v), bf16::from_f32(v));
            assert!(got == want || (got.is_nan() && want.is_nan()), "{v:e}: {got} vs {want}");
            x = x.wrapping_add(0x0001_3579);
        }
        let vals: Vec<f16> = (0..4099u32).map(|i| f16::from_bits((i.wrapping_mul(40503) % 0x7c00) as u16)).collect();
        let other: Vec<f16> = vals.iter().rev().cloned().collect();
        for op in [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max] {
            let mut fast = vals.clone();
            reduce_in_place(op, &mut fast, &other);
            let slow: Vec<f16> = vals
                .iter()
                .zip(&other)
                .map(|(a, b)| match op {
                    ReduceOp::Sum => a.add(*b),
                    ReduceOp::Prod => a.mul(*b),
                    ReduceOp::Min => Arith::min(*a, *b),
                    _ => Arith::max(*a, *b),
                })
                .collect();
            assert_eq!(
                fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                slow.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{op}"
            );
        }
    }

    #[test]
    fn out_of_place_and_avg() {
        let a = [1.0f64, 2.0, 3.0];
        let b = [10.0f64, 20.0, 30.0];
        let mut d = [0.0f64; 3];
        // SAFETY: three distinct arrays of 3 f64.
        unsafe {
            reduce_raw(
                DataType::F64,
                ReduceOp::Avg,
                d.as_mut_ptr() as *mut u8,
                a.as_ptr() as *const u8,
                b.as_ptr() as *const u8,
                3,
            );
            scale_avg(DataType::F64, d.as_mut_ptr() as *mut u8, 3, 2);
        }
        assert_eq!(d, [5.5, 11.0, 16.5]);
    }
}
