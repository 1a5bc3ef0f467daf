//! GPU reduction kernels: `dst[i] = a[i] op b[i]` for every data type and operator, written
//! as CUDA C, compiled with NVRTC on first use (to PTX, which the driver compiles for the GPU
//! at hand) and kept for the life of the process.
//!
//! They follow the host kernels (`oxccl_core::reduce`) exactly: integers wrap around (the
//! arithmetic is done unsigned, where C defines wrapping), f16 and bf16 are computed in f32
//! and rounded once per combine (round to nearest even; bf16 NaN stays NaN), `min`/`max`
//! keep the first operand unless the second is strictly smaller/larger, and `avg` combines as
//! a sum (the division comes once at the end). The 16-bit conversions use PTX `cvt` and bit
//! operations, so no CUDA header is needed at run time.

use std::sync::OnceLock;

use oxccl_core::{DataType, ReduceOp};

/// The name of the kernel for `dtype` and `op` (`oxccl_reduce_f32_sum`, ...). `avg` shares
/// `sum`'s kernel.
pub fn kernel_name(dtype: DataType, op: ReduceOp) -> String {
    let op = if op == ReduceOp::Avg { ReduceOp::Sum } else { op };
    format!("oxccl_reduce_{}_{}", c_name(dtype), op.name())
}

fn c_name(d: DataType) -> &'static str {
    match d {
        DataType::F32 => "f32",
        DataType::F64 => "f64",
        DataType::F16 => "f16",
        DataType::Bf16 => "bf16",
        DataType::I8 => "i8",
        DataType::U8 => "u8",
        DataType::I32 => "i32",
        DataType::U32 => "u32",
        DataType::I64 => "i64",
        DataType::U64 => "u64",
    }
}

/// (storage type, unsigned type of the same width) in C.
fn c_types(d: DataType) -> (&'static str, &'static str) {
    match d {
        DataType::F32 => ("float", ""),
        DataType::F64 => ("double", ""),
        DataType::F16 | DataType::Bf16 => ("u16", ""),
        DataType::I8 => ("signed char", "unsigned char"),
        DataType::U8 => ("unsigned char", "unsigned char"),
        DataType::I32 => ("int", "unsigned int"),
        DataType::U32 => ("unsigned int", "unsigned int"),
        DataType::I64 => ("long long", "unsigned long long"),
        DataType::U64 => ("unsigned long long", "unsigned long long"),
    }
}

/// The C expression combining `x` and `y` (values of the storage type).
fn expr(d: DataType, op: ReduceOp) -> String {
    let minmax = |lt: &str| format!("(y {lt} x ? y : x)");
    match d {
        DataType::F16 | DataType::Bf16 => {
            let (to, from) = if d == DataType::F16 { ("h2f", "f2h") } else { ("b2f", "f2b") };
            match op {
                ReduceOp::Sum | ReduceOp::Avg => format!("{from}({to}(x) + {to}(y))"),
                ReduceOp::Prod => format!("{from}({to}(x) * {to}(y))"),
                ReduceOp::Min => format!("({to}(y) < {to}(x) ? y : x)"),
                ReduceOp::Max => format!("({to}(y) > {to}(x) ? y : x)"),
            }
        }
        DataType::F32 | DataType::F64 => match op {
            ReduceOp::Sum | ReduceOp::Avg => "x + y".into(),
            ReduceOp::Prod => "x * y".into(),
            ReduceOp::Min => minmax("<"),
            ReduceOp::Max => minmax(">"),
        },
        _ => {
            let (t, u) = c_types(d);
            match op {
                ReduceOp::Sum | ReduceOp::Avg => format!("({t})(({u})x + ({u})y)"),
                ReduceOp::Prod => format!("({t})(({u})x * ({u})y)"),
                ReduceOp::Min => minmax("<"),
                ReduceOp::Max => minmax(">"),
            }
        }
    }
}

