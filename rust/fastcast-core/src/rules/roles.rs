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

use crate::dtype::DType;

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
    /// A float tensor that looks like quantization state of a format fastcast
    /// does not know: named like a scale or zero point (`scale`, `qscale_act`,
    /// `weight_zero`...) beside fp8 codes or packed integers in its module
    /// (see [`typed_roles`]). Never cast, whatever the mode.
    Unknown,
}

impl Role {
    /// Every role, in the order `inspect` lists them.
    pub const ALL: [Role; 8] = [
        Role::QuantizedWeight,
        Role::Scale,
        Role::ZeroPoint,
        Role::GroupIndex,
        Role::QuantState,
        Role::PinnedF32,
        Role::Unknown,
        Role::Plain,
    ];

    /// Whether a tensor of this role means its model is quantized (a tensor
    /// pinned to fp32 alone does not).
    pub const fn is_state(self) -> bool {
        !matches!(self, Role::Plain | Role::PinnedF32)
    }

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
            Role::Unknown => "unknown state",
        }
    }
}

const SCALES: &[&str] = &[
    ".weight_scale",
    ".weight_scale_inv",
    // NVFP4 (ModelOpt, compressed-tensors): the per-tensor second-level scales.
    ".weight_scale_2",
    ".weight_global_scale",
    ".input_global_scale",
    ".input_scale",
    ".output_scale",
    // ModelOpt AWQ-style algorithms: the input smoothing folded into the weight.
    ".pre_quant_scale",
    // ModelOpt's fused expert tensors (`experts.gate_up_proj`): their scales are
    // named after the tensor, not after a module's `weight`.
    FUSED_SCALE,
    "_weight_scale_2",
    "_input_scale",
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
const PACKED_WEIGHTS: &[&str] = &[".qweight", ".weight_packed", HQQ_WEIGHT];
/// Siblings of `x.weight` that make it a quantized weight.
const WEIGHT_SIBLINGS: &[&str] = &[
    "weight_scale",
    "weight_scale_inv",
    "weight_scale_2",
    "weight_global_scale",
    "SCB",
];
/// The block scale of a ModelOpt fused expert tensor `x` is `x_weight_scale`;
/// `x` beside it is a quantized weight.
const FUSED_SCALE: &str = "_weight_scale";
/// MXFP4 in gpt-oss's layouts: `x_blocks` (transformers) or `x.blocks` (gpt-oss's
/// own `original/`) holds the packed codes and `x_scales` / `x.scales` their E8M0
/// exponents; a pair only, so that a model's own `*_blocks` tensor stays plain.
const MX_PAIRS: &[(&str, &str)] = &[("_blocks", "_scales"), (".blocks", ".scales")];
/// HQQ's packed weight: every other tensor of its module (`scale`, `zero`, and
/// the meta it serialises) but the bias is its state.
const HQQ_WEIGHT: &str = ".W_q";
const BNB_STATE: &str = ".weight.quant_state.";
const PINNED_F32: &[&str] = &["e_score_correction_bias"];

pub(super) fn ends_with_any(name: &str, suffixes: &[&str]) -> bool {
    suffixes.iter().any(|s| name.ends_with(s))
}

/// The role of each tensor, given every tensor name of the model (roles
/// depend on siblings).
///
/// ```
/// use fastcast_core::rules::roles::{roles, Role};
/// let names = ["l.weight", "l.weight_scale_inv", "norm.weight", "q.weight",
///              "q.weight.absmax", "q.weight.quant_state.bitsandbytes__nf4"];
/// assert_eq!(roles(&names), [Role::QuantizedWeight, Role::Scale, Role::Plain,
///            Role::QuantizedWeight, Role::Scale, Role::QuantState]);
/// ```
pub fn roles(names: &[impl AsRef<str>]) -> Vec<Role> {
    let mut quantized_prefixes: HashSet<&str> = HashSet::new();
    let mut hqq_modules: HashSet<&str> = HashSet::new();
    let mut fused: HashSet<&str> = HashSet::new();
    for name in names.iter().map(AsRef::as_ref) {
        if let Some(x) = name.strip_suffix(FUSED_SCALE) {
            fused.insert(x);
        }
        if let Some((prefix, _)) = name.split_once(BNB_STATE) {
            quantized_prefixes.insert(prefix);
        } else if let Some(module) = name.strip_suffix(HQQ_WEIGHT) {
            hqq_modules.insert(module);
        } else if let Some((prefix, last)) = name.rsplit_once('.') {
            if WEIGHT_SIBLINGS.contains(&last) {
                quantized_prefixes.insert(prefix);
            }
        }
    }
    let all: HashSet<&str> = names.iter().map(AsRef::as_ref).collect();
    let mx_pair = |name: &str| {
        MX_PAIRS.iter().find_map(|(blocks, scales)| {
            if let Some(x) = name.strip_suffix(blocks) {
                all.contains(format!("{x}{scales}").as_str())
                    .then_some(Role::QuantizedWeight)
            } else if let Some(x) = name.strip_suffix(scales) {
                all.contains(format!("{x}{blocks}").as_str())
                    .then_some(Role::Scale)
            } else {
                None
            }
        })
    };
    let hqq_state = |name: &str| match name.rsplit_once('.') {
        Some((module, last)) if hqq_modules.contains(module) && last != "bias" => match last {
            "scale" => Some(Role::Scale),
            "zero" => Some(Role::ZeroPoint),
            "W_q" => Some(Role::QuantizedWeight),
            _ => Some(Role::QuantState),
        },
        _ => None,
    };
    names
        .iter()
        .map(AsRef::as_ref)
        .map(|name| {
            if let Some(role) = (!hqq_modules.is_empty()).then(|| hqq_state(name)).flatten() {
                role
            } else if let Some(role) = mx_pair(name) {
                role
            } else if name.contains(BNB_STATE) || ends_with_any(name, STATE) {
                Role::QuantState
            } else if ends_with_any(name, SCALES) {
                Role::Scale
            } else if ends_with_any(name, ZERO_POINTS) {
                Role::ZeroPoint
            } else if ends_with_any(name, GROUP_INDEXES) {
                Role::GroupIndex
            } else if ends_with_any(name, PACKED_WEIGHTS)
                || fused.contains(name)
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

/// The roles of tensors `(name, dtype)` ([`roles`], which goes by names), and
/// what names alone cannot tell: quantization state of a format fastcast does
/// not know. In a module holding fp8 codes or packed integers (`U8`, `I8`,
/// `I32`, `U32`), a float tensor named like a scale or a zero point that no
/// rule knows is [`Role::Unknown`], and the codes beside it, which only that
/// state makes numbers, a [`Role::QuantizedWeight`]. A plain model's
/// `logit_scale` or layer scale (no codes beside it) stays plain.
///
/// ```
/// use fastcast_core::rules::roles::{typed_roles, Role};
/// use fastcast_core::DType;
/// let t = [("m.weight", DType::F8E4M3), ("m.qscale_weight", DType::F32),
///          ("m.bias", DType::BF16), ("logit_scale", DType::F32)];
/// assert_eq!(typed_roles(&t), [Role::QuantizedWeight, Role::Unknown, Role::Plain,
///            Role::Plain]);
/// ```
pub fn typed_roles(tensors: &[(impl AsRef<str>, DType)]) -> Vec<Role> {
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_ref()).collect();
    let mut found = roles(&names);
    let codes = |d: DType| {
        matches!(
            d,
            DType::F8E4M3
                | DType::F8E5M2
                | DType::F8E4M3Fnuz
                | DType::F8E5M2Fnuz
                | DType::U8
                | DType::I8
                | DType::I32
                | DType::U32
        )
    };
    let state_like = |name: &str| {
        let l = last(name).to_ascii_lowercase();
        l.contains("scale") || l.contains("zero")
    };
    let with_codes: HashSet<&str> = tensors
        .iter()
        .filter(|(_, d)| codes(*d))
        .map(|(n, _)| module(n.as_ref()))
        .collect();
    // E8M0 holds exponents only: beside codes it is their scale whatever its name
    // (DeepSeek-V4's `x.scale`), and the codes the quantized weight.
    let mut exponents: HashSet<&str> = HashSet::new();
    for ((name, dtype), role) in tensors.iter().zip(found.iter_mut()) {
        let m = module(name.as_ref());
        if *dtype == DType::F8E8M0 && *role == Role::Plain && with_codes.contains(m) {
            *role = Role::Scale;
            exponents.insert(m);
        }
    }
    if with_codes.is_empty() {
        return found; // no codes anywhere: nothing unknown (the usual plain model)
    }
    let suspect: HashSet<&str> = names
        .iter()
        .zip(tensors)
        .zip(&found)
        .filter(|((n, (_, d)), role)| {
            **role == Role::Plain && d.is_float() && state_like(n) && with_codes.contains(module(n))
        })
        .map(|((n, _), _)| module(n))
        .chain(exponents)
        .collect();
    for ((name, (_, dtype)), role) in names.iter().zip(tensors).zip(found.iter_mut()) {
        if *role != Role::Plain || !suspect.contains(module(name)) {
            continue;
        }
        if dtype.is_float() && state_like(name) {
            *role = Role::Unknown;
        } else if codes(*dtype) {
            *role = Role::QuantizedWeight;
        }
    }
    found
}

/// The module of tensor `name` (`a.b` of `a.b.weight`; `""` at the top).
fn module(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(m, _)| m)
}

/// The last part of tensor `name` (`weight` of `a.b.weight`).
fn last(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(_, l)| l)
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
    fn hqq_and_nvfp4_names() {
        let hqq = [
            "l.q.W_q",
            "l.q.scale",
            "l.q.zero",
            "l.q.meta_shape",
            "l.q.bias",
            "l.norm.scale",
        ];
        assert_eq!(
            roles(&hqq),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::ZeroPoint,
                Role::QuantState,
                Role::Plain,
                Role::Plain
            ]
        );
        let nvfp4 = [
            "x.weight",
            "x.weight_scale",
            "x.weight_scale_2",
            "x.input_scale",
            "y.weight_packed",
            "y.weight_global_scale",
            "y.input_global_scale",
        ];
        assert_eq!(
            roles(&nvfp4),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::Scale,
                Role::Scale,
                Role::QuantizedWeight,
                Role::Scale,
                Role::Scale
            ]
        );
    }

    /// Unknown state is told by the codes beside it, never by a name alone.
    #[test]
    fn unknown_state_needs_codes_beside_it() {
        let t = |pairs: &[(&str, DType)]| typed_roles(pairs);
        // An fp8 weight whose scale has a name no rule knows.
        assert_eq!(
            t(&[("m.weight", DType::F8E5M2), ("m.scale", DType::F16)]),
            [Role::QuantizedWeight, Role::Unknown]
        );
        // Packed integers with a zero point under another name.
        assert_eq!(
            t(&[
                ("m.packed", DType::I32),
                ("m.zeros", DType::BF16),
                ("m.bias", DType::BF16)
            ]),
            [Role::QuantizedWeight, Role::Unknown, Role::Plain]
        );
        // A plain model: scales with no codes in their module, and codes with
        // no scale (a counter, a mask) are what they are.
        let plain = [
            ("logit_scale", DType::F32),
            ("a.ls.scale", DType::F32),
            ("a.attn.weight", DType::F32),
            ("a.attn.weight_zero", DType::F32),
            ("b.position_ids", DType::I64),
            ("c.mask", DType::U8),
            ("c.weight", DType::F32),
        ];
        assert!(t(&plain).iter().all(|r| *r == Role::Plain));
        // Known state keeps its role.
        assert_eq!(
            t(&[
                ("m.weight", DType::F8E4M3),
                ("m.weight_scale_inv", DType::F32)
            ]),
            [Role::QuantizedWeight, Role::Scale]
        );
    }

    /// gpt-oss MXFP4 (both layouts), ModelOpt's input smoothing, DeepSeek-V4's
    /// E8M0 `.scale`: the 4-bit formats of the fp4-int4 reference.
    #[test]
    fn the_fp4_formats() {
        let gpt_oss = [
            "m.experts.gate_up_proj_blocks",
            "m.experts.gate_up_proj_scales",
            "m.experts.gate_up_proj_bias",
            "block.0.mlp.mlp1_weight.blocks",
            "block.0.mlp.mlp1_weight.scales",
            "block.0.attn.norm.scale",
            // a lone *_blocks or *_scales (no pair) is some model's own tensor
            "vision.patch_blocks",
            "vision.layer_scales",
        ];
        assert_eq!(
            roles(&gpt_oss),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::Plain,
                Role::QuantizedWeight,
                Role::Scale,
                Role::Plain,
                Role::Plain,
                Role::Plain
            ]
        );
        assert_eq!(
            roles(&["x.weight", "x.weight_scale", "x.pre_quant_scale"]),
            [Role::QuantizedWeight, Role::Scale, Role::Scale]
        );
        let v4 = [
            ("e.w1.weight", DType::I8),
            ("e.w1.scale", DType::F8E8M0),
            ("d.wq.weight", DType::F8E4M3),
            ("d.wq.scale", DType::F8E8M0),
            ("gate.bias", DType::F32),
            // no codes beside it: some model's own tensor, copied as it is
            ("lone.exponent", DType::F8E8M0),
        ];
        assert_eq!(
            typed_roles(&v4),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::QuantizedWeight,
                Role::Scale,
                Role::Plain,
                Role::Plain
            ]
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

    #[test]
    fn modelopt_fused_experts_are_named_after_their_tensor() {
        let names = [
            "m.experts.gate_up_proj",
            "m.experts.gate_up_proj_weight_scale",
            "m.experts.gate_up_proj_weight_scale_2",
            "m.experts.gate_up_proj_input_scale",
            "m.experts.gate_up_proj_bias",
            "m.experts.down_proj",
        ];
        assert_eq!(
            roles(&names),
            [
                Role::QuantizedWeight,
                Role::Scale,
                Role::Scale,
                Role::Scale,
                Role::Plain,
                Role::Plain,
            ]
        );
    }
}
