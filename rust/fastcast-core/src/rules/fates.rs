//! `--quantize`: the fate of each tensor of a plain model (quantized to fp8,
//! a misfit cast to the target, kept, a router gate...) and, for a quantized
//! weight, the block each scale covers and the scale tensor beside it.

use std::collections::HashSet;

use super::glob::KeepRule;
use super::linear::{self, Linear};
use super::scheme::Scheme;
use super::target::target_dtypes;
use crate::dtype::DType;

/// What `--quantize` does with one tensor of a plain model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fate {
    /// A decoder Linear weight quantized to e4m3, a F32 scale beside it.
    Quantize,
    /// A decoder Linear weight whose shape does not fit the scheme's blocks
    /// (or whose dtype is not F32, BF16 or F16): cast to the target.
    Misfit,
    /// A decoder Linear weight that fits, left unquantized (cast to the
    /// target) because a weight fused with it is a misfit.
    FusedMisfit,
    /// A decoder Linear weight matched by `--keep`: left in its dtype.
    Kept,
    /// A router gate: cast to the target, never quantized.
    Router,
    /// Not a decoder Linear weight: what a conversion of a quantized model
    /// does with it (see [`target_dtypes`]).
    Other,
}

impl Fate {
    /// Every fate.
    pub const ALL: [Fate; 6] = [
        Fate::Quantize,
        Fate::Misfit,
        Fate::FusedMisfit,
        Fate::Kept,
        Fate::Router,
        Fate::Other,
    ];

    /// Whether a decoder Linear weight with this fate is written unquantized.
    pub const fn leaves_unquantized(self) -> bool {
        matches!(
            self,
            Fate::Misfit | Fate::FusedMisfit | Fate::Kept | Fate::Router
        )
    }

    /// The fate in words, as Python reads it.
    pub const fn name(self) -> &'static str {
        match self {
            Fate::Quantize => "quantize",
            Fate::Misfit => "misfit",
            Fate::FusedMisfit => "fused misfit",
            Fate::Kept => "kept",
            Fate::Router => "router",
            Fate::Other => "other",
        }
    }
}

/// What `--quantize` makes of one tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Its dtype in the output (F8_E4M3 for a quantized weight).
    pub dtype: DType,
    pub fate: Fate,
    /// For a quantized weight: the rows and columns each scale covers.
    pub block: Option<(u64, u64)>,
    /// For a quantized weight: its F32 scale tensor's name and shape
    /// (`x.weight_scale_inv` `[ceil(out / 128), ceil(in / 128)]`,
    /// `x.weight_scale` `[out, 1]`).
    pub scale: Option<(String, Vec<u64>)>,
}

