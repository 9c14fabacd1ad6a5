//! GPTQ (2, 4, 8 bits) and AutoAWQ GEMM (4 bits): integer codes packed in
//! int32 words, a scale and a zero point per group and output.

use super::{check_group_index, float_at, u32_at, Bytes};
use crate::dtype::DType;

/// How a GPTQ or AWQ `qweight` and `qzeros` hold their integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// `qweight[i * bits / 32, o]` holds inputs `i..i + 32 / bits` of output
    /// `o`, low bits first; `qzeros[g, o * bits / 32]` outputs likewise.
    Gptq { bits: u32, zero_plus_one: bool },
    /// `qweight[i, o / 8]` and `qzeros[g, o / 8]` hold eight outputs, output
    /// `8c + j` at nibble `AWQ_NIBBLE[j]`.
    Awq,
}

/// AutoAWQ packs outputs `[0, 2, 4, 6, 1, 3, 5, 7]` into nibbles 0..8; output
/// `j` of a word is at nibble `AWQ_NIBBLE[j]` (the inverse order).
const AWQ_NIBBLE: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Output rows dequantized together: their words of one packed row are
/// adjacent (GPTQ) or shared (AWQ), their scales and zeros of one group too.
const TILE: usize = 64;

/// GPTQ or AWQ: integer codes in int32 words, a scale and a zero per (group,
/// output), the output `[rows = out, cols = in]`.
#[derive(Debug, Clone)]
pub struct PackedInts<'a> {
    packing: Packing,
    rows: u64,
    pub(super) cols: u64,
    pub(super) src_len: usize,
    qzeros: &'a [u8],
    scales: &'a [u8],
    scale_dtype: DType,
    groups: u64,
    /// The group of each input: `g_idx` (I32, checked in range), or by size.
    g_idx: Option<&'a [u8]>,
    group_size: u64,
}

