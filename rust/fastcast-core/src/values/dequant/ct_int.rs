//! compressed-tensors integer weights, `W[o, i] = s[o, g] * (q[o, i] - z[o, g])`
//! with `g` the group of input `i` (`g_idx[i]`, else `i / group_size`):
//!
//! - `pack-quantized`: the codes of each row packed into int32 words along the
//!   input axis, code `i` at bit `i * bits` of the row's words (low bits
//!   first; 1, 2, 4 or 8 bits fill a word evenly, so the dense and the older
//!   padded layouts agree), each stored plus `2^(bits - 1)`; each row starts a
//!   new word. Asymmetric zero points are packed the same way along the
//!   *output* axis (`[ceil(out * bits / 32), groups]`), or, before
//!   compressed-tensors packed them, I8 `[out, groups]`.
//! - `int-quantized` / `naive-quantized`: I8 codes as they are, I8 zero points.
//!
//! Scales are per row and group (`[out, groups]`, `[out, 1]` per channel) or
//! one for the tensor, in F16, BF16 or F32. The value is the f32 product
//! `s * f32(q - z)`: exact for F16 and BF16 scales (`|q - z| < 2^9`), so the
//! executor's rounding to the target is the only one. compressed-tensors
//! computes in the scale's dtype and then casts, rounding twice when the
//! target is another dtype than the scales' (see docs/quantized.md).

use super::{check_group_index, float_at, u32_at, Bytes};
use crate::dtype::DType;

/// Where the zero points are (symmetric schemes have none).
#[derive(Debug, Clone, Copy)]
enum Zeros<'a> {
    None,
    /// I32 words `[ceil(scale_rows * bits / 32), groups]`, packed along rows.
    Packed(&'a [u8]),
    /// I8, the scale's shape.
    Plain(&'a [u8]),
}

/// A checked compressed-tensors integer weight `[rows = out, cols = in]`.
#[derive(Debug, Clone)]
pub struct IntGroups<'a> {
    bits: u32,
    /// I32 words of packed codes (else I8 codes).
    packed: bool,
    pub(super) cols: u64,
    /// Words per row of a packed source.
    words: u64,
    scales: &'a [u8],
    scale_dtype: DType,
    /// One scale (and zero) row per output row, or one for the whole tensor.
    per_row: bool,
    groups: u64,
    group_size: u64,
    zeros: Zeros<'a>,
    g_idx: Option<&'a [u8]>,
}

/// Widths whose codes fill an int32 word evenly (3, 5, 6 and 7 bits were
/// packed two incompatible ways, told apart only by the writer's version).
const PACKED_BITS: [u32; 4] = [1, 2, 4, 8];

