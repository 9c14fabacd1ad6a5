//! The target-dtype policy: what dtype each tensor of a conversion gets.
//! A castable float becomes the target unless `--keep` keeps it or, in a
//! quantized model, it holds quantization state; anything else keeps its own.

use super::glob::KeepRule;
use super::roles::{self, Role};
use crate::dtype::DType;

/// The dtype tensor `name` gets in a conversion to `target`: its own when it
/// is not a castable float or when `keep` matches it, else `target`.
///
/// ```
/// use fastcast_core::rules::{glob::KeepRule, target::target_dtype};
/// use fastcast_core::DType;
/// let keep = KeepRule::new(&["*.norm.weight"]);
/// assert_eq!(target_dtype("a.weight", DType::F32, DType::BF16, &keep), DType::BF16);
/// assert_eq!(target_dtype("a.norm.weight", DType::F32, DType::BF16, &keep), DType::F32);
/// assert_eq!(target_dtype("step", DType::I64, DType::BF16, &keep), DType::I64);
/// ```
pub fn target_dtype(name: &str, src: DType, target: DType, keep: &KeepRule) -> DType {
    if !src.is_castable() || keep.matches(name) {
        src
    } else {
        target
    }
}

/// What every tensor of a conversion to `target` becomes: [`target_dtype`]
/// for each, except that with `quantized` a tensor holding quantization
/// state (see [`roles::roles`]: packed and fp8 weights, scales, zero
/// points, bitsandbytes state, fp32-pinned tensors) keeps its dtype.
///
/// ```
/// use fastcast_core::rules::{glob::KeepRule, target::target_dtypes};
/// use fastcast_core::DType;
/// let t = [("l.weight", DType::F8E4M3), ("l.weight_scale_inv", DType::F32),
///          ("norm.weight", DType::F32)];
/// let none = KeepRule::default();
/// assert_eq!(target_dtypes(&t, DType::BF16, &none, true),
///            [DType::F8E4M3, DType::F32, DType::BF16]);
/// assert_eq!(target_dtypes(&t, DType::BF16, &none, false),
///            [DType::BF16, DType::BF16, DType::BF16]);
/// ```
pub fn target_dtypes(
    tensors: &[(impl AsRef<str>, DType)],
    target: DType,
    keep: &KeepRule,
    quantized: bool,
) -> Vec<DType> {
    let roles = if quantized {
        roles::typed_roles(tensors)
    } else {
        vec![Role::Plain; tensors.len()]
    };
    tensors
        .iter()
        .zip(roles)
        .map(|((name, src), role)| match role {
            Role::Plain => target_dtype(name.as_ref(), *src, target, keep),
            _ => *src,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dtype_casts_only_unkept_castable_floats() {
        let keep = KeepRule::new(&["*norm*"]);
        let t = |name, src| target_dtype(name, src, DType::F16, &keep);
        assert_eq!(t("w", DType::F32), DType::F16);
        assert_eq!(t("w", DType::BF16), DType::F16);
        assert_eq!(t("w", DType::F8E4M3), DType::F16);
        assert_eq!(t("layernorm.w", DType::F32), DType::F32);
        assert_eq!(t("w", DType::I64), DType::I64);
        assert_eq!(t("w", DType::Bool), DType::Bool);
        assert_eq!(t("w", DType::F4), DType::F4, "packed floats are never cast");
        assert_eq!(t("w", DType::F8E8M0), DType::F8E8M0);
    }
}