const PRELUDE: &str = r#"
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f2b(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
"#;

/// The pairs that have a kernel: every type with sum, prod, min and max (`avg` uses sum's).
pub fn pairs() -> impl Iterator<Item = (DataType, ReduceOp)> {
    DataType::ALL
        .into_iter()
        .flat_map(|d| [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max].into_iter().map(move |o| (d, o)))
}

/// The CUDA C source of every kernel, one module.
pub fn source() -> String {
    let mut s = String::from(PRELUDE);
    for (d, op) in pairs() {
        let (t, _) = c_types(d);
        s += &format!(
            "extern \"C\" __global__ void {name}({t}* dst, const {t}* a, const {t}* b, u64 n) {{\n\
             \x20   for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {{\n\
             \x20       {t} x = a[i]; {t} y = b[i]; dst[i] = {e};\n\
             \x20   }}\n}}\n",
            name = kernel_name(d, op),
            e = expr(d, op),
        );
    }
    for d in [DataType::F32, DataType::F64, DataType::F16, DataType::Bf16] {
        let (t, _) = c_types(d);
        let e = match d {
            DataType::F32 => "dst[i] / (float)div".to_string(),
            DataType::F64 => "dst[i] / div".to_string(),
            DataType::F16 => "f2h(h2f(dst[i]) / (float)div)".to_string(),
            _ => "f2b(b2f(dst[i]) / (float)div)".to_string(),
        };
        s += &format!(
            "extern \"C\" __global__ void {name}({t}* dst, u64 n, double div) {{\n\
             \x20   for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {{\n\
             \x20       dst[i] = {e};\n\
             \x20   }}\n}}\n",
            name = scale_name(d).expect("a floating type"),
        );
    }
    s
}

/// The name of the kernel that divides `dtype` elements by the number of ranks (the end of
/// avg): floating types only (avg on integers is refused before any byte moves).
pub fn scale_name(dtype: DataType) -> Option<String> {
    matches!(dtype, DataType::F32 | DataType::F64 | DataType::F16 | DataType::Bf16)
        .then(|| format!("oxccl_scale_{}", c_name(dtype)))
}

/// The virtual architecture the PTX is made for: Volta and newer (f16 `cvt` needs sm_53).
pub const ARCH: &str = "compute_70";
/// With NVRTC 13 (which compiles for Turing and newer only).
pub const ARCH_CUDA13: &str = "compute_75";

/// The kernels' PTX, compiled with NVRTC on first use; `Err` says why it could not be
/// (NVRTC missing: `libnvrtc.so.12` not on the loader path; or its log).
pub fn ptx() -> Result<&'static str, String> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        // SAFETY: only tries to open the library by its names.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err("no NVRTC (libnvrtc.so.12 is not on the loader path)".into());
        }
        // CUDA 13's NVRTC dropped Volta: the oldest architecture it compiles for is Turing.
        let (mut major, mut minor) = (0, 0);
        // SAFETY: NVRTC is loaded (checked above); two valid out pointers.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        let arch = if major >= 13 { ARCH_CUDA13 } else { ARCH };
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            name: Some("oxccl_reduce.cu".into()),
            ..Default::default()
        };
        cudarc::nvrtc::compile_ptx_with_opts(source(), opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile the reduction kernels: {e:?}"))
    })
    .as_ref()
    .map(String::as_str)
    .map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_compile_with_nvrtc_for_every_type_and_operator() {
        let ptx = match ptx() {
            Ok(p) => p,
            Err(why) if why.starts_with("no NVRTC") => {
                oxccl_core::testing::skip(oxccl_core::testing::Need::Nvrtc, &why);
                return;
            }
            Err(why) => panic!("{why}"),
        };
        let mut n = 0;
        for (d, op) in pairs() {
            let entry = format!(".entry {}(", kernel_name(d, op));
            assert!(ptx.contains(&entry), "{entry} missing from the PTX");
            n += 1;
        }
        assert_eq!(n, 40);
        for d in DataType::ALL {
            if let Some(k) = scale_name(d) {
                assert!(ptx.contains(&format!(".entry {k}(")), "{k} missing from the PTX");
            }
        }
        // The 16-bit types convert through f32 with the rounding the host uses.
        assert!(ptx.contains("cvt.rn.f16.f32") && ptx.contains("cvt.f32.f16"));
        println!("{n} kernels, {} bytes of PTX for {ARCH}", ptx.len());
    }

    #[test]
    fn every_type_and_operator_has_a_kernel_name() {
        for d in DataType::ALL {
            for op in ReduceOp::ALL {
                let k = kernel_name(d, op);
                assert!(source().contains(&format!("void {k}(")), "{k}");
            }
        }
        assert_eq!(kernel_name(DataType::F32, ReduceOp::Avg), "oxccl_reduce_f32_sum");
    }
}
