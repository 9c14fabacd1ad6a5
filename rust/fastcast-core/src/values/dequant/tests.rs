//! Every format against its reference, element by element.

use super::int8::RECIPROCAL_127;
use super::*;

fn e4m3(x: f32) -> u8 {
    scalar::f32_to_e4m3(x, scalar::Fp8Overflow::Saturate)
}

/// The reference, element by element: fp32(q[i, j]) * s[i / br, j / bc].
fn reference(q: &[u8], rows: u64, cols: u64, block: (u64, u64), s: &[f32]) -> Vec<f32> {
    let grid_cols = cols.div_ceil(block.1);
    (0..rows * cols)
        .map(|k| {
            let (i, j) = (k / cols, k % cols);
            scalar::e4m3_to_f32(q[k as usize])
                * s[((i / block.0) * grid_cols + j / block.1) as usize]
        })
        .collect()
}

fn scales_bytes(s: &[f32]) -> Vec<u8> {
    s.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Dequantize all of `q` at once, back as f32 values.
fn all(d: &Fp8Scales, q: &[u8]) -> Vec<f32> {
    let mut out = vec![0u8; 4 * q.len()];
    d.dequantize(q, 0, &mut out);
    floats(&out)
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn partial_edge_blocks_and_any_chunking_match_the_reference() {
    let (rows, cols, block) = (5u64, 7u64, (2u64, 3u64)); // grid 3 x 3, edges partial
    let q: Vec<u8> = (0..rows * cols)
        .map(|k| e4m3((k as f32 - 17.0) / 3.0))
        .collect();
    let s: Vec<f32> = (0..9).map(|i| 0.5 + i as f32 * 0.125).collect();
    let d = Fp8Scales::new(
        DType::F8E4M3,
        &[rows, cols],
        block,
        DType::F32,
        &[3, 3],
        &scales_bytes(&s),
    )
    .unwrap();
    let want = reference(&q, rows, cols, block, &s);
    for chunk in [1usize, 2, 3, 6, 7, 11, 35] {
        let mut bytes = vec![0u8; 4 * q.len()];
        for start in (0..q.len()).step_by(chunk) {
            let end = (start + chunk).min(q.len());
            d.dequantize(&q[start..end], start as u64, &mut bytes[4 * start..4 * end]);
        }
        let got = floats(&bytes);
        assert_eq!(
            got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "chunk {chunk}"
        );
    }
}

#[test]
fn per_tensor_and_per_row_scales_are_blocks_too() {
    let q: Vec<u8> = (0..12).map(|k| e4m3(k as f32)).collect();
    let one = Fp8Scales::new(
        DType::F8E4M3,
        &[3, 4],
        (3, 4),
        DType::F32,
        &[],
        &2f32.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(
        all(&one, &q),
        (0..12).map(|k| k as f32 * 2.0).collect::<Vec<_>>()
    );
    let rows = [1f32, 10.0, 100.0];
    let per_row = Fp8Scales::new(
        DType::F8E4M3,
        &[3, 4],
        (1, 4),
        DType::F32,
        &[3, 1],
        &scales_bytes(&rows),
    )
    .unwrap();
    let out = all(&per_row, &q);
    assert_eq!(out[5], 5.0 * 10.0);
    assert_eq!(out[11], 11.0 * 100.0);
}

#[test]
fn bf16_scales_decode_exactly() {
    let s = scalar::f32_to_bf16(0.0078125); // 2^-7, exact in bf16
    let d = Fp8Scales::new(
        DType::F8E4M3,
        &[1, 2],
        (1, 2),
        DType::BF16,
        &[1],
        &s.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(
        all(&d, &[e4m3(448.0), e4m3(-3.0)]),
        [448.0 * 0.0078125, -3.0 * 0.0078125]
    );
}

#[test]
fn wrong_geometry_is_refused_with_the_shapes() {
    let err = Fp8Scales::new(
        DType::F8E4M3,
        &[576, 320],
        (128, 128),
        DType::F32,
        &[4, 3],
        &[0; 48],
    )
    .unwrap_err();
    assert!(err.contains("[4, 3]") && err.contains("needs 5x3"), "{err}");
    assert!(Fp8Scales::new(DType::BF16, &[2, 2], (1, 1), DType::F32, &[2, 2], &[0; 16]).is_err());
    assert!(Fp8Scales::new(
        DType::F8E4M3,
        &[2, 2],
        (0, 1),
        DType::F32,
        &[2, 2],
        &[0; 16]
    )
    .is_err());
}

// --- bitsandbytes, GPTQ, AWQ ---------------------------------------------

use std::collections::HashMap;

/// Deterministic pseudo-random numbers (an LCG), for codes and scales.
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    pub(super) fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
    fn float(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32 - 0.5
    }
}

pub(super) fn op(name: &str, dtype: DType, shape: &[u64]) -> Operand {
    Operand {
        name: name.into(),
        source: 0,
        dtype: dtype.safetensors_name().into(),
        shape: shape.to_vec(),
        offsets: (0, 0),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn i32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| scalar::f32_to_f16(x).to_le_bytes())
        .collect()
}

/// Build the dequantizer of `plan` with operands from `data` (by name).
fn build<'a>(
    plan: &'a Dequant,
    from: DType,
    shape: &[u64],
    src_len: usize,
    data: &'a HashMap<String, Vec<u8>>,
) -> Result<Dequantizer<'a>, String> {
    let find = |o: &'a Operand| -> Result<&'a [u8], String> {
        data.get(&o.name)
            .map(|v| v.as_slice())
            .ok_or_else(|| format!("no {}", o.name))
    };
    Dequantizer::new(plan, from, shape, src_len, &find)
}

/// Dequantize `src` in chunks of `chunk` elements, each given only its
/// source range; `aligned` rounds `chunk` up to the dequantizer's
/// alignment, as the executor does (else chunks start anywhere: bnb's
/// odd starts read a low nibble first).
pub(super) fn chunked(
    d: &Dequantizer,
    src: &[u8],
    numel: u64,
    chunk: u64,
    aligned: bool,
) -> Vec<u32> {
    let chunk = if aligned {
        chunk.div_ceil(d.align()) * d.align()
    } else {
        chunk
    };
    let mut out = vec![0u8; 4 * numel as usize];
    let mut begin = 0;
    while begin < numel {
        let end = (begin + chunk).min(numel);
        let (b, e) = d.source_range(begin, end);
        d.dequantize(
            &src[b..e],
            begin,
            &mut out[4 * begin as usize..4 * end as usize],
        );
        begin = end;
    }
    floats(&out).iter().map(|x| x.to_bits()).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A bnb 4-bit weight of `n` codes (odd, partial last block and group).
struct Bnb {
    packed: Vec<u8>,
    codes: Vec<u8>,
    code: Vec<f32>,
    absmax: Vec<f32>,
    absmax_u8: Vec<u8>,
    nested_code: Vec<f32>,
    nested_absmax: Vec<f32>,
}

fn bnb(n: u64, blocksize: u64, nested_blocksize: u64) -> Bnb {
    let mut r = Lcg(4);
    let codes: Vec<u8> = (0..n).map(|_| r.below(16) as u8).collect();
    let mut packed: Vec<u8> = codes
        .chunks(2)
        .map(|p| p[0] << 4 | p.get(1).unwrap_or(&0))
        .collect();
    if n % 2 == 1 {
        *packed.last_mut().unwrap() |= 0x9; // garbage in the unused low nibble
    }
    let blocks = n.div_ceil(blocksize);
    Bnb {
        packed,
        codes,
        code: (0..16).map(|_| r.float() * 2.0).collect(),
        absmax: (0..blocks).map(|_| r.float() + 0.75).collect(),
        absmax_u8: (0..blocks).map(|_| r.below(256) as u8).collect(),
        nested_code: (0..256).map(|_| r.float() * 2.0).collect(),
        nested_absmax: (0..blocks.div_ceil(nested_blocksize))
            .map(|_| r.float() + 0.6)
            .collect(),
    }
}

#[test]
fn bnb4_matches_the_reference_at_any_chunk_and_odd_starts() {
    let (n, bs, nbs, offset) = (203u64, 8u64, 4u64, 0.0306_f64);
    let w = bnb(n, bs, nbs);
    let blocks = n.div_ceil(bs);
    let mut data = HashMap::new();
    data.insert("absmax".to_string(), f32_bytes(&w.absmax));
    data.insert("map".to_string(), f32_bytes(&w.code));
    data.insert("absmax8".to_string(), w.absmax_u8.clone());
    data.insert("nabs".to_string(), f32_bytes(&w.nested_absmax));
    data.insert("nmap".to_string(), f32_bytes(&w.nested_code));
    let plain = Dequant::Bnb4 {
        absmax: op("absmax", DType::F32, &[blocks]),
        quant_map: op("map", DType::F32, &[16]),
        blocksize: bs,
        nested: None,
    };
    let nested = Dequant::Bnb4 {
        absmax: op("absmax8", DType::U8, &[blocks]),
        quant_map: op("map", DType::F32, &[16]),
        blocksize: bs,
        nested: Some(NestedAbsmax {
            absmax: op("nabs", DType::F32, &[blocks.div_ceil(nbs)]),
            quant_map: op("nmap", DType::F32, &[256]),
            blocksize: nbs,
            offset,
        }),
    };
    // The reference: code[nibble] * absmax[k / bs]; nested absmax first a
    // product, then plus the offset as an f32.
    let nested_absmax: Vec<f32> = (0..blocks as usize)
        .map(|b| {
            let scaled = w.nested_code[w.absmax_u8[b] as usize] * w.nested_absmax[b / nbs as usize];
            scaled + offset as f32
        })
        .collect();
    for (plan, absmax) in [(&plain, &w.absmax), (&nested, &nested_absmax)] {
        let want: Vec<f32> = (0..n as usize)
            .map(|k| w.code[w.codes[k] as usize] * absmax[k / bs as usize])
            .collect();
        // Any container dtype: the source is bytes.
        for from in [DType::U8, DType::BF16, DType::F32] {
            let d = build(plan, from, &[7, 29], w.packed.len(), &data).unwrap();
            assert_eq!(d.align(), 2);
            for chunk in [1u64, 2, 3, 5, 8, 9, 64, 203] {
                for aligned in [true, false] {
                    let got = chunked(&d, &w.packed, n, chunk, aligned);
                    assert_eq!(got, bits(&want), "{chunk} {aligned}");
                }
            }
        }
    }
    // Geometry: the packed bytes, the absmax count, the nested group count.
    let d = build(&plain, DType::U8, &[7, 30], w.packed.len(), &data);
    assert!(d.unwrap_err().contains("needs 105"));
    let d = build(&plain, DType::U8, &[7, 29], w.packed.len(), &data);
    assert!(d.is_ok());
    let mut bad = plain.clone();
    if let Dequant::Bnb4 { blocksize, .. } = &mut bad {
        *blocksize = 16;
    }
    let err = build(&bad, DType::U8, &[7, 29], w.packed.len(), &data).unwrap_err();
    assert!(
        err.contains("\"absmax\"") && err.contains("needs F32 [13]"),
        "{err}"
    );
    let mut bad = nested.clone();
    if let Dequant::Bnb4 {
        nested: Some(n), ..
    } = &mut bad
    {
        n.blocksize = 2;
    }
    let err = build(&bad, DType::U8, &[7, 29], w.packed.len(), &data).unwrap_err();
    assert!(
        err.contains("nested absmax") && err.contains("[13]"),
        "{err}"
    );
}

#[test]
fn int8_rows_are_cb_times_scb_times_the_f32_reciprocal() {
    // bitsandbytes' literal is the f32 nearest 1/127, written as a double.
    assert_eq!(RECIPROCAL_127 as f64, 7.874015718698502e-3);
    assert_eq!(RECIPROCAL_127, (1.0f64 / 127.0) as f32);
    let (rows, cols) = (5u64, 7u64);
    let mut r = Lcg(127);
    let cb: Vec<u8> = (0..rows * cols).map(|_| r.next() as u8).collect();
    let scb: Vec<f32> = (0..rows).map(|_| r.float() + 1.0).collect();
    let mut data = HashMap::new();
    data.insert("scb".to_string(), f32_bytes(&scb));
    let plan = Dequant::Int8Rows {
        scb: op("scb", DType::F32, &[rows]),
    };
    let d = build(&plan, DType::I8, &[rows, cols], cb.len(), &data).unwrap();
    let want: Vec<f32> = (0..(rows * cols) as usize)
        .map(|k| cb[k] as i8 as f32 * scb[k / cols as usize] * RECIPROCAL_127)
        .collect();
    for chunk in [1u64, 3, 7, 8, 35] {
        assert_eq!(
            chunked(&d, &cb, rows * cols, chunk, true),
            bits(&want),
            "{chunk}"
        );
    }
    // ... which is not always (CB * SCB) / 127.
    let divided = (0..(rows * cols) as usize)
        .filter(|&k| want[k] != cb[k] as i8 as f32 * scb[k / cols as usize] / 127.0)
        .count();
    assert!(divided > 0);
    let err = build(&plan, DType::U8, &[rows, cols], cb.len(), &data).unwrap_err();
    assert!(err.contains("needs I8"), "{err}");
    let err = build(&plan, DType::I8, &[cols, rows], cb.len(), &data).unwrap_err();
    assert!(
        err.contains("SCB") && err.contains("needs F32 [7]"),
        "{err}"
    );
}

/// A GPTQ or AWQ weight: its integers, zeros, scales and groups, packed.
struct Packed {
    rows: u64,
    cols: u64,
    q: Vec<u32>,      // [in, out]
    zeros: Vec<u32>,  // [groups, out], as stored
    scales: Vec<f32>, // [groups, out], f16 values
    group: Vec<u32>,  // [in]
    qweight: Vec<u8>,
    qzeros: Vec<u8>,
}

/// Pack `values` ([n, m]) `32 / bits` at a time along the rows (GPTQ qweight).
fn pack_rows(values: &[u32], n: usize, m: usize, bits: u32) -> Vec<u32> {
    let per = (32 / bits) as usize;
    (0..n / per)
        .flat_map(|r| {
            (0..m).map(move |c| {
                (0..per).fold(0u32, |w, k| {
                    w | values[(r * per + k) * m + c] << (k as u32 * bits)
                })
            })
        })
        .collect()
}

/// Pack along the columns, column `order[k]` of each group of them in
/// slot `k` (GPTQ qzeros in order; AWQ in its order).
fn pack_cols(values: &[u32], n: usize, m: usize, bits: u32, order: &[usize]) -> Vec<u32> {
    let per = (32 / bits) as usize;
    (0..n)
        .flat_map(|r| {
            (0..m / per).map(move |c| {
                (0..per).fold(0u32, |w, k| {
                    w | values[r * m + c * per + order[k]] << (k as u32 * bits)
                })
            })
        })
        .collect()
}

fn packed(awq: bool, bits: u32, rows: u64, cols: u64, group: u64, permute: bool) -> Packed {
    let mut r = Lcg(u64::from(bits) + 10 * u64::from(awq) + 100 * u64::from(permute));
    let (n, m) = (cols as usize, rows as usize);
    let groups = cols.div_ceil(group) as usize;
    let q: Vec<u32> = (0..n * m).map(|_| r.below(1 << bits)).collect();
    let zeros: Vec<u32> = (0..groups * m).map(|_| r.below(1 << bits)).collect();
    let scales: Vec<f32> = (0..groups * m)
        .map(|_| scalar::f16_to_f32(scalar::f32_to_f16(r.float() * 0.01)))
        .collect();
    let mut group: Vec<u32> = (0..cols).map(|i| (i / group) as u32).collect();
    if permute {
        for i in (1..n).rev() {
            group.swap(i, r.below(i as u32 + 1) as usize);
        }
    }
    let (qweight, qzeros) = if awq {
        let order = [0, 2, 4, 6, 1, 3, 5, 7];
        (
            pack_cols(&q, n, m, 4, &order),
            pack_cols(&zeros, groups, m, 4, &order),
        )
    } else {
        let order: Vec<usize> = (0..(32 / bits) as usize).collect();
        (
            pack_rows(&q, n, m, bits),
            pack_cols(&zeros, groups, m, bits, &order),
        )
    };
    Packed {
        rows,
        cols,
        q,
        zeros,
        scales,
        group,
        qweight: i32_bytes(&qweight),
        qzeros: i32_bytes(&qzeros),
    }
}

impl Packed {
    /// The reference: W[o, i] = scale[g, o] * f32(q[i, o] - (z[g, o] + plus)).
    fn reference(&self, plus: u32) -> Vec<f32> {
        let m = self.rows as usize;
        (0..(self.rows * self.cols) as usize)
            .map(|k| {
                let (o, i) = (k / self.cols as usize, k % self.cols as usize);
                let g = self.group[i] as usize;
                let z = (self.zeros[g * m + o] + plus) as i32;
                self.scales[g * m + o] * (self.q[i * m + o] as i32 - z) as f32
            })
            .collect()
    }

    fn data(&self) -> HashMap<String, Vec<u8>> {
        let mut data = HashMap::new();
        data.insert("qzeros".to_string(), self.qzeros.clone());
        data.insert("scales".to_string(), f16_bytes(&self.scales));
        data.insert("g_idx".to_string(), i32_bytes(&self.group));
        data
    }
}

fn gptq_plan(p: &Packed, bits: u32, group: u64, g_idx: bool, v1: bool) -> Dequant {
    let groups = p.cols.div_ceil(group);
    Dequant::Gptq {
        qzeros: op(
            "qzeros",
            DType::I32,
            &[groups, p.rows * u64::from(bits) / 32],
        ),
        scales: op("scales", DType::F16, &[groups, p.rows]),
        g_idx: g_idx.then(|| op("g_idx", DType::I32, &[p.cols])),
        group_size: group,
        bits,
        zero_plus_one: v1,
    }
}

#[test]
fn gptq_matches_the_reference_at_row_splits_in_2_4_and_8_bits() {
    // 40 outputs: tiles of 16, 16 and 8; 80 inputs in groups of 32 (the
    // last cut short), permuted as desc_act does.
    for bits in [2u32, 4, 8] {
        for (permute, v1) in [(false, true), (true, true), (false, false)] {
            let (rows, cols, group) = (48u64, 80u64, 32u64);
            let p = packed(false, bits, rows, cols, group, permute);
            let data = p.data();
            let plan = gptq_plan(&p, bits, group, true, v1);
            let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &data).unwrap();
            assert_eq!(d.align(), cols);
            let want = bits_of(&p.reference(u32::from(v1)));
            for chunk in [1u64, 80, 160, 17 * 80, 48 * 80] {
                assert_eq!(
                    chunked(&d, &p.qweight, rows * cols, chunk, true),
                    want,
                    "{bits} bits, permuted {permute}, v1 {v1}, chunk {chunk}"
                );
            }
            if !permute {
                // Without g_idx: groups by size.
                let plan = gptq_plan(&p, bits, group, false, v1);
                let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &data).unwrap();
                assert_eq!(chunked(&d, &p.qweight, rows * cols, 7 * 80, true), want);
            }
        }
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    bits(v)
}

#[test]
fn gptq_v1_zero_15_stored_wraps_to_16_as_autogptq_reads_it() {
    // v1 stores zero - 1; a stored 15 reads back as 16 (AutoGPTQ adds one
    // after unpacking, without wrapping), so q = 0 gives -16 * scale.
    let mut p = packed(false, 4, 8, 8, 8, false);
    p.zeros = vec![15; 8];
    p.q = vec![0; 64];
    p.qzeros = i32_bytes(&pack_cols(&p.zeros, 1, 8, 4, &[0, 1, 2, 3, 4, 5, 6, 7]));
    p.qweight = i32_bytes(&pack_rows(&p.q, 8, 8, 4));
    let data = p.data();
    let plan = gptq_plan(&p, 4, 8, true, true);
    let d = build(&plan, DType::I32, &[8, 8], p.qweight.len(), &data).unwrap();
    let got = chunked(&d, &p.qweight, 64, 64, true);
    assert_eq!(f32::from_bits(got[0]), -16.0 * p.scales[0]);
}

#[test]
fn awq_matches_the_reference_at_row_splits() {
    // 60 inputs: a last group of 28, and a last run of 4 inputs.
    let (rows, cols, group) = (40u64, 60u64, 32u64);
    let p = packed(true, 4, rows, cols, group, false);
    let data = p.data();
    let plan = Dequant::Awq {
        qzeros: op("qzeros", DType::I32, &[2, rows / 8]),
        scales: op("scales", DType::F16, &[2, rows]),
        group_size: group,
        bits: 4,
    };
    let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &data).unwrap();
    let want = bits(&p.reference(0));
    for chunk in [1u64, 60, 3 * 60, 17 * 60, 40 * 60] {
        assert_eq!(
            chunked(&d, &p.qweight, rows * cols, chunk, true),
            want,
            "{chunk}"
        );
    }
    // The order matters: reading nibbles in order gives something else.
    let mut wrong = data.clone();
    let z: Vec<u32> = pack_cols(&p.zeros, 2, rows as usize, 4, &[0, 1, 2, 3, 4, 5, 6, 7]);
    wrong.insert("qzeros".into(), i32_bytes(&z));
    let d = build(&plan, DType::I32, &[rows, cols], p.qweight.len(), &wrong).unwrap();
    assert_ne!(chunked(&d, &p.qweight, rows * cols, 60, true), want);
}

