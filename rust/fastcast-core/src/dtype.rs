//! The dtypes fastcast knows: every safetensors dtype is recognised, a few
//! floating-point ones can be cast, and everything else is copied untouched.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// A safetensors element type.
///
/// Every dtype the safetensors format defines is recognised so that any file
/// can be read and copied; only the ones for which [`DType::is_castable`] is
/// true are ever converted.
///
/// ```
/// use fastcast_core::DType;
/// let d: DType = "torch.bfloat16".parse().unwrap();
/// assert_eq!(d, DType::BF16);
/// assert_eq!(d.safetensors_name(), "BF16");
/// assert_eq!(d.bits(), 16);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    C64,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    F4,
    F6E2M3,
    F6E3M2,
}

/// Dtypes fastcast casts between; every pair of them is supported.
pub const CASTABLE: [DType; 6] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
];

/// Every dtype, in the order the safetensors README lists them.
pub const ALL: [DType; 22] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::I16,
    DType::U16,
    DType::I32,
    DType::U32,
    DType::I64,
    DType::U64,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
    DType::C64,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::F8E8M0,
    DType::F8E4M3Fnuz,
    DType::F8E5M2Fnuz,
    DType::F4,
    DType::F6E2M3,
    DType::F6E3M2,
];

impl DType {
    /// The name in a safetensors header (`"BF16"`, `"F8_E4M3"`).
    pub const fn safetensors_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::C64 => "C64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
            DType::F8E4M3Fnuz => "F8_E4M3FNUZ",
            DType::F8E5M2Fnuz => "F8_E5M2FNUZ",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
        }
    }

    /// The torch name without the `torch.` prefix, which is also what
    /// transformers writes as `torch_dtype` in config.json.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::C64 => "complex64",
            DType::F8E4M3 => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E8M0 => "float8_e8m0fnu",
            DType::F8E4M3Fnuz => "float8_e4m3fnuz",
            DType::F8E5M2Fnuz => "float8_e5m2fnuz",
            DType::F4 => "float4_e2m1fn_x2",
            DType::F6E2M3 => "float6_e2m3fn",
            DType::F6E3M2 => "float6_e3m2fn",
        }
    }

    /// Short names users type on the command line, besides the safetensors
    /// and torch names (matching is case-insensitive).
    pub const fn aliases(self) -> &'static [&'static str] {
        match self {
            DType::Bool => &[],
            DType::U8 => &[],
            DType::I8 => &[],
            DType::I16 => &["short"],
            DType::U16 => &[],
            DType::I32 => &["int"],
            DType::U32 => &[],
            DType::I64 => &["long"],
            DType::U64 => &[],
            DType::F16 => &["fp16", "half", "f16"],
            DType::BF16 => &["bf16"],
            DType::F32 => &["fp32", "float", "f32"],
            DType::F64 => &["fp64", "double", "f64"],
            DType::C64 => &["cfloat"],
            DType::F8E4M3 => &[
                "fp8_e4m3",
                "fp8_e4m3fn",
                "f8_e4m3fn",
                "e4m3",
                "e4m3fn",
                "fp8",
            ],
            DType::F8E5M2 => &["fp8_e5m2", "e5m2"],
            DType::F8E8M0 => &[],
            DType::F8E4M3Fnuz => &[],
            DType::F8E5M2Fnuz => &[],
            DType::F4 => &[],
            DType::F6E2M3 => &[],
            DType::F6E3M2 => &[],
        }
    }

    /// The short name of a castable dtype, as used in default output folder
    /// names (`model-bf16`) and in messages; `None` for the others.
    ///
    /// ```
    /// use fastcast_core::DType;
    /// assert_eq!(DType::F8E4M3.short_name(), Some("fp8_e4m3"));
    /// assert_eq!(DType::I64.short_name(), None);
    /// ```
    pub const fn short_name(self) -> Option<&'static str> {
        match self {
            DType::BF16 => Some("bf16"),
            DType::F16 => Some("fp16"),
            DType::F32 => Some("fp32"),
            DType::F64 => Some("fp64"),
            DType::F8E4M3 => Some("fp8_e4m3"),
            DType::F8E5M2 => Some("fp8_e5m2"),
            _ => None,
        }
    }

    /// The largest finite value of a castable dtype (`F8_E4M3` is e4m3fn,
    /// whose top code is NaN: 448); `None` for the others.
    ///
    /// ```
    /// use fastcast_core::DType;
    /// assert_eq!(DType::F16.max_finite(), Some(65504.0));
    /// assert_eq!(DType::U8.max_finite(), None);
    /// ```
    pub const fn max_finite(self) -> Option<f64> {
        match self {
            DType::F64 => Some(f64::MAX),
            DType::F32 => Some(f32::MAX as f64),
            // 0x7F7F: (2 - 2^-7) * 2^127.
            DType::BF16 => Some(3.3895313892515355e38),
            DType::F16 => Some(65504.0),
            DType::F8E4M3 => Some(448.0),
            DType::F8E5M2 => Some(57344.0),
            _ => None,
        }
    }

    /// Bits per element (4 and 6 for the packed sub-byte formats).
    pub const fn bits(self) -> u64 {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 8,
            DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0 => 8,
            DType::F8E4M3Fnuz | DType::F8E5M2Fnuz => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::I64 | DType::U64 | DType::F64 | DType::C64 => 64,
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
        }
    }

    /// Bytes per element, rounded up (1 for the sub-byte formats); also the
    /// alignment a tensor's data offset should have.
    pub const fn size(self) -> usize {
        let bits = self.bits() as usize;
        if bits < 8 {
            1
        } else {
            bits / 8
        }
    }

    /// True for the floating-point dtypes fastcast converts between.
    pub const fn is_castable(self) -> bool {
        matches!(
            self,
            DType::F64 | DType::F32 | DType::F16 | DType::BF16 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// True for any floating-point (or complex) format, castable or not.
    pub const fn is_float(self) -> bool {
        !matches!(
            self,
            DType::Bool
                | DType::U8
                | DType::I8
                | DType::I16
                | DType::U16
                | DType::I32
                | DType::U32
                | DType::I64
                | DType::U64
        )
    }

    /// Parse a dtype exactly as a safetensors header spells it.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        ALL.into_iter().find(|d| d.safetensors_name() == name)
    }

    /// Every name accepted for this dtype, safetensors name first.
    pub fn names(self) -> Vec<&'static str> {
        let mut names = vec![self.safetensors_name(), self.torch_name()];
        names.extend_from_slice(self.aliases());
        names
    }

    /// A comma-separated list of the castable dtypes' names, for error messages.
    pub fn valid_names() -> String {
        CASTABLE
            .iter()
            .map(|d| d.names().join("/"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

impl FromStr for DType {
    type Err = Error;

    /// Accepts safetensors (`BF16`), torch (`bfloat16`, `torch.bfloat16`) and
    /// short (`bf16`, `half`, `fp8`) names, case-insensitively.
    fn from_str(s: &str) -> Result<DType, Error> {
        let trimmed = s.trim();
        let bare = trimmed.strip_prefix("torch.").unwrap_or(trimmed);
        ALL.into_iter()
            .find(|d| d.names().iter().any(|n| n.eq_ignore_ascii_case(bare)))
            .ok_or_else(|| Error::UnknownDtype {
                name: s.to_owned(),
                valid: DType::valid_names(),
            })
    }
}

impl Error {
    /// `from -> to` is not a cast fastcast performs. Here, not in `error.rs`,
    /// which holds dtypes by name and so depends on nothing.
    pub fn not_castable(from: DType, to: DType) -> Error {
        Error::NotCastable {
            from: from.safetensors_name(),
            to: to.safetensors_name(),
            castable: CASTABLE
                .iter()
                .map(|d| d.safetensors_name())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        for d in ALL {
            for name in d.names() {
                assert_eq!(name.parse::<DType>().unwrap(), d, "{name}");
                assert_eq!(name.to_uppercase().parse::<DType>().unwrap(), d, "{name}");
                assert_eq!(format!("torch.{name}").parse::<DType>().unwrap(), d);
            }
            assert_eq!(DType::from_safetensors_name(d.safetensors_name()), Some(d));
        }
    }

    #[test]
    fn names_are_unambiguous() {
        let mut seen = std::collections::HashMap::new();
        for d in ALL {
            for name in d.names() {
                let prev = seen.insert(name.to_ascii_lowercase(), d);
                assert!(prev.is_none() || prev == Some(d), "{name} names two dtypes");
            }
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = "bf17".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("bf17"), "{err}");
        assert!(
            err.contains("bfloat16") && err.contains("fp8_e5m2"),
            "{err}"
        );
    }

    #[test]
    fn a_refused_cast_names_both_dtypes_and_the_castable_ones() {
        assert_eq!(
            Error::not_castable(DType::I64, DType::F32).to_string(),
            "cannot cast I64 to F32: fastcast casts only between F64, F32, F16, BF16, F8_E4M3, \
             F8_E5M2"
        );
    }

    #[test]
    fn safetensors_names_are_exact() {
        assert_eq!(DType::from_safetensors_name("bf16"), None);
        assert_eq!(DType::from_safetensors_name("F8_E4M3"), Some(DType::F8E4M3));
    }

    #[test]
    fn short_names_and_ranges_exist_exactly_for_castable_dtypes() {
        for d in ALL {
            assert_eq!(d.short_name().is_some(), d.is_castable(), "{d}");
            assert_eq!(d.max_finite().is_some(), d.is_castable(), "{d}");
            if let Some(short) = d.short_name() {
                assert_eq!(
                    short.parse::<DType>().unwrap(),
                    d,
                    "{short} is a name of {d}"
                );
            }
        }
        // Each maximum is the largest finite value the scalar decoders produce.
        use crate::cast::scalar;
        assert_eq!(
            DType::BF16.max_finite(),
            Some(scalar::bf16_to_f32(0x7F7F) as f64)
        );
        assert_eq!(
            DType::F16.max_finite(),
            Some(scalar::f16_to_f32(0x7BFF) as f64)
        );
        assert_eq!(
            DType::F8E4M3.max_finite(),
            Some(scalar::e4m3_to_f32(0x7E) as f64)
        );
        assert_eq!(
            DType::F8E5M2.max_finite(),
            Some(scalar::e5m2_to_f32(0x7B) as f64)
        );
    }

    #[test]
    fn castable_set_is_consistent() {
        for d in ALL {
            assert_eq!(d.is_castable(), CASTABLE.contains(&d));
            if d.is_castable() {
                assert!(d.is_float());
            }
        }
    }
}
