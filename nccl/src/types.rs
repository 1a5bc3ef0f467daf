//! The C types of the NCCL ABI (`include/nccl.h`), as Rust sees them, and the mapping of
//! their values onto OxCCL's.

#![allow(non_camel_case_types, non_upper_case_globals)]

use std::ffi::{c_char, c_int, c_uint};

use oxccl::{DataType, Error, ReduceOp};

/// A call's result (`ncclResult_t`).
pub type ncclResult_t = c_int;
/// Success.
pub const ncclSuccess: ncclResult_t = 0;
/// A CUDA call failed.
pub const ncclUnhandledCudaError: ncclResult_t = 1;
/// A system call failed (or the network, or the store).
pub const ncclSystemError: ncclResult_t = 2;
/// A bug, or memory corruption.
pub const ncclInternalError: ncclResult_t = 3;
/// An argument is wrong.
pub const ncclInvalidArgument: ncclResult_t = 4;
/// A call made when it may not be, or what this library cannot do.
pub const ncclInvalidUsage: ncclResult_t = 5;
/// Another rank failed, was lost, or does not answer.
pub const ncclRemoteError: ncclResult_t = 6;
/// A non-blocking call is still running.
pub const ncclInProgress: ncclResult_t = 7;
/// How many results there are.
pub const ncclNumResults: ncclResult_t = 8;

/// The version `ncclGetVersion` reports: the NCCL ABI this library follows (2.27.3).
pub const NCCL_VERSION_CODE: c_int = 22703;

/// The bytes of a unique id.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

/// What ranks need to meet (`ncclUniqueId`), passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ncclUniqueId {
    /// Opaque bytes (see `id.rs` for OxCCL's layout).
    pub internal: [c_char; NCCL_UNIQUE_ID_BYTES],
}

impl std::fmt::Debug for ncclUniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ncclUniqueId")
    }
}

