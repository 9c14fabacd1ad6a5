//! The core's rules, asked by Python rather than re-typed there: the dtype
//! each tensor gets, what `--quantize` makes of each, which tensors hold
//! quantization state, and what a cast can lose.

use fastcast_core::cast::Fp8Overflow;
use fastcast_core::rules::loss::{self, LossRule};
use fastcast_core::rules::scheme::Scheme;
use fastcast_core::rules::{fates, glob::KeepRule, roles, target};
use fastcast_core::{DType, Error};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::dtype::{castable_target, safetensors_dtype};
use crate::errors::CoreError;

/// For each `(tensor name, safetensors dtype)`, the dtype it gets converting
/// to `target`: unchanged when not a castable float, matched by a `keep` glob
/// (`fnmatch.fnmatchcase` semantics) or, with `quantized`, holding
/// quantization state (see `quant_roles`); else `target`.
#[pyfunction]
#[pyo3(signature = (tensors, target, keep, *, quantized=false))]
pub fn target_dtypes(
    tensors: Vec<(String, String)>,
    target: &str,
    keep: Vec<String>,
    quantized: bool,
) -> PyResult<Vec<&'static str>> {
    let to = castable_target(target)?;
    let typed = tensors
        .into_iter()
        .map(|(name, dtype)| Ok((name, safetensors_dtype(&dtype)?)))
        .collect::<PyResult<Vec<_>>>()?;
    let dtypes = target::target_dtypes(&typed, to, &KeepRule::new(&keep), quantized);
    Ok(dtypes.into_iter().map(DType::safetensors_name).collect())
}

/// What `--quantize` in `scheme` ("fp8", "fp8-channel") makes of each
/// `(tensor name, safetensors dtype, shape)` of a plain model converted to
/// `target`: `(dtype, fate, block, scale)`, the fate being "quantize",
/// "misfit", "fused misfit", "kept", "router" or "other", and for a quantized
/// weight the block each scale covers and the scale tensor's name and shape.
#[pyfunction]
pub fn quantize_targets(
    tensors: Vec<(String, String, Vec<u64>)>,
    target: Option<&str>,
    keep: Vec<String>,
    scheme: &str,
) -> PyResult<Vec<QuantizeTarget>> {
    let to = target.map(castable_target).transpose()?;
    let scheme = Scheme::from_name(scheme).ok_or_else(|| {
        pyo3::exceptions::PyValueError::new_err(format!(
            "quantize must be one of {}, not {scheme:?}",
            Scheme::ALL.map(Scheme::name).join(", ")
        ))
    })?;
    let typed = tensors
        .into_iter()
        .map(|(name, dtype, shape)| Ok((name, safetensors_dtype(&dtype)?, shape)))
        .collect::<PyResult<Vec<_>>>()?;
    let targets = fates::quantize_targets(&typed, to, &KeepRule::new(&keep), scheme);
    Ok(targets
        .into_iter()
        .map(|t| (t.dtype.safetensors_name(), t.fate.name(), t.block, t.scale))
        .collect())
}

/// One tensor's `(dtype, fate, block, (scale name, scale shape))` under `--quantize`.
type QuantizeTarget = (
    &'static str,
    &'static str,
    Option<(u64, u64)>,
    Option<(String, Vec<u64>)>,
);

/// The role of each tensor in its model's quantization ("plain", "quantized
/// weight", "scale", "zero point", "group index", "quant state", "pinned
/// fp32", "unknown state"), from every tensor name of the model and, when
/// given, their dtypes (which tell state of formats fastcast does not know).
#[pyfunction]
#[pyo3(signature = (names, dtypes=None))]
pub fn quant_roles(names: Vec<String>, dtypes: Option<Vec<String>>) -> PyResult<Vec<&'static str>> {
    let roles = match dtypes {
        None => roles::roles(&names),
        Some(dtypes) => {
            if dtypes.len() != names.len() {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "one dtype per name",
                ));
            }
            let typed = names
                .iter()
                .zip(&dtypes)
                .map(|(n, d)| Ok((n.as_str(), safetensors_dtype(d)?)))
                .collect::<Result<Vec<_>, CoreError>>()?;
            roles::typed_roles(&typed)
        }
    };
    Ok(roles.into_iter().map(roles::Role::name).collect())
}

/// What casting `src` to `dst` can lose: the smallest finite magnitude that
/// overflows, the largest non-zero one that becomes 0, whether the exponent
/// range shrinks, and whether overflow saturates under the default policy.
#[pyfunction]
pub fn cast_rule<'py>(py: Python<'py>, src: &str, dst: &str) -> PyResult<Bound<'py, PyDict>> {
    let from: DType = src.parse().map_err(CoreError)?;
    let to: DType = dst.parse().map_err(CoreError)?;
    if !(from.is_castable() && to.is_castable()) {
        return Err(CoreError(Error::not_castable(from, to)).into());
    }
    let rule = LossRule::new(from, to);
    let out = PyDict::new(py);
    out.set_item("overflow_from", rule.overflow_from())?;
    out.set_item("underflow_to", rule.underflow_to())?;
    out.set_item("narrows_range", loss::narrows_range(from, to))?;
    out.set_item("saturates", loss::saturates(to, Fp8Overflow::default()))?;
    Ok(out)
}