/// What `--quantize` in `scheme` makes of every tensor `(name, dtype, shape)`
/// of a plain model converted to `target` (None: every tensor not quantized
/// keeps its dtype): its dtype, its fate and, for a quantized weight, the block
/// each scale covers.
///
/// A decoder Linear weight (see [`linear::linear`]) is quantized unless `keep`
/// matches it, its shape does not fit the scheme, or a weight fused with it
/// (see [`linear::fused_siblings`]) does not fit; everything else gets
/// [`target_dtypes`] of a quantized model (fp32-pinned tensors stay fp32).
///
/// ```
/// use fastcast_core::rules::fates::{quantize_targets, Fate};
/// use fastcast_core::rules::{glob::KeepRule, scheme::Scheme};
/// use fastcast_core::DType;
/// let t = [("model.layers.0.mlp.up_proj.weight", DType::BF16, vec![256, 128]),
///          ("model.layers.0.mlp.down_proj.weight", DType::BF16, vec![128, 200]),
///          ("model.norm.weight", DType::BF16, vec![128])];
/// let got = quantize_targets(&t, Some(DType::BF16), &KeepRule::default(), Scheme::Fp8Block);
/// let fates: Vec<_> = got.iter().map(|x| (x.dtype, x.fate, x.block)).collect();
/// assert_eq!(fates, [(DType::F8E4M3, Fate::Quantize, Some((128, 128))),
///                    (DType::BF16, Fate::Misfit, None),
///                    (DType::BF16, Fate::Other, None)]);
/// ```
pub fn quantize_targets(
    tensors: &[(impl AsRef<str>, DType, impl AsRef<[u64]>)],
    target: Option<DType>,
    keep: &KeepRule,
    scheme: Scheme,
) -> Vec<Target> {
    let typed: Vec<(&str, DType)> = tensors.iter().map(|(n, d, _)| (n.as_ref(), *d)).collect();
    // No target: every tensor not quantized keeps its own dtype (as llm-compressor's
    // model-free quantization does).
    let base = match target {
        Some(target) => target_dtypes(&typed, target, keep, true),
        None => typed.iter().map(|(_, d)| *d).collect(),
    };
    let quantizable = [DType::F32, DType::BF16, DType::F16];
    let mut fates: Vec<Fate> = tensors
        .iter()
        .map(|(name, dtype, shape)| {
            let (name, shape) = (name.as_ref(), shape.as_ref());
            match linear::linear(name, *dtype, shape) {
                Linear::Other => Fate::Other,
                Linear::Router => Fate::Router,
                Linear::Decoder if keep.matches(name) => Fate::Kept,
                Linear::Decoder if quantizable.contains(dtype) && scheme.fits(shape) => {
                    Fate::Quantize
                }
                Linear::Decoder => Fate::Misfit,
            }
        })
        .collect();
    let misfits: HashSet<&str> = typed
        .iter()
        .zip(&fates)
        .filter(|(_, f)| **f == Fate::Misfit)
        .map(|((n, _), _)| *n)
        .collect();
    for ((name, _), fate) in typed.iter().zip(fates.iter_mut()) {
        if *fate == Fate::Quantize
            && linear::fused_siblings(name)
                .iter()
                .any(|s| misfits.contains(s.as_str()))
        {
            *fate = Fate::FusedMisfit;
        }
    }
    tensors
        .iter()
        .zip(fates)
        .zip(base)
        .map(|(((name, src, shape), fate), base)| {
            let dtype = match fate {
                Fate::Quantize => DType::F8E4M3,
                Fate::Misfit | Fate::FusedMisfit => target.unwrap_or(*src),
                Fate::Kept => *src,
                Fate::Router | Fate::Other => base,
            };
            let (block, scale) = match fate {
                Fate::Quantize => {
                    let (shape, name) = (shape.as_ref(), name.as_ref());
                    let block = scheme.block(shape);
                    let grid = vec![shape[0].div_ceil(block.0), shape[1].div_ceil(block.1)];
                    let module = name.strip_suffix(".weight").unwrap_or(name);
                    let scale = format!("{module}.{}", scheme.scale_suffix());
                    (Some(block), Some((scale, grid)))
                }
                _ => (None, None),
            };
            Target {
                dtype,
                fate,
                block,
                scale,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fates(t: &[(&str, DType, Vec<u64>)], keep: &[&str], scheme: Scheme) -> Vec<Fate> {
        quantize_targets(t, Some(DType::BF16), &KeepRule::new(keep), scheme)
            .into_iter()
            .map(|x| x.fate)
            .collect()
    }

    #[test]
    fn quantize_takes_decoder_linears_that_fit_and_their_fused_groups_whole() {
        let p = "model.layers.0";
        let t = [
            (
                format!("{p}.self_attn.q_proj.weight"),
                DType::BF16,
                vec![256, 256],
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                DType::BF16,
                vec![64, 256],
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                DType::BF16,
                vec![64, 256],
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                DType::BF16,
                vec![256, 256],
            ),
            (format!("{p}.mlp.gate.weight"), DType::BF16, vec![4, 256]),
            (
                format!("{p}.mlp.gate.e_score_correction_bias"),
                DType::F32,
                vec![4],
            ),
            (
                format!("{p}.input_layernorm.weight"),
                DType::BF16,
                vec![256],
            ),
            ("lm_head.weight".to_string(), DType::F32, vec![128, 256]),
        ];
        let t: Vec<(&str, DType, Vec<u64>)> = t
            .iter()
            .map(|(n, d, s)| (n.as_str(), *d, s.clone()))
            .collect();
        let got = quantize_targets(&t, Some(DType::F16), &KeepRule::default(), Scheme::Fp8Block);
        let found: Vec<Fate> = got.iter().map(|x| x.fate).collect();
        assert_eq!(
            found,
            [
                Fate::FusedMisfit,
                Fate::Misfit,
                Fate::Misfit,
                Fate::Quantize,
                Fate::Router,
                Fate::Other,
                Fate::Other,
                Fate::Other
            ]
        );
        let dtypes: Vec<DType> = got.iter().map(|x| x.dtype).collect();
        assert_eq!(
            dtypes,
            [
                DType::F16,
                DType::F16,
                DType::F16,
                DType::F8E4M3,
                DType::F16,
                DType::F32, // pinned, as in a quantized model
                DType::F16,
                DType::F16
            ]
        );
        // Per channel, every decoder Linear fits; --keep keeps one in its dtype.
        let per_channel = fates(&t, &["*.k_proj.weight"], Scheme::Fp8Channel);
        assert_eq!(
            &per_channel[..5],
            [
                Fate::Quantize,
                Fate::Kept,
                Fate::Quantize,
                Fate::Quantize,
                Fate::Router
            ]
        );
        let kept = quantize_targets(
            &t,
            Some(DType::F16),
            &KeepRule::new(&["*.k_proj.weight"]),
            Scheme::Fp8Channel,
        );
        assert_eq!(kept[1].dtype, DType::BF16);
        assert_eq!(kept[0].block, Some((1, 256)));
        let scale = Some((
            "model.layers.0.self_attn.q_proj.weight_scale".into(),
            vec![256, 1],
        ));
        assert_eq!(kept[0].scale, scale);
        let block = &got[3].scale;
        let o_proj = "model.layers.0.self_attn.o_proj.weight_scale_inv".to_string();
        assert_eq!(block, &Some((o_proj, vec![2, 2])));
        // No target: what is not quantized keeps its own dtype, misfits included.
        let own = quantize_targets(&t, None, &KeepRule::default(), Scheme::Fp8Block);
        for ((_, src, _), x) in t.iter().zip(&own) {
            let want = if x.fate == Fate::Quantize {
                DType::F8E4M3
            } else {
                *src
            };
            assert_eq!(x.dtype, want);
        }
    }

    #[test]
    fn only_f32_bf16_and_f16_weights_are_quantized() {
        let t = [
            ("m.layers.0.fc.weight", DType::F64, vec![128, 128]),
            ("m.layers.0.fc2.weight", DType::F16, vec![128, 128]),
            ("m.layers.0.fc3.weight", DType::F8E4M3, vec![128, 128]),
        ];
        assert_eq!(
            fates(&t, &[], Scheme::Fp8Block),
            [Fate::Misfit, Fate::Quantize, Fate::Misfit]
        );
    }
}