/// `NCCL_CONFIG_INITIALIZER`'s magic.
pub const NCCL_CONFIG_MAGIC: c_uint = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`.
pub const NCCL_CONFIG_UNDEF_INT: c_int = c_int::MIN;
/// `NCCL_SPLIT_NOCOLOR`.
pub const NCCL_SPLIT_NOCOLOR: c_int = -1;
/// `NCCL_SHRINK_ABORT`: abort the parent before shrinking.
pub const NCCL_SHRINK_ABORT: c_int = 0x01;

/// A communicator's configuration (NCCL 2.27's `ncclConfig_t`). Only the fields within
/// `size` are read: a configuration from an older `nccl.h` is shorter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(non_snake_case)]
pub struct ncclConfig_t {
    pub size: usize,
    pub magic: c_uint,
    pub version: c_uint,
    pub blocking: c_int,
    pub cgaClusterSize: c_int,
    pub minCTAs: c_int,
    pub maxCTAs: c_int,
    pub netName: *const c_char,
    pub splitShare: c_int,
    pub trafficClass: c_int,
    pub commName: *const c_char,
    pub collnetEnable: c_int,
    pub CTAPolicy: c_int,
    pub shrinkShare: c_int,
    pub nvlsCTAs: c_int,
}

impl ncclConfig_t {
    /// `NCCL_CONFIG_INITIALIZER`: this struct's size, the magic, the version, every other
    /// field undefined.
    pub fn initializer() -> ncclConfig_t {
        ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: NCCL_CONFIG_MAGIC,
            version: NCCL_VERSION_CODE as c_uint,
            blocking: NCCL_CONFIG_UNDEF_INT,
            cgaClusterSize: NCCL_CONFIG_UNDEF_INT,
            minCTAs: NCCL_CONFIG_UNDEF_INT,
            maxCTAs: NCCL_CONFIG_UNDEF_INT,
            netName: std::ptr::null(),
            splitShare: NCCL_CONFIG_UNDEF_INT,
            trafficClass: NCCL_CONFIG_UNDEF_INT,
            commName: std::ptr::null(),
            collnetEnable: NCCL_CONFIG_UNDEF_INT,
            CTAPolicy: NCCL_CONFIG_UNDEF_INT,
            shrinkShare: NCCL_CONFIG_UNDEF_INT,
            nvlsCTAs: NCCL_CONFIG_UNDEF_INT,
        }
    }
}

/// The built-in reduction operators; values from [`NCCL_NUM_OPS`] up are made at run time.
pub const NCCL_NUM_OPS: c_int = 5;
/// `ncclScalarDevice`: the scalar is read while the collective runs.
pub const ncclScalarDevice: c_int = 0;
/// `ncclScalarHostImmediate`: the scalar is read when the operator is made.
pub const ncclScalarHostImmediate: c_int = 1;

/// An `ncclRedOp_t` built into NCCL, as OxCCL's operator (`None`: made at run time, or
/// unknown).
#[inline(always)]
pub fn builtin_op(op: c_int) -> Option<ReduceOp> {
    Some(match op {
        0 => ReduceOp::Sum,
        1 => ReduceOp::Prod,
        2 => ReduceOp::Max,
        3 => ReduceOp::Min,
        4 => ReduceOp::Avg,
        _ => return None,
    })
}

/// The NCCL name of a data type value, for errors.
pub fn dtype_name(d: c_int) -> &'static str {
    match d {
        0 => "ncclInt8",
        1 => "ncclUint8",
        2 => "ncclInt32",
        3 => "ncclUint32",
        4 => "ncclInt64",
        5 => "ncclUint64",
        6 => "ncclFloat16",
        7 => "ncclFloat32",
        8 => "ncclFloat64",
        9 => "ncclBfloat16",
        10 => "ncclFloat8e4m3",
        11 => "ncclFloat8e5m2",
        _ => "an unknown data type",
    }
}

/// The OxCCL type of `ncclDataType_t` value `d`. The fp8 types move as bytes (broadcast,
/// gathers, all-to-all, send/recv); a reduction of them is refused (`reducing`).
#[inline(always)]
pub fn dtype(d: c_int, reducing: bool) -> Result<DataType, Fail> {
    Ok(match d {
        0 => DataType::I8,
        1 => DataType::U8,
        2 => DataType::I32,
        3 => DataType::U32,
        4 => DataType::I64,
        5 => DataType::U64,
        6 => DataType::F16,
        7 => DataType::F32,
        8 => DataType::F64,
        9 => DataType::Bf16,
        10 | 11 if !reducing => DataType::U8,
        10 | 11 => {
            return Err(Fail::new(
                ncclInvalidArgument,
                format!(
                "{} cannot be reduced by OxCCL (fp8 types move as bytes: broadcast, gathers, all-to-all, send/recv)",
                dtype_name(d)
            ),
            ))
        }
        _ => return Err(Fail::new(ncclInvalidArgument, format!("data type {d} is not an ncclDataType_t (0 to 11)"))),
    })
}

/// A failed call: its result and the words `ncclGetLastError` gives.
#[derive(Debug, Clone)]
pub struct Fail {
    /// The result returned.
    pub code: ncclResult_t,
    /// Why.
    pub msg: String,
}

impl Fail {
    /// A failure with `code` and `msg`.
    pub fn new(code: ncclResult_t, msg: impl Into<String>) -> Fail {
        Fail { code, msg: msg.into() }
    }
    /// An invalid argument.
    pub fn arg(msg: impl Into<String>) -> Fail {
        Fail::new(ncclInvalidArgument, msg)
    }
    /// A call this library cannot make, or may not make now.
    pub fn usage(msg: impl Into<String>) -> Fail {
        Fail::new(ncclInvalidUsage, msg)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let code = match &e {
            Error::InvalidArgument(_) => ncclInvalidArgument,
            Error::InvalidUsage(_) | Error::Unsupported(_) | Error::Aborted(_) => ncclInvalidUsage,
            Error::Remote { .. } | Error::Timeout { .. } => ncclRemoteError,
            Error::Transport { .. } | Error::Store(_) => ncclSystemError,
            Error::Internal(_) => ncclInternalError,
            Error::Cuda { .. } => ncclUnhandledCudaError,
            _ => ncclInternalError,
        };
        Fail { code, msg: e.to_string() }
    }
}

/// `ncclGetErrorString`'s words for `r`.
pub fn result_str(r: ncclResult_t) -> &'static std::ffi::CStr {
    match r {
        ncclSuccess => c"no error",
        ncclUnhandledCudaError => c"unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        ncclSystemError => {
            c"unhandled system error (the network or the rendezvous store failed; ncclGetLastError says which)"
        }
        ncclInternalError => c"internal error - please report this issue to the OxCCL developers",
        ncclInvalidArgument => c"invalid argument (ncclGetLastError says which)",
        ncclInvalidUsage => c"invalid usage (ncclGetLastError says why)",
        ncclRemoteError => c"remote process exited or there was a network error",
        ncclInProgress => c"NCCL operation in progress",
        _ => c"unknown result code",
    }
}
