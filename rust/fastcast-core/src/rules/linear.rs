//! Which tensors of a plain model `--quantize` may quantize: decoder Linear
//! weights (router gates, norms, embeddings, `lm_head` and biases stay), and
//! which of them inference engines fuse, so must share one precision.

use super::roles::ends_with_any;
use crate::dtype::DType;

/// What a tensor of a plain model is to `--quantize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Linear {
    /// A decoder Linear weight: a 2-D float `*.weight` inside a decoder layer
    /// (`.layers.N.`, `.h.N.`, `.blocks.N.`), not a norm nor a router gate.
    Decoder,
    /// A router gate (`mlp.gate.weight`, `block_sparse_moe.gate.weight`,
    /// `*.router.*`): a Linear of the decoder that quantized checkpoints
    /// leave unquantized.
    Router,
    /// Anything else: embeddings, norms, `lm_head`, biases, scalars...
    Other,
}

/// The path components that open a decoder layer when a number follows.
const LAYER_LISTS: &[&str] = &["layers", "h", "blocks"];
/// Router gates, by the end of their name.
const ROUTER_GATES: &[&str] = &[".mlp.gate.weight", ".block_sparse_moe.gate.weight"];
/// Linears that inference engines fuse into one (vLLM's `packed_modules_mapping`:
/// `qkv_proj`, `gate_up_proj`, Mixtral's `w13`, DeepSeek's `fused_qkv_a_proj`),
/// which must then all be quantized or all not.
const FUSED: &[&[&str]] = &[
    &["q_proj", "k_proj", "v_proj"],
    &["gate_proj", "up_proj"],
    &["w1", "w3"],
    &["q_a_proj", "kv_a_proj_with_mqa"],
];

/// Whether module `module` lies inside a numbered decoder layer.
fn in_decoder_layer(module: &str) -> bool {
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(3).any(|w| {
        LAYER_LISTS.contains(&w[0]) && !w[1].is_empty() && w[1].bytes().all(|b| b.is_ascii_digit())
    })
}

/// What tensor `name` (of `dtype` and `shape`) is to `--quantize`.
///
/// ```
/// use fastcast_core::rules::linear::{linear, Linear};
/// use fastcast_core::DType;
/// let l = |name| linear(name, DType::BF16, &[256, 128]);
/// assert_eq!(l("model.layers.0.self_attn.q_proj.weight"), Linear::Decoder);
/// assert_eq!(l("transformer.h.3.mlp.c_fc.weight"), Linear::Decoder);
/// assert_eq!(l("model.layers.1.mlp.gate.weight"), Linear::Router);
/// assert_eq!(l("lm_head.weight"), Linear::Other);
/// assert_eq!(linear("model.layers.0.input_layernorm.weight", DType::BF16, &[256]), Linear::Other);
/// ```
pub fn linear(name: &str, dtype: DType, shape: &[u64]) -> Linear {
    let Some(module) = name.strip_suffix(".weight") else {
        return Linear::Other;
    };
    if shape.len() != 2 || !dtype.is_castable() || !in_decoder_layer(module) {
        return Linear::Other;
    }
    let last = module.rsplit('.').next().unwrap_or(module);
    if last.contains("norm") {
        Linear::Other
    } else if ends_with_any(name, ROUTER_GATES) || name.contains(".router.") {
        Linear::Router
    } else {
        Linear::Decoder
    }
}

/// The other weights of the fused group `name` (`x.weight`) belongs to, if
/// any: `k_proj` and `v_proj` beside a `q_proj`...
///
/// ```
/// use fastcast_core::rules::linear::fused_siblings;
/// assert_eq!(fused_siblings("a.mlp.up_proj.weight"), ["a.mlp.gate_proj.weight"]);
/// assert!(fused_siblings("a.self_attn.o_proj.weight").is_empty());
/// ```
pub fn fused_siblings(name: &str) -> Vec<String> {
    let Some((parent, last)) = name
        .strip_suffix(".weight")
        .and_then(|m| m.rsplit_once('.'))
    else {
        return Vec::new();
    };
    FUSED
        .iter()
        .find(|group| group.contains(&last))
        .map(|group| {
            group
                .iter()
                .filter(|&&other| other != last)
                .map(|other| format!("{parent}.{other}.weight"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_linears_are_2d_float_weights_inside_numbered_layers() {
        let d = |name: &str| linear(name, DType::F32, &[128, 128]);
        assert_eq!(d("model.layers.0.mlp.down_proj.weight"), Linear::Decoder);
        assert_eq!(d("layers.12.attention.wq.weight"), Linear::Decoder);
        assert_eq!(d("model.decoder.blocks.7.ffn.fc1.weight"), Linear::Decoder);
        assert_eq!(
            d("model.layers.1.mlp.experts.3.gate_proj.weight"),
            Linear::Decoder
        );
        assert_eq!(
            d("model.layers.1.block_sparse_moe.experts.0.w1.weight"),
            Linear::Decoder
        );
        // Routers, norms, biases, embeddings, the head, other shapes and dtypes.
        assert_eq!(
            d("model.layers.1.block_sparse_moe.gate.weight"),
            Linear::Router
        );
        assert_eq!(d("model.layers.1.mlp.router.layer.weight"), Linear::Router);
        assert_eq!(d("model.layers.1.mlp.gate_proj.weight"), Linear::Decoder);
        assert_eq!(
            d("model.layers.0.self_attn.q_a_layernorm.weight"),
            Linear::Other
        );
        assert_eq!(d("model.layers.0.self_attn.q_proj.bias"), Linear::Other);
        assert_eq!(d("model.embed_tokens.weight"), Linear::Other);
        assert_eq!(d("lm_head.weight"), Linear::Other);
        assert_eq!(d("model.layers.x.mlp.fc.weight"), Linear::Other);
        assert_eq!(d("model.layersets.0.fc.weight"), Linear::Other);
        assert_eq!(
            d("model.layers.0.weight"),
            Linear::Other,
            "no module inside"
        );
        let l = "model.layers.0.mlp.down_proj.weight";
        assert_eq!(linear(l, DType::F32, &[4, 4, 4]), Linear::Other);
        assert_eq!(linear(l, DType::I8, &[4, 4]), Linear::Other);
    }

    #[test]
    fn fused_groups_name_their_siblings() {
        assert_eq!(
            fused_siblings("m.layers.0.self_attn.k_proj.weight"),
            [
                "m.layers.0.self_attn.q_proj.weight",
                "m.layers.0.self_attn.v_proj.weight"
            ]
        );
        assert_eq!(
            fused_siblings("m.layers.0.block_sparse_moe.experts.2.w1.weight"),
            ["m.layers.0.block_sparse_moe.experts.2.w3.weight"]
        );
        assert!(fused_siblings("m.layers.0.block_sparse_moe.experts.2.w2.weight").is_empty());
        assert!(fused_siblings("m.layers.0.self_attn.k_proj.bias").is_empty());
    }
}