impl<'a> PackedInts<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        packing: Packing,
        from: DType,
        shape: &[u64],
        src_len: usize,
        qzeros: Bytes<'a>,
        scales: Bytes<'a>,
        g_idx: Option<Bytes<'a>>,
        group_size: u64,
    ) -> Result<PackedInts<'a>, String> {
        let what = match packing {
            Packing::Gptq { .. } => "GPTQ",
            Packing::Awq => "AWQ",
        };
        if from != DType::I32 {
            return Err(format!(
                "{what} dequantization of a {from} qweight (needs I32)"
            ));
        }
        let &[rows, cols] = shape else {
            return Err(format!(
                "a {what} weight of shape {shape:?} (needs [out, in])"
            ));
        };
        // The qweight's shape, and the zeros' columns.
        let (qweight, zeros_cols) = match packing {
            Packing::Gptq { bits, .. } => {
                if !matches!(bits, 2 | 4 | 8) {
                    return Err(format!(
                        "{bits}-bit GPTQ (fastcast unpacks 2, 4 and 8 bits, which fill int32 \
                         words evenly; 3-bit values straddle words)"
                    ));
                }
                let per = 32 / bits as u64;
                if cols % per != 0 || rows % per != 0 {
                    return Err(format!(
                        "a {rows}x{cols} weight in {bits}-bit GPTQ words (both sides must be \
                         multiples of {per})"
                    ));
                }
                ([cols / per, rows], rows / per)
            }
            Packing::Awq => {
                if rows % 8 != 0 {
                    return Err(format!("{rows} AWQ outputs (needs a multiple of 8)"));
                }
                ([cols, rows / 8], rows / 8)
            }
        };
        if src_len as u64 != qweight[0] * qweight[1] * 4 {
            return Err(format!(
                "{src_len} qweight bytes for a {rows}x{cols} weight (needs I32 {qweight:?})"
            ));
        }
        // As AutoGPTQ and AutoAWQ size their buffers, with or without g_idx.
        if group_size == 0 {
            return Err(format!("a {what} group size of 0"));
        }
        let groups = cols.div_ceil(group_size);
        scales.expect(
            "the scales",
            &[DType::F16, DType::BF16, DType::F32],
            &[groups, rows],
        )?;
        qzeros.expect("the zeros", &[DType::I32], &[groups, zeros_cols])?;
        if let Some(g) = &g_idx {
            check_group_index(g, cols, groups)?;
        }
        Ok(PackedInts {
            packing,
            rows,
            cols,
            src_len,
            qzeros: qzeros.data,
            scales: scales.data,
            scale_dtype: scales.dtype,
            groups,
            g_idx: g_idx.map(|g| g.data),
            group_size,
        })
    }

    /// The zero point of group `g`, output `o` (GPTQ v1's stored value plus one).
    #[inline(always)]
    fn zero(&self, g: u64, o: u64) -> i32 {
        match self.packing {
            Packing::Gptq {
                bits,
                zero_plus_one,
            } => {
                let per = 32 / bits as u64;
                let word = u32_at(self.qzeros, (g * (self.rows / per) + o / per) as usize);
                let z = ((word >> ((o % per) as u32 * bits)) & ((1 << bits) - 1)) as i32;
                z + i32::from(zero_plus_one)
            }
            Packing::Awq => {
                let word = u32_at(self.qzeros, (g * (self.rows / 8) + o / 8) as usize);
                ((word >> (4 * AWQ_NIBBLE[(o % 8) as usize])) & 0xF) as i32
            }
        }
    }

    /// Output rows `first / cols ..` (whole rows: see [`Dequantizer::align`]),
    /// `src` being the whole `qweight`.
    pub(super) fn dequantize(&self, src: &[u8], first: u64, out: &mut [u8]) {
        let cols = self.cols as usize;
        if cols == 0 {
            return;
        }
        debug_assert!(first.is_multiple_of(self.cols) && (out.len() / 4).is_multiple_of(cols));
        let first_row = first / self.cols;
        let n_rows = (out.len() / 4 / cols) as u64;
        let group: Vec<u32> = (0..self.cols)
            .map(|i| match self.g_idx {
                Some(g_idx) => u32_at(g_idx, i as usize),
                None => (i / self.group_size) as u32,
            })
            .collect();
        // Whether each word's values (GPTQ: `per` inputs; AWQ: a run of eight)
        // share one group, as they do unless desc_act permuted the inputs: the
        // scale and zero are then looked up once a word.
        let run = match self.packing {
            Packing::Gptq { bits, .. } => (32 / bits) as usize,
            Packing::Awq => 8,
        };
        let shared = group.chunks(run).all(|c| c.iter().all(|&g| g == c[0]));
        let groups = self.groups as usize;
        let mut scales = vec![0f32; groups * TILE];
        let mut zeros = vec![0i32; groups * TILE];
        let mut tile = 0;
        while tile < n_rows {
            let height = (n_rows - tile).min(TILE as u64) as usize;
            let o0 = first_row + tile;
            // This tile's scales and zeros, [group][row].
            for g in 0..groups {
                for t in 0..height {
                    let o = o0 + t as u64;
                    let at = g as u64 * self.rows + o;
                    scales[g * TILE + t] = float_at(self.scale_dtype, self.scales, at as usize);
                    zeros[g * TILE + t] = self.zero(g as u64, o);
                }
            }
            // scale * f32(q - z): the references' one product.
            let value = |g: u32, t: usize, q: u32| -> [u8; 4] {
                let at = g as usize * TILE + t;
                (scales[at] * (q as i32 - zeros[at]) as f32).to_le_bytes()
            };
            let (rows, o0, t0) = (self.rows as usize, o0 as usize, tile as usize);
            let fast = Tile {
                scales: &scales,
                zeros: &zeros,
                rows,
                cols,
                o0,
                t0,
                height,
            };
            match self.packing {
                Packing::Gptq { bits, .. } if shared => match bits {
                    2 => fast.gptq_words::<2, 16>(src, out, &group),
                    4 => fast.gptq_words::<4, 8>(src, out, &group),
                    _ => fast.gptq_words::<8, 4>(src, out, &group),
                },
                Packing::Gptq { bits, .. } => {
                    // Packed row r holds inputs r * per.. of every output: one
                    // word per row of the tile, each giving `per` adjacent values.
                    let per = (32 / bits) as usize;
                    let mask = (1u32 << bits) - 1;
                    for r in 0..cols / per {
                        let words = &src[4 * (r * rows + o0)..4 * (r * rows + o0 + height)];
                        for (t, w) in words.chunks_exact(4).enumerate() {
                            let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                            let at = 4 * ((t0 + t) * cols + r * per);
                            let row = &mut out[at..at + 4 * per];
                            for (k, o) in row.chunks_exact_mut(4).enumerate() {
                                let q = (word >> (k as u32 * bits)) & mask;
                                o.copy_from_slice(&value(group[r * per + k], t, q));
                            }
                        }
                    }
                }
                Packing::Awq if shared => {
                    fast.awq_words(src, out, &group);
                }
                Packing::Awq => {
                    // Input i's words hold eight outputs each; where each row of
                    // the tile sits in them.
                    let slots: [(usize, u32); TILE] = std::array::from_fn(|t| {
                        let o = o0 + t;
                        (o / 8, 4 * AWQ_NIBBLE[o % 8])
                    });
                    // Eight inputs at a time, so each row of the tile is written
                    // 32 bytes at a time.
                    let per_input = rows / 8;
                    for i0 in (0..cols).step_by(8) {
                        let inputs = i0..(i0 + 8).min(cols);
                        for (t, &(c, shift)) in slots[..height].iter().enumerate() {
                            let at = 4 * ((t0 + t) * cols + i0);
                            let row = &mut out[at..at + 4 * inputs.len()];
                            for (i, o) in inputs.clone().zip(row.chunks_exact_mut(4)) {
                                let q = (u32_at(src, i * per_input + c) >> shift) & 0xF;
                                o.copy_from_slice(&value(group[i], t, q));
                            }
                        }
                    }
                }
            }
            tile += height as u64;
        }
    }
}

