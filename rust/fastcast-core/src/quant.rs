//! Quantization state: which tensors of a quantized checkpoint carry its
//! quantization (packed or fp8 weights, scales, zero points, group indexes,
//! bitsandbytes' quant state) or are pinned to fp32 by their model class, so
//! that no cast ever touches them.
//!
//! Roles follow the tensor names the producers write (bitsandbytes, GPTQ,
//! AWQ, compressed-tensors, FBGEMM, DeepSeek/FineGrained fp8, vLLM fp8), by
//! suffix and by sibling: a `x.weight` is a quantized weight when `x` also
//! has a `weight_scale`, `weight_scale_inv`, `SCB` or bitsandbytes
//! `weight.quant_state.*` tensor, whatever its own dtype (bitsandbytes packs
//! 4-bit weights into uint8, bf16 or f32 containers alike).

use std::collections::HashSet;

/// What a tensor is to the quantization of its model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Not quantization state: cast like any tensor.
    Plain,
    /// The quantized (or packed) weight itself.
    QuantizedWeight,
    /// A scale: `weight_scale(_inv)`, `input_scale`, kv scales, GPTQ/AWQ
    /// `scales`, `SCB`, bitsandbytes' `absmax` and `nested_absmax`.
    Scale,
    /// A zero point: `*_zero_point`, GPTQ/AWQ `qzeros`.
    ZeroPoint,
    /// A group index: GPTQ `g_idx`, compressed-tensors `weight_g_idx`.
    GroupIndex,
    /// bitsandbytes' other state: `quant_map`, `nested_quant_map`,
    /// `quant_state.*`, `weight_format`; compressed-tensors' `weight_shape`.
    QuantState,
    /// A float tensor its model class keeps in fp32 (DeepSeek's
    /// `e_score_correction_bias`).
    PinnedF32,
}

impl Role {
    /// The role in words, as `inspect` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Plain => "plain",
            Role::QuantizedWeight => "quantized weight",
            Role::Scale => "scale",
            Role::ZeroPoint => "zero point",
            Role::GroupIndex => "group index",
            Role::QuantState => "quant state",
            Role::PinnedF32 => "pinned fp32",
        }
    }
}

const SCALES: &[&str] = &[
    ".weight_scale",
    ".weight_scale_inv",
    ".input_scale",
    ".output_scale",
    ".k_scale",
    ".v_scale",
    ".scales",
    ".SCB",
    ".weight.absmax",
    ".weight.nested_absmax",
];
const ZERO_POINTS: &[&str] = &["_zero_point", ".qzeros"];
const GROUP_INDEXES: &[&str] = &[".g_idx", ".weight_g_idx"];
const STATE: &[&str] = &[
    ".weight.quant_map",
    ".weight.nested_quant_map",
    ".weight_format",
    ".weight_shape",
];
const PACKED_WEIGHTS: &[&str] = &[".qweight", ".weight_packed"];
/// Siblings of `x.weight` that make it a quantized weight.
const WEIGHT_SIBLINGS: &[&str] = &["weight_scale", "weight_scale_inv", "SCB"];
const BNB_STATE: &str = ".weight.quant_state.";
const PINNED_F32: &[&str] = &["e_score_correction_bias"];

fn ends_with_any(name: &str, suffixes: &[&str]) -> bool {
    suffixes.iter().any(|s| name.ends_with(s))
}