impl<'a> IntGroups<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        from: DType,
        shape: &[u64],
        src_len: usize,
        bits: u32,
        group_size: u64,
        scales: Bytes<'a>,
        zeros: Option<Bytes<'a>>,
        g_idx: Option<Bytes<'a>>,
    ) -> Result<IntGroups<'a>, String> {
        let &[rows, cols] = shape else {
            return Err(format!(
                "a compressed-tensors integer weight of shape {shape:?} (needs [out, in])"
            ));
        };
        let packed = match from {
            DType::I32 => true,
            DType::I8 => false,
            _ => {
                return Err(format!(
                    "compressed-tensors integer codes in {from} (needs I32 words or I8)"
                ))
            }
        };
        if packed && !PACKED_BITS.contains(&bits) {
            return Err(format!(
                "{bits}-bit packed integers (fastcast unpacks 1, 2, 4 and 8 bits; the \
                 others straddle int32 words in two layouts that only the writer's version \
                 tells apart)"
            ));
        }
        if !(1..=8).contains(&bits) {
            return Err(format!("{bits}-bit integer codes (1 to 8 bits)"));
        }
        let words = if packed {
            (cols * u64::from(bits)).div_ceil(32)
        } else {
            cols
        };
        let need = rows * words * if packed { 4 } else { 1 };
        if src_len as u64 != need {
            let held = if packed {
                format!("I32 [{rows}, {words}]")
            } else {
                format!("I8 [{rows}, {cols}]")
            };
            return Err(format!(
                "{src_len} bytes of codes for a {rows}x{cols} weight (needs {held})"
            ));
        }
        if group_size == 0 {
            return Err("a group size of 0".into());
        }
        let groups = cols.div_ceil(group_size).max(1);
        let floats = [DType::F16, DType::BF16, DType::F32];
        // Per row and group, or (tensor strategy) one scale, `[]`, `[1]` or `[1, 1]`.
        let per_row = scales.shape == [rows, groups]
            || !(groups == 1 && scales.shape.iter().product::<u64>() == 1);
        let scale_shape = if per_row {
            vec![rows, groups]
        } else {
            scales.shape.to_vec()
        };
        scales.expect("the scale", &floats, &scale_shape)?;
        let scale_rows = if per_row { rows } else { 1 };
        let zeros = match zeros {
            None => Zeros::None,
            Some(z) if z.dtype == DType::I32 => {
                let packed_rows = (scale_rows * u64::from(bits)).div_ceil(32);
                if !PACKED_BITS.contains(&bits) {
                    return Err(format!("{bits}-bit packed zero points"));
                }
                z.expect("the zero point", &[DType::I32], &[packed_rows, groups])?;
                Zeros::Packed(z.data)
            }
            Some(z) => {
                z.expect("the zero point", &[DType::I8], &scale_shape)?;
                Zeros::Plain(z.data)
            }
        };
        if let Some(g) = &g_idx {
            check_group_index(g, cols, groups)?;
        }
        Ok(IntGroups {
            bits,
            packed,
            cols,
            words,
            scales: scales.data,
            scale_dtype: scales.dtype,
            per_row,
            groups,
            group_size,
            zeros,
            g_idx: g_idx.map(|g| g.data),
        })
    }

    /// The source bytes of output rows `begin / cols .. end / cols`.
    pub(super) fn source_range(&self, begin: u64, end: u64) -> (usize, usize) {
        let (r0, r1) = (begin / self.cols.max(1), end.div_ceil(self.cols.max(1)));
        let row = self.words * if self.packed { 4 } else { 1 };
        ((r0 * row) as usize, (r1 * row) as usize)
    }

    /// The zero point of scale row `r`, group `g`.
    #[inline(always)]
    fn zero(&self, r: u64, g: u64) -> i32 {
        match self.zeros {
            Zeros::None => 0,
            Zeros::Plain(z) => z[(r * self.groups + g) as usize] as i8 as i32,
            Zeros::Packed(z) => {
                let per = u64::from(32 / self.bits);
                let word = u32_at(z, ((r / per) * self.groups + g) as usize);
                let stored = (word >> ((r % per) as u32 * self.bits)) & mask(self.bits);
                stored as i32 - (1 << (self.bits - 1))
            }
        }
    }

    /// Output rows `first / cols ..` (whole rows: see `Dequantizer::align`),
    /// `src` being their source bytes ([`Self::source_range`]).
    pub(super) fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let cols = self.cols as usize;
        if cols == 0 {
            return;
        }
        debug_assert!(first.is_multiple_of(self.cols) && (out.len() / 4).is_multiple_of(cols));
        let first_row = first / self.cols;
        let groups = self.groups as usize;
        let group_of: Vec<u32> = match self.g_idx {
            Some(g_idx) => (0..cols).map(|i| u32_at(g_idx, i)).collect(),
            None => Vec::new(),
        };
        let mut codes = vec![0i32; cols];
        let mut scale = vec![0f32; groups];
        let mut zero = vec![0i32; groups];
        let row_bytes = self.words as usize * if self.packed { 4 } else { 1 };
        for (t, row_out) in out.chunks_exact_mut(4 * cols).enumerate() {
            let r = first_row + t as u64;
            let sr = if self.per_row { r } else { 0 };
            for g in 0..groups {
                let at = (sr * self.groups) as usize + g;
                scale[g] = float_at(self.scale_dtype, self.scales, at);
                zero[g] = self.zero(sr, g as u64);
            }
            let row = &src[t * row_bytes..(t + 1) * row_bytes];
            if self.packed {
                unpack(row, self.bits, &mut codes);
            } else {
                for (c, &b) in codes.iter_mut().zip(row) {
                    *c = b as i8 as i32;
                }
            }
            // s * f32(q - z): exact for 16-bit scales, rounded once for F32 ones.
            let value = |q: i32, g: usize| (scale[g] * (q - zero[g]) as f32).to_le_bytes();
            if group_of.is_empty() {
                // A group's inputs are adjacent: one scale and zero for a run of them.
                let size = self.group_size as usize;
                for g in 0..groups {
                    let (lo, hi) = (g * size, ((g + 1) * size).min(cols));
                    let outs = row_out[4 * lo..4 * hi].chunks_exact_mut(4);
                    for (o, &q) in outs.zip(&codes[lo..hi]) {
                        o.copy_from_slice(&value(q, g));
                    }
                }
            } else {
                let outs = row_out.chunks_exact_mut(4).zip(&codes).zip(&group_of);
                for ((o, &q), &g) in outs {
                    o.copy_from_slice(&value(q, g as usize));
                }
            }
        }
    }
}