/// One tile of output rows: its scales and zeros (`[group][row]`), where it
/// sits, and the weight's geometry.
struct Tile<'t> {
    scales: &'t [f32],
    zeros: &'t [i32],
    rows: usize,
    cols: usize,
    o0: usize,
    t0: usize,
    height: usize,
}

impl Tile<'_> {
    /// AWQ runs of eight inputs sharing a group: the eight words of a run
    /// and an output word column, read once, give a row of eight values to
    /// each of the word's eight outputs in the tile.
    fn awq_words(&self, src: &[u8], out: &mut [u8], group: &[u32]) {
        let per_input = self.rows / 8;
        let (first, last) = (self.o0, self.o0 + self.height);
        for i0 in (0..self.cols).step_by(8) {
            let n = (self.cols - i0).min(8);
            let g = group[i0] as usize * TILE;
            for c in first / 8..last.div_ceil(8) {
                let mut words = [0u32; 8];
                for (i, w) in words[..n].iter_mut().enumerate() {
                    *w = u32_at(src, (i0 + i) * per_input + c);
                }
                for o in (8 * c).max(first)..(8 * c + 8).min(last) {
                    let t = o - first;
                    let shift = 4 * AWQ_NIBBLE[o % 8];
                    let (s, z) = (self.scales[g + t], self.zeros[g + t]);
                    let mut bytes = [0u8; 32];
                    for (b, w) in bytes.chunks_exact_mut(4).zip(words) {
                        let v = s * (((w >> shift) & 0xF) as i32 - z) as f32;
                        b.copy_from_slice(&v.to_le_bytes());
                    }
                    let at = 4 * ((self.t0 + t) * self.cols + i0);
                    if n == 8 {
                        // a fixed-size copy: inlined, where a run-time length
                        // calls memcpy for every 32 bytes
                        let row: &mut [u8; 32] = (&mut out[at..at + 32]).try_into().unwrap();
                        *row = bytes;
                    } else {
                        out[at..at + 4 * n].copy_from_slice(&bytes[..4 * n]);
                    }
                }
            }
        }
    }

    /// GPTQ words whose `PER` values share a group: each word of a tile row
    /// gives `PER` adjacent outputs `scale * f32(q - zero)`, the one product
    /// of the general loop, computed a word at a time.
    fn gptq_words<const BITS: u32, const PER: usize>(
        &self,
        src: &[u8],
        out: &mut [u8],
        group: &[u32],
    ) {
        let mask = (1u32 << BITS) - 1;
        for r in 0..self.cols / PER {
            let g = group[r * PER] as usize * TILE;
            let first = 4 * (r * self.rows + self.o0);
            let words = &src[first..first + 4 * self.height];
            for (t, w) in words.chunks_exact(4).enumerate() {
                let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                let (s, z) = (self.scales[g + t], self.zeros[g + t]);
                let mut v = [0f32; PER];
                for (k, v) in v.iter_mut().enumerate() {
                    *v = s * (((word >> (k as u32 * BITS)) & mask) as i32 - z) as f32;
                }
                let at = 4 * ((self.t0 + t) * self.cols + r * PER);
                for (o, v) in out[at..at + 4 * PER].chunks_exact_mut(4).zip(v) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}