/// The role of each tensor, given every tensor name of the model (roles
/// depend on siblings).
///
/// ```
/// use fastcast_core::quant::{roles, Role};
/// let names = ["l.weight", "l.weight_scale_inv", "norm.weight", "q.weight",
///              "q.weight.absmax", "q.weight.quant_state.bitsandbytes__nf4"];
/// assert_eq!(roles(&names), [Role::QuantizedWeight, Role::Scale, Role::Plain,
///            Role::QuantizedWeight, Role::Scale, Role::QuantState]);
/// ```
pub fn roles(names: &[impl AsRef<str>]) -> Vec<Role> {
    let mut quantized_prefixes: HashSet<&str> = HashSet::new();
    for name in names.iter().map(AsRef::as_ref) {
        if let Some((prefix, _)) = name.split_once(BNB_STATE) {
            quantized_prefixes.insert(prefix);
        } else if let Some((prefix, last)) = name.rsplit_once('.') {
            if WEIGHT_SIBLINGS.contains(&last) {
                quantized_prefixes.insert(prefix);
            }
        }
    }
    names
        .iter()
        .map(AsRef::as_ref)
        .map(|name| {
            if name.contains(BNB_STATE) || ends_with_any(name, STATE) {
                Role::QuantState
            } else if ends_with_any(name, SCALES) {
                Role::Scale
            } else if ends_with_any(name, ZERO_POINTS) {
                Role::ZeroPoint
            } else if ends_with_any(name, GROUP_INDEXES) {
                Role::GroupIndex
            } else if ends_with_any(name, PACKED_WEIGHTS)
                || name
                    .strip_suffix(".weight")
                    .is_some_and(|p| quantized_prefixes.contains(p))
            {
                Role::QuantizedWeight
            } else if ends_with_any(name, PINNED_F32) {
                Role::PinnedF32
            } else {
                Role::Plain
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role_of(names: &[&str], name: &str) -> Role {
        let i = names.iter().position(|n| *n == name).unwrap();
        roles(names)[i]
    }

    #[test]
    fn every_format_of_the_reference() {
        let deepseek = [
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
            "model.layers.0.mlp.gate.weight",
            "model.layers.0.mlp.gate.e_score_correction_bias",
            "model.layers.0.input_layernorm.weight",
        ];
        assert_eq!(
            roles(&deepseek),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::Plain,
                Role::PinnedF32,
                Role::Plain
            ]
        );
        let ct = [
            "x.weight",
            "x.weight_scale",
            "x.input_scale",
            "x.weight_zero_point",
        ];
        assert_eq!(
            roles(&ct),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::Scale,
                Role::ZeroPoint
            ]
        );
        let int8 = ["x.weight", "x.SCB", "x.weight_format", "x.bias"];
        assert_eq!(
            roles(&int8),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::QuantState,
                Role::Plain
            ]
        );
        let gptq = ["x.qweight", "x.qzeros", "x.scales", "x.g_idx", "x.bias"];
        assert_eq!(
            roles(&gptq),
            [
                Role::QuantizedWeight,
                Role::ZeroPoint,
                Role::Scale,
                Role::GroupIndex,
                Role::Plain
            ]
        );
        let bnb = [
            "x.weight",
            "x.weight.absmax",
            "x.weight.quant_map",
            "x.weight.nested_absmax",
            "x.weight.nested_quant_map",
            "x.weight.quant_state.bitsandbytes__nf4",
            "lm_head.weight",
        ];
        assert_eq!(role_of(&bnb, "x.weight"), Role::QuantizedWeight);
        assert_eq!(role_of(&bnb, "lm_head.weight"), Role::Plain);
        assert_eq!(role_of(&bnb, "x.weight.absmax"), Role::Scale);
        assert_eq!(role_of(&bnb, "x.weight.nested_absmax"), Role::Scale);
        assert_eq!(role_of(&bnb, "x.weight.quant_map"), Role::QuantState);
        assert_eq!(role_of(&bnb, "x.weight.nested_quant_map"), Role::QuantState);
        let packed = ["x.weight_packed", "x.weight_shape", "x.weight_scale"];
        assert_eq!(
            roles(&packed),
            [Role::QuantizedWeight, Role::QuantState, Role::Scale]
        );
    }

    #[test]
    fn a_plain_model_has_only_plain_tensors() {
        let names = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.norm.weight",
            "lm_head.weight",
        ];
        assert!(roles(&names).iter().all(|r| *r == Role::Plain));
    }

    #[test]
    fn a_weight_is_quantized_only_by_its_own_siblings() {
        let names = ["a.weight", "b.weight", "b.weight_scale", "ab.weight"];
        assert_eq!(
            roles(&names),
            [Role::Plain, Role::QuantizedWeight, Role::Scale, Role::Plain]
        );
    }
}
