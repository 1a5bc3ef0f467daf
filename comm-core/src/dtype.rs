//! Data types and reduction operators.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The element types a collective can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    Bf16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl DataType {
    /// Every data type, in a stable order (tests iterate over this).
    pub const ALL: [DataType; 10] = [
        DataType::F32,
        DataType::F64,
        DataType::F16,
        DataType::Bf16,
        DataType::I8,
        DataType::U8,
        DataType::I32,
        DataType::U32,
        DataType::I64,
        DataType::U64,
    ];

    /// Its position in [`DataType::ALL`] (a stable code: wire digests and flight records
    /// carry it).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 => 1,
            DataType::F16 | DataType::Bf16 => 2,
            DataType::F32 | DataType::I32 | DataType::U32 => 4,
            DataType::F64 | DataType::I64 | DataType::U64 => 8,
        }
    }

    /// Floating-point types (the ones `avg` is defined on).
    pub const fn is_float(self) -> bool {
        matches!(self, DataType::F32 | DataType::F64 | DataType::F16 | DataType::Bf16)
    }

    /// Unit roundoff of a floating-point type (half the distance from 1 to the next value):
    /// the relative error of one rounding. `None` for integers (exact, wrapping).
    pub fn unit_roundoff(self) -> Option<f64> {
        match self {
            DataType::F32 => Some(2f64.powi(-24)),
            DataType::F64 => Some(2f64.powi(-53)),
            DataType::F16 => Some(2f64.powi(-11)),
            DataType::Bf16 => Some(2f64.powi(-8)),
            _ => None,
        }
    }

    /// The name nccl-tests prints for this type.
    pub const fn name(self) -> &'static str {
        match self {
            DataType::F32 => "float",
            DataType::F64 => "double",
            DataType::F16 => "half",
            DataType::Bf16 => "bfloat16",
            DataType::I8 => "int8",
            DataType::U8 => "uint8",
            DataType::I32 => "int32",
            DataType::U32 => "uint32",
            DataType::I64 => "int64",
            DataType::U64 => "uint64",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DataType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float" | "float32" => DataType::F32,
            "f64" | "double" | "float64" => DataType::F64,
            "f16" | "half" | "float16" => DataType::F16,
            "bf16" | "bfloat16" => DataType::Bf16,
            "i8" | "int8" | "char" => DataType::I8,
            "u8" | "uint8" => DataType::U8,
            "i32" | "int32" | "int" => DataType::I32,
            "u32" | "uint32" => DataType::U32,
            "i64" | "int64" => DataType::I64,
            "u64" | "uint64" => DataType::U64,
            _ => {
                return Err(Error::invalid_arg(format!(
                    "unknown data type '{s}' (expected one of f32 f64 f16 bf16 i8 u8 i32 u32 i64 u64)"
                )))
            }
        })
    }
}

/// Reduction operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceOp {
    /// Sum. Integers wrap around (two's complement), as in NCCL.
    Sum,
    /// Product. Integers wrap around.
    Prod,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Average: the sum divided by the number of ranks. Floating-point types only.
    Avg,
}

impl ReduceOp {
    /// Every operator.
    pub const ALL: [ReduceOp; 5] = [ReduceOp::Sum, ReduceOp::Prod, ReduceOp::Min, ReduceOp::Max, ReduceOp::Avg];

    /// Its position in [`ReduceOp::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name nccl-tests prints.
    pub const fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    /// Checks that this operator is defined on `dtype`.
    pub fn check(self, dtype: DataType) -> Result<()> {
        if self == ReduceOp::Avg && !dtype.is_float() {
            return Err(Error::invalid_arg(format!(
                "reduce op avg is defined on floating-point types only, not on {dtype}; \
                 use sum and divide, or convert to a float type"
            )));
        }
        Ok(())
    }

    /// The operator the element-wise kernels apply: avg sums, then divides once at the end.
    pub const fn combine_op(self) -> ReduceOp {
        match self {
            ReduceOp::Avg => ReduceOp::Sum,
            op => op,
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ReduceOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sum" => ReduceOp::Sum,
            "prod" => ReduceOp::Prod,
            "min" => ReduceOp::Min,
            "max" => ReduceOp::Max,
            "avg" => ReduceOp::Avg,
            _ => {
                return Err(Error::invalid_arg(format!(
                    "unknown reduce op '{s}' (expected sum, prod, min, max or avg)"
                )))
            }
        })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that maps to a [`DataType`]. Implemented for the ten supported types only.
pub trait Element: sealed::Sealed + Copy + Send + Sync + Default + PartialEq + fmt::Debug + 'static {
    /// The matching data type.
    const DTYPE: DataType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t { const DTYPE: DataType = DataType::$d; }
    )*};
}
element!(f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => Bf16, i8 => I8, u8 => U8,
         i32 => I32, u32 => U32, i64 => I64, u64 => U64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_the_position_in_all() {
        for (i, d) in DataType::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "{d}");
        }
        for (i, o) in ReduceOp::ALL.iter().enumerate() {
            assert_eq!(o.index(), i);
        }
    }

    #[test]
    fn names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(d.name().parse::<DataType>().unwrap(), d);
        }
        for op in ReduceOp::ALL {
            assert_eq!(op.name().parse::<ReduceOp>().unwrap(), op);
        }
        assert!("f128".parse::<DataType>().is_err());
        assert!("xor".parse::<ReduceOp>().is_err());
    }

    #[test]
    fn avg_only_on_floats() {
        for d in DataType::ALL {
            assert_eq!(ReduceOp::Avg.check(d).is_ok(), d.is_float(), "{d}");
            assert!(ReduceOp::Sum.check(d).is_ok());
        }
        let e = ReduceOp::Avg.check(DataType::I32).unwrap_err().to_string();
        assert!(e.contains("avg") && e.contains("int32"), "{e}");
    }
}