#[test]
fn packed_geometry_is_checked_with_messages_naming_the_operand() {
    let (rows, cols, group) = (16u64, 64u64, 32u64);
    let p = packed(false, 4, rows, cols, group, true);
    let data = p.data();
    let plan = gptq_plan(&p, 4, group, true, true);
    let len = p.qweight.len();
    let shape = [rows, cols];
    // 3-bit values straddle words: refused, saying so.
    let mut three = plan.clone();
    if let Dequant::Gptq { bits, .. } = &mut three {
        *bits = 3;
    }
    let err = build(&three, DType::I32, &shape, len, &data).unwrap_err();
    assert!(
        err.contains("3-bit GPTQ") && err.contains("straddle"),
        "{err}"
    );
    // A qweight of another size, another dtype.
    let err = build(&plan, DType::I32, &[rows, cols + 8], len, &data).unwrap_err();
    assert!(err.contains("qweight bytes"), "{err}");
    let err = build(&plan, DType::F16, &shape, len, &data).unwrap_err();
    assert!(err.contains("needs I32"), "{err}");
    // Scales for another number of groups.
    let mut bad = plan.clone();
    if let Dequant::Gptq { g_idx, .. } = &mut bad {
        *g_idx = None;
    }
    if let Dequant::Gptq { group_size, .. } = &mut bad {
        *group_size = 16;
    }
    let err = build(&bad, DType::I32, &shape, len, &data).unwrap_err();
    assert!(
        err.contains("\"scales\"") && err.contains("needs F16 or BF16 or F32 [4, 16]"),
        "{err}"
    );
    // A group index out of range.
    let mut data2 = data.clone();
    let mut g = p.group.clone();
    g[5] = 2;
    data2.insert("g_idx".into(), i32_bytes(&g));
    let err = build(&plan, DType::I32, &shape, len, &data2).unwrap_err();
    assert!(err.contains("input 5 in group 2"), "{err}");
    g[5] = u32::MAX; // -1
    data2.insert("g_idx".into(), i32_bytes(&g));
    let err = build(&plan, DType::I32, &shape, len, &data2).unwrap_err();
    assert!(err.contains("group -1"), "{err}");
    // AWQ in another width.
    let awq = Dequant::Awq {
        qzeros: op("qzeros", DType::I32, &[2, 2]),
        scales: op("scales", DType::F16, &[2, 16]),
        group_size: 32,
        bits: 8,
    };
    let err = build(&awq, DType::I32, &shape, len, &data).unwrap_err();
    assert!(err.contains("8-bit AWQ"), "{err}");
    // An operand whose bytes do not hold its declared shape.
    let mut short = data.clone();
    short.get_mut("scales").unwrap().pop();
    let err = build(&plan, DType::I32, &shape, len, &short).unwrap_err();
    assert!(
        err.contains("\"scales\"") && err.contains("do not hold"),
        "{err}"
    );
}
