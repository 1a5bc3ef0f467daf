//! `ncclRedOpCreatePreMulSum`: each rank multiplies its input by a scalar, then the inputs
//! are summed. On host memory OxCCL does the multiply as a pass of its own (into the output,
//! or a scratch buffer when the output cannot hold the input), then an ordinary sum.

use oxccl::half::{bf16, f16};
use oxccl::DataType;

use crate::types::Fail;

/// Where the scalar is read.
#[derive(Debug, Clone)]
pub enum Scalar {
    /// Read when the operator was made (`ncclScalarHostImmediate`): its bytes.
    Value(Vec<u8>),
    /// Read at each collective (`ncclScalarDevice`, on host memory here): its address.
    At(usize),
}

/// A pre-multiply-then-sum operator of one communicator.
#[derive(Debug, Clone)]
pub struct PreMul {
    /// The type it was made for (a collective of another type is refused).
    pub dtype: DataType,
    /// The scalar.
    pub scalar: Scalar,
}

impl PreMul {
    /// The scalar's bytes now.
    fn scalar_bytes(&self) -> Vec<u8> {
        match &self.scalar {
            Scalar::Value(v) => v.clone(),
            // SAFETY: the caller of ncclRedOpCreatePreMulSum promised the scalar stays valid
            // while the operator is used (as NCCL requires); it is host memory (checked then).
            Scalar::At(a) => unsafe {
                std::slice::from_raw_parts(std::ptr::with_exposed_provenance::<u8>(*a), self.dtype.size()).to_vec()
            },
        }
    }

    /// Writes `count` elements of `src`, each times the scalar, to `dst` (which may be `src`).
    ///
    /// # Safety
    ///
    /// `src` is readable and `dst` writable for `count` elements of the operator's type.
    pub unsafe fn scale(&self, src: *const u8, dst: *mut u8, count: usize) -> Result<(), Fail> {
        let s = self.scalar_bytes();
        macro_rules! each {
            ($t:ty, $mul:expr) => {{
                let k: $t = read(&s);
                for i in 0..count {
                    // SAFETY: i < count, within both buffers (the caller's promise); unaligned
                    // access is allowed by read_unaligned/write_unaligned.
                    unsafe {
                        let x = (src as *const $t).add(i).read_unaligned();
                        (dst as *mut $t).add(i).write_unaligned($mul(x, k));
                    }
                }
            }};
        }
        match self.dtype {
            DataType::F32 => each!(f32, |x: f32, k: f32| x * k),
            DataType::F64 => each!(f64, |x: f64, k: f64| x * k),
            DataType::F16 => each!(f16, |x: f16, k: f16| f16::from_f32(x.to_f32() * k.to_f32())),
            DataType::Bf16 => each!(bf16, |x: bf16, k: bf16| bf16::from_f32(x.to_f32() * k.to_f32())),
            DataType::I8 => each!(i8, |x: i8, k: i8| x.wrapping_mul(k)),
            DataType::U8 => each!(u8, |x: u8, k: u8| x.wrapping_mul(k)),
            DataType::I32 => each!(i32, |x: i32, k: i32| x.wrapping_mul(k)),
            DataType::U32 => each!(u32, |x: u32, k: u32| x.wrapping_mul(k)),
            DataType::I64 => each!(i64, |x: i64, k: i64| x.wrapping_mul(k)),
            DataType::U64 => each!(u64, |x: u64, k: u64| x.wrapping_mul(k)),
            #[allow(unreachable_patterns)]
            other => return Err(Fail::arg(format!("no pre-multiply for {other:?}"))),
        }
        Ok(())
    }
}

fn read<T: Copy>(b: &[u8]) -> T {
    assert!(b.len() >= std::mem::size_of::<T>());
    // SAFETY: b holds at least size_of::<T>() bytes (asserted); any bit pattern is a value of
    // the plain number types this is used with.
    unsafe { (b.as_ptr() as *const T).read_unaligned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_multiplies_every_type() {
        let p = PreMul { dtype: DataType::F32, scalar: Scalar::Value(0.5f32.to_ne_bytes().to_vec()) };
        let mut v = [2f32, 4.0, -6.0];
        // SAFETY: in place over v's three elements.
        unsafe { p.scale(v.as_ptr() as *const u8, v.as_mut_ptr() as *mut u8, 3) }.unwrap();
        assert_eq!(v, [1.0, 2.0, -3.0]);
        let k = 3i64;
        let p = PreMul { dtype: DataType::I64, scalar: Scalar::At((&k as *const i64).expose_provenance()) };
        let (a, mut b) = ([1i64, -2], [0i64; 2]);
        // SAFETY: a readable and b writable for two elements; k outlives the call.
        unsafe { p.scale(a.as_ptr() as *const u8, b.as_mut_ptr() as *mut u8, 2) }.unwrap();
        assert_eq!(b, [3, -6]);
        let p = PreMul {
            dtype: DataType::Bf16,
            scalar: Scalar::Value(bf16::from_f32(2.0).to_bits().to_ne_bytes().to_vec()),
        };
        let mut h = [bf16::from_f32(1.5), bf16::from_f32(-4.0)];
        // SAFETY: in place over h.
        unsafe { p.scale(h.as_ptr() as *const u8, h.as_mut_ptr() as *mut u8, 2) }.unwrap();
        assert_eq!(h.map(|x| x.to_f32()), [3.0, -8.0]);
    }
}