fn mask(bits: u32) -> u32 {
    if bits == 32 {
        u32::MAX
    } else {
        (1 << bits) - 1
    }
}

/// The signed codes of one packed row: code `i` at bit `i * bits` of its
/// little-endian words, minus `2^(bits - 1)`.
fn unpack(row: &[u8], bits: u32, codes: &mut [i32]) {
    let per = (32 / bits) as usize;
    let (m, offset) = (mask(bits), 1i32 << (bits - 1));
    for (w, out) in row.chunks_exact(4).zip(codes.chunks_mut(per)) {
        let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        for (k, c) in out.iter_mut().enumerate() {
            *c = ((word >> (k as u32 * bits)) & m) as i32 - offset;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{chunked, op, Lcg};
    use super::super::{Dequant, Dequantizer, Operand};
    use crate::cast::scalar;
    use crate::dtype::DType;
    use std::collections::HashMap;

    /// Dense packing along the last axis of `[n, m]` unsigned values, each row
    /// starting a word (compressed-tensors' `pack_to_int32`).
    fn pack(values: &[u32], n: usize, m: usize, bits: u32) -> Vec<u8> {
        let words = (m * bits as usize).div_ceil(32);
        let mut out = vec![0u32; n * words];
        for r in 0..n {
            for c in 0..m {
                let bit = c * bits as usize;
                out[r * words + bit / 32] |= values[r * m + c] << (bit % 32);
            }
        }
        out.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    fn transpose(v: &[u32], n: usize, m: usize) -> Vec<u32> {
        (0..m * n).map(|k| v[(k % n) * m + k / n]).collect()
    }

    /// One weight: codes q (signed), zeros z (signed), bf16 scales, groups.
    struct Case {
        rows: u64,
        cols: u64,
        bits: u32,
        q: Vec<i32>,
        z: Vec<i32>,
        s: Vec<f32>,
        group: Vec<u32>,
        groups: u64,
    }

    fn case(bits: u32, rows: u64, cols: u64, group_size: u64, permute: bool, seed: u64) -> Case {
        let mut r = Lcg(seed);
        let half = 1i32 << (bits - 1);
        let groups = cols.div_ceil(group_size);
        let n = (rows * cols) as usize;
        let q = (0..n).map(|_| r.below(1 << bits) as i32 - half).collect();
        let z = (0..rows * groups)
            .map(|_| r.below(1 << bits) as i32 - half)
            .collect();
        let s = (0..rows * groups)
            .map(|_| scalar::bf16_to_f32(0x3c00 + r.below(0x400) as u16))
            .collect();
        let mut group: Vec<u32> = (0..cols).map(|i| (i / group_size) as u32).collect();
        if permute {
            for i in (1..cols as usize).rev() {
                group.swap(i, r.below(i as u32 + 1) as usize);
            }
        }
        Case {
            rows,
            cols,
            bits,
            q,
            z,
            s,
            group,
            groups,
        }
    }

    impl Case {
        fn want(&self, zeros: bool) -> Vec<u32> {
            (0..(self.rows * self.cols) as usize)
                .map(|k| {
                    let (o, i) = (k / self.cols as usize, k % self.cols as usize);
                    let at = o * self.groups as usize + self.group[i] as usize;
                    let z = if zeros { self.z[at] } else { 0 };
                    // exact in f64, as the product rounded once
                    ((self.s[at] as f64) * f64::from(self.q[k] - z)) as f32
                })
                .map(f32::to_bits)
                .collect()
        }

        fn data(&self, packed: bool, zeros: bool) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
            let half = 1i32 << (self.bits - 1);
            let (n, m) = (self.rows as usize, self.cols as usize);
            let src = if packed {
                let stored: Vec<u32> = self.q.iter().map(|&q| (q + half) as u32).collect();
                pack(&stored, n, m, self.bits)
            } else {
                self.q.iter().map(|&q| q as i8 as u8).collect()
            };
            let mut data = HashMap::new();
            let scales = self
                .s
                .iter()
                .flat_map(|&x| scalar::f32_to_bf16(x).to_le_bytes())
                .collect();
            data.insert("s".into(), scales);
            let g = self.groups as usize;
            let z = if packed {
                let stored: Vec<u32> = self.z.iter().map(|&z| (z + half) as u32).collect();
                let t = transpose(&stored, n, g); // [groups, out]
                let p = pack(&t, g, n, self.bits); // [groups, words]
                let words: Vec<u32> = p
                    .chunks_exact(4)
                    .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                    .collect();
                let w = words.len() / g;
                transpose(&words, g, w) // [words, groups]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect()
            } else {
                self.z.iter().map(|&z| z as i8 as u8).collect()
            };
            if zeros {
                data.insert("z".into(), z);
            }
            let g_idx = self.group.iter().flat_map(|x| x.to_le_bytes()).collect();
            data.insert("g".into(), g_idx);
            (src, data)
        }

        fn plan(&self, packed: bool, zeros: bool, g_idx: bool, group_size: u64) -> Dequant {
            let (rows, groups) = (self.rows, self.groups);
            let zshape = if packed {
                vec![(rows * u64::from(self.bits)).div_ceil(32), groups]
            } else {
                vec![rows, groups]
            };
            let zdtype = if packed { DType::I32 } else { DType::I8 };
            Dequant::CtInt {
                scale: op("s", DType::BF16, &[rows, groups]),
                zero_point: zeros.then(|| op("z", zdtype, &zshape)),
                g_idx: g_idx.then(|| op("g", DType::I32, &[self.cols])),
                bits: self.bits,
                group_size,
            }
        }
    }

    fn run(
        plan: &Dequant,
        from: DType,
        c: &Case,
        src: &[u8],
        data: &HashMap<String, Vec<u8>>,
        chunk_rows: u64,
    ) -> Vec<u32> {
        let find = |o: &Operand| -> Result<&[u8], String> {
            data.get(&o.name)
                .map(|v| v.as_slice())
                .ok_or("missing".into())
        };
        let d = Dequantizer::new(plan, from, &[c.rows, c.cols], src.len(), &find).unwrap();
        assert_eq!(d.align(), c.cols);
        chunked(&d, src, c.rows * c.cols, chunk_rows * c.cols, true)
    }

    #[test]
    fn packed_codes_and_zeros_match_the_reference_in_every_width_and_chunking() {
        // 37 outputs (zero words cut short), 72 inputs (rows end mid-word for
        // 1 and 2... bits: 72 * 1 = 72 bits), groups of 32 with a short last.
        for bits in [1u32, 2, 4, 8] {
            for (zeros, permute) in [(false, false), (true, false), (true, true)] {
                let c = case(bits, 37, 72, 32, permute, u64::from(bits));
                let (src, data) = c.data(true, zeros);
                let plan = c.plan(true, zeros, permute, 32);
                let want = c.want(zeros);
                for chunk in [1u64, 5, 37] {
                    assert_eq!(
                        run(&plan, DType::I32, &c, &src, &data, chunk),
                        want,
                        "{bits} bits, zeros {zeros}, permuted {permute}, chunk {chunk}"
                    );
                }
            }
        }
    }

    #[test]
    fn i8_codes_and_zeros_per_channel_and_per_tensor() {
        let c = case(8, 9, 40, 40, false, 3);
        for zeros in [false, true] {
            let (src, data) = c.data(false, zeros);
            let plan = c.plan(false, zeros, false, 40);
            assert_eq!(run(&plan, DType::I8, &c, &src, &data, 4), c.want(zeros));
        }
        // One scale for the tensor.
        let mut t = case(8, 6, 10, 10, false, 5);
        let s = t.s[0];
        t.s = vec![s; 6];
        let (src, mut data) = t.data(false, false);
        data.insert("s".into(), scalar::f32_to_bf16(s).to_le_bytes().to_vec());
        let plan = Dequant::CtInt {
            scale: op("s", DType::BF16, &[1]),
            zero_point: None,
            g_idx: None,
            bits: 8,
            group_size: 10,
        };
        assert_eq!(run(&plan, DType::I8, &t, &src, &data, 2), t.want(false));
    }

    /// Why `plan` is refused for an `[8, 64]` weight of `len` source bytes.
    fn refusal(plan: &Dequant, from: DType, len: usize, data: &HashMap<String, Vec<u8>>) -> String {
        let find = |o: &Operand| -> Result<&[u8], String> {
            data.get(&o.name)
                .map(|v| v.as_slice())
                .ok_or("missing".into())
        };
        Dequantizer::new(plan, from, &[8, 64], len, &find).unwrap_err()
    }

    #[test]
    fn geometry_is_checked_with_messages_naming_the_operand() {
        let c = case(4, 8, 64, 32, false, 9);
        let (src, data) = c.data(true, true);
        let err = |plan: &Dequant, from: DType, len: usize| refusal(plan, from, len, &data);
        let good = c.plan(true, true, false, 32);
        assert!(err(&good, DType::I32, src.len() - 4).contains("needs I32 [8, 8]"));
        assert!(err(&good, DType::F16, src.len()).contains("needs I32 words or I8"));
        let mut three = c.plan(true, false, false, 32);
        if let Dequant::CtInt { bits, .. } = &mut three {
            *bits = 3;
        }
        assert!(err(&three, DType::I32, src.len()).contains("3-bit"));
        let wide = c.plan(true, true, false, 16); // 4 groups, the scale has 2
        assert!(err(&wide, DType::I32, src.len()).contains("the scale \"s\""));
        let mut bad = c.plan(true, true, false, 32);
        if let Dequant::CtInt {
            zero_point: Some(z),
            ..
        } = &mut bad
        {
            z.shape = vec![8, 2]; // unpacked, but I32
        }
        let mut unpacked = data.clone();
        unpacked.insert("z".into(), vec![0; 64]);
        let e = refusal(&bad, DType::I32, src.len(), &unpacked);
        assert!(
            e.contains("the zero point \"z\" is I32 [8, 2] (needs I32 [1, 2])"),
            "{e}"
        );
        // A group index past the last group.
        let mut past = data.clone();
        let sevens = [7u32; 64].iter().flat_map(|x| x.to_le_bytes()).collect();
        past.insert("g".into(), sevens);
        let plan = c.plan(true, true, true, 32);
        let e = refusal(&plan, DType::I32, src.len(), &past);
        assert!(e.contains("in group 7 (there are 2)"), "{e}");
    }
}
