//! The `--quantize` schemes: their names, the block one scale covers, which
//! weights fit them, and the name of the scale tensor beside a weight.

/// The block of DeepSeek/FineGrained `fp8` (`weight_block_size`).
pub const FP8_BLOCK: u64 = 128;

/// How `--quantize` quantizes a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `fp8`: 128 × 128 blocks, F32 `weight_scale_inv`; only weights whose
    /// both sides are multiples of 128 (what vLLM needs under tensor
    /// parallelism).
    Fp8Block,
    /// `fp8-channel`: one scale per output row, F32 `weight_scale` `[out, 1]`
    /// (compressed-tensors' `FP8_DYNAMIC`); any shape.
    Fp8Channel,
}

impl Scheme {
    /// Every scheme, in the order the CLI lists them.
    pub const ALL: [Scheme; 2] = [Scheme::Fp8Block, Scheme::Fp8Channel];

    /// The name `--quantize` takes.
    pub const fn name(self) -> &'static str {
        match self {
            Scheme::Fp8Block => "fp8",
            Scheme::Fp8Channel => "fp8-channel",
        }
    }

    /// The scheme called `name`, if any.
    ///
    /// ```
    /// use fastcast_core::rules::scheme::Scheme;
    /// assert_eq!(Scheme::from_name("fp8-channel"), Some(Scheme::Fp8Channel));
    /// assert_eq!(Scheme::from_name("int4"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Scheme> {
        Scheme::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The name of the scale tensor beside `x.weight`.
    pub const fn scale_suffix(self) -> &'static str {
        match self {
            Scheme::Fp8Block => "weight_scale_inv",
            Scheme::Fp8Channel => "weight_scale",
        }
    }

    /// The block one scale covers in a weight of `shape` (seen as 2-D).
    ///
    /// ```
    /// use fastcast_core::rules::scheme::Scheme;
    /// assert_eq!(Scheme::Fp8Block.block(&[256, 512]), (128, 128));
    /// assert_eq!(Scheme::Fp8Channel.block(&[256, 512]), (1, 512));
    /// ```
    pub fn block(self, shape: &[u64]) -> (u64, u64) {
        match self {
            Scheme::Fp8Block => (FP8_BLOCK, FP8_BLOCK),
            Scheme::Fp8Channel => (1, shape.last().copied().unwrap_or(1)),
        }
    }

    /// Whether a weight of `shape` is quantized in this scheme: both sides
    /// multiples of the block for `fp8` (no partial blocks), any non-empty
    /// shape per channel.
    ///
    /// ```
    /// use fastcast_core::rules::scheme::Scheme;
    /// assert!(Scheme::Fp8Block.fits(&[256, 512]));
    /// assert!(!Scheme::Fp8Block.fits(&[576, 512]));
    /// assert!(Scheme::Fp8Channel.fits(&[576, 7]));
    /// ```
    pub fn fits(self, shape: &[u64]) -> bool {
        let (rows, cols) = as_2d(shape);
        if rows == 0 || cols == 0 {
            return false;
        }
        match self {
            Scheme::Fp8Block => rows % FP8_BLOCK == 0 && cols % FP8_BLOCK == 0,
            Scheme::Fp8Channel => true,
        }
    }
}

/// A shape seen as 2-D: (product of all but the last dimension, the last).
pub(crate) fn as_2d(shape: &[u64]) -> (u64, u64) {
    match shape.split_last() {
        Some((&cols, rest)) => (rest.iter().product(), cols),
        None => (1, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_by_name_with_their_blocks_and_fit_rules() {
        for s in Scheme::ALL {
            assert_eq!(Scheme::from_name(s.name()), Some(s));
        }
        assert_eq!(Scheme::Fp8Block.scale_suffix(), "weight_scale_inv");
        assert_eq!(Scheme::Fp8Channel.scale_suffix(), "weight_scale");
        assert!(Scheme::Fp8Block.fits(&[128, 128]));
        assert!(!Scheme::Fp8Block.fits(&[128, 192]));
        assert!(!Scheme::Fp8Block.fits(&[0, 128]));
        assert!(!Scheme::Fp8Channel.fits(&[5, 0]));
        assert_eq!(Scheme::Fp8Channel.block(&[5, 7]), (1, 7));
    }
}
