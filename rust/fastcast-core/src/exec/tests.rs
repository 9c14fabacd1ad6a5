//! The executor on real files: values, layout, chunking, cleanup on failure.

use std::fs;

use super::chunks::run_order;
use super::*;
use crate::cast::Fp8Overflow;
use crate::format::header::{Header, TensorInfo, MAX_HEADER_LEN};
use crate::plan::wire::PLAN_VERSION;
use crate::scratch::Scratch;
use crate::values::Value;

/// The run's loss counts, in plan order.
fn losses(stats: &ExecStats) -> Vec<(String, LossStats)> {
    stats.losses().cloned().collect()
}

/// Write a safetensors file of f32 tensors `a` (n values) and an i64 `step`.
fn source(dir: &Path, n: usize) -> (PathBuf, Vec<f32>) {
    let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
    let header = Header {
        metadata: Some(vec![("format".into(), "pt".into())]),
        tensors: vec![
            TensorInfo {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![n as u64],
                data_offsets: (0, 4 * n as u64),
            },
            TensorInfo {
                name: "step".into(),
                dtype: DType::I64,
                shape: vec![],
                data_offsets: (4 * n as u64, 4 * n as u64 + 8),
            },
        ],
        header_len: 0,
    };
    let mut bytes = header.to_bytes();
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    bytes.extend(42i64.to_le_bytes());
    let path = dir.join("in.safetensors");
    fs::write(&path, &bytes).unwrap();
    (path, values)
}

fn plan_for(src: &Path, out: &Path, n: u64, to: &str) -> Plan {
    let size = fs::metadata(src).unwrap().len();
    let data_start = Header::read(src).unwrap().data_start();
    let to_size = to.parse::<DType>().unwrap().size() as u64;
    Plan {
        version: PLAN_VERSION,
        sources: vec![SourceFile {
            path: src.to_owned(),
            size,
        }],
        shards: vec![ShardPlan {
            name: out.file_name().unwrap().to_string_lossy().into_owned(),
            path: out.to_owned(),
            metadata: Some(vec![("format".into(), "pt".into())]),
            tensors: vec![
                TensorPlan {
                    name: "step".into(),
                    shape: vec![],
                    source: 0,
                    src_dtype: DType::I64,
                    dst_dtype: DType::I64,
                    src_offsets: (data_start + 4 * n, data_start + 4 * n + 8),
                    dst_offsets: (0, 8),
                    value: Value::Cast,
                },
                TensorPlan {
                    name: "a".into(),
                    shape: vec![n],
                    source: 0,
                    src_dtype: DType::F32,
                    dst_dtype: to.parse().unwrap(),
                    src_offsets: (data_start, data_start + 4 * n),
                    dst_offsets: (8, 8 + to_size * n),
                    value: Value::Cast,
                },
            ],
        }],
    }
}

#[test]
fn converts_values_and_copies_integers() {
    let dir = Scratch::new("values");
    let n = 100_003;
    let (src, values) = source(&dir.0, n);
    let out = dir.0.join("out.safetensors");
    let opts = ExecOptions {
        chunk_bytes: 4096, // many chunks, each tensor split unevenly
        ..ExecOptions::default()
    };
    let progress = Progress::default();
    let stats = execute(&plan_for(&src, &out, n as u64, "BF16"), &opts, &progress).unwrap();
    assert_eq!(stats.tensors_cast, 1);
    assert_eq!(stats.tensors_copied, 1);
    assert_eq!(stats.bytes_read, 4 * n as u64 + 8);
    assert_eq!(
        progress.bytes_done.load(Ordering::Relaxed),
        stats.bytes_read
    );

    let bytes = fs::read(&out).unwrap();
    assert_eq!(stats.bytes_written, bytes.len() as u64);
    let header = Header::parse(&out, &bytes).unwrap();
    assert_eq!(header.metadata, Some(vec![("format".into(), "pt".into())]));
    let data = &bytes[header.data_start() as usize..];
    assert_eq!(header.data_start() % 8, 0);
    assert_eq!(&data[..8], &42i64.to_le_bytes());
    let src_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut want = vec![0u8; 2 * n];
    let exact = CastOptions {
        fp8_overflow: Fp8Overflow::Saturate,
        kernel: crate::cast::Kernel::Scalar,
    };
    cast::cast(&src_bytes, DType::F32, &mut want, DType::BF16, &exact).unwrap();
    assert_eq!(&data[8..], &want[..]);
}

#[test]
fn a_plan_that_does_not_tile_is_refused_before_writing() {
    let dir = Scratch::new("tiling");
    let (src, _) = source(&dir.0, 10);
    let out = dir.0.join("out.safetensors");
    let mut plan = plan_for(&src, &out, 10, "F16");
    plan.shards[0].tensors[1].dst_offsets = (10, 30); // leaves a gap
    let err = execute(&plan, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("gap"), "{err}");
    assert_eq!(
        fs::read_dir(&dir.0).unwrap().count(),
        1,
        "only the input remains"
    );
}

/// What a reader would refuse in the header the plan makes is refused before
/// anything is written: a name twice, a metadata key twice, a tensor under the
/// name the format keeps for the metadata.
#[test]
fn a_plan_whose_header_a_reader_would_refuse_writes_nothing() {
    let dir = Scratch::new("refused-header");
    let (src, _) = source(&dir.0, 10);
    let out = dir.0.join("out.safetensors");
    type Spoil = fn(&mut ShardPlan);
    let cases: [(&str, Spoil); 3] = [
        ("listed twice", |s| s.tensors[1].name = "step".into()),
        ("listed twice", |s| {
            s.metadata = Some(vec![("a".into(), "1".into()), ("a".into(), "2".into())])
        }),
        ("__metadata__", |s| {
            s.tensors[1].name = "__metadata__".into()
        }),
    ];
    for (expected, spoil) in cases {
        let mut plan = plan_for(&src, &out, 10, "F16");
        spoil(&mut plan.shards[0]);
        let err = execute(&plan, &ExecOptions::default(), &Progress::default())
            .map(|_| format!("{:?} was written", plan.shards[0]))
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
        assert!(err.to_string().contains("out.safetensors"), "{err}");
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1, "only the input");
    }
}

#[test]
fn source_bounds_and_changes_are_checked() {
    let dir = Scratch::new("bounds");
    let (src, _) = source(&dir.0, 10);
    let out = dir.0.join("out.safetensors");
    let mut plan = plan_for(&src, &out, 10, "F16");
    plan.shards[0].tensors[1].src_offsets.1 += 4;
    let err = execute(&plan, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(matches!(err, Error::Plan { .. }), "{err}");

    let mut plan = plan_for(&src, &out, 10, "F16");
    plan.sources[0].size += 1;
    let err = execute(&plan, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("changed since the conversion was planned"),
        "{err}"
    );

    let mut plan = plan_for(&src, &out, 10, "F16");
    plan.shards[0].tensors[0].dst_dtype = DType::F32; // an integer cast
    let err = execute(&plan, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("cannot cast I64 to F32"), "{err}");
    assert!(!out.exists());
}

#[test]
fn cancelling_leaves_no_file_behind() {
    let dir = Scratch::new("cancel");
    let (src, _) = source(&dir.0, 1000);
    let out = dir.0.join("out.safetensors");
    let progress = Progress::default();
    progress.cancel.store(true, Ordering::Relaxed);
    let err = execute(
        &plan_for(&src, &out, 1000, "F16"),
        &ExecOptions::default(),
        &progress,
    );
    assert!(matches!(err, Err(Error::Cancelled)));
    let names: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("in.safetensors")]);
}

/// The plan of `plan_for` split in two shards: `step` alone (copied), then
/// `a` alone (cast), in a subfolder as diffusers layouts have them.
fn two_shards(src: &Path, dir: &Path, n: u64, to: &str) -> Plan {
    let mut plan = plan_for(src, &dir.join("unused"), n, to);
    let mut a = plan.shards[0].clone();
    let mut step = plan.shards[0].clone();
    step.tensors.truncate(1);
    a.tensors.remove(0);
    a.tensors[0].dst_offsets.1 -= 8;
    a.tensors[0].dst_offsets.0 = 0;
    for (shard, name) in [
        (&mut step, "unet/m-00001-of-00002.safetensors"),
        (&mut a, "unet/m-00002-of-00002.safetensors"),
    ] {
        shard.name = name.into();
        shard.path = dir.join(name);
    }
    plan.shards = vec![step, a];
    plan
}

#[test]
fn each_shard_record_carries_its_own_losses() {
    let dir = Scratch::new("losses");
    let n = 1000;
    let (src, values) = source(&dir.0, n); // |x| up to 1e3: fine in f16 ...
    fs::create_dir_all(dir.0.join("unet")).unwrap();
    let plan = two_shards(&src, &dir.0, n as u64, "F8_E4M3"); // ... but not in e4m3 (> 448)
    let over = values.iter().filter(|v| v.abs() > 464.0).count() as u64;
    assert!(over > 0);
    let journal = dir.0.join("journal.jsonl");
    let opts = ExecOptions {
        journal: Some(journal.clone()),
        ..ExecOptions::default()
    };
    let stats = execute(&plan, &opts, &Progress::default()).unwrap();

    // Overflow is counted, not refused: deciding is the caller's job, and
    // every shard is in place and journaled.
    let [step, a] = &stats.shards[..] else {
        panic!("two records: {:?}", stats.shards)
    };
    assert_eq!(step.name, "unet/m-00001-of-00002.safetensors");
    assert!(step.losses.is_empty(), "a copied tensor has no loss counts");
    assert_eq!(a.name, "unet/m-00002-of-00002.safetensors");
    let [(name, loss)] = &a.losses[..] else {
        panic!("one cast tensor: {:?}", a.losses)
    };
    assert_eq!(
        (name.as_str(), loss.overflow, loss.elements),
        ("a", over, n as u64)
    );
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(loss.max_abs, max as f64);
    assert_eq!(
        losses(&stats),
        a.losses,
        "the run's losses are the shards', in order"
    );
    for (shard, record) in plan.shards.iter().zip(&stats.shards) {
        assert_eq!(fs::metadata(&shard.path).unwrap().len(), record.size);
    }
    assert_eq!(journal::read(&journal).unwrap(), stats.shards);
}

#[test]
fn a_plan_of_another_version_is_refused() {
    let dir = Scratch::new("version");
    let (src, _) = source(&dir.0, 10);
    let out = dir.0.join("out.safetensors");
    let mut plan = plan_for(&src, &out, 10, "F16");
    plan.version = 2;
    let expected = "inconsistent plan: plan version 2, this fastcast reads version 1";
    let err = execute(&plan, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(matches!(err, Error::Plan { .. }), "{err}");
    assert_eq!(err.to_string(), expected);
    let err = scan(&plan, &Progress::default()).unwrap_err();
    assert_eq!(err.to_string(), expected);
    let err = shard_digest(&plan, 0, 1000).unwrap_err();
    assert_eq!(err.to_string(), expected);
    assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1, "nothing written");
}

#[test]
fn journal_and_digest_describe_the_file_on_disk() {
    let dir = Scratch::new("digest");
    let (src, _) = source(&dir.0, 5000);
    let out = dir.0.join("out.safetensors");
    let plan = plan_for(&src, &out, 5000, "BF16");
    let journal = dir.0.join("journal.jsonl");
    let opts = ExecOptions {
        chunk_bytes: 1000,
        journal: Some(journal.clone()),
        ..ExecOptions::default()
    };
    let stats = execute(&plan, &opts, &Progress::default()).unwrap();
    let record = &stats.shards[0];
    assert_eq!(shard_digest(&plan, 0, 1000).unwrap(), record.digest);
    let line = fs::read_to_string(&journal).unwrap();
    assert!(
        line.contains(&format!("\"digest\":\"{:016x}\"", record.digest)),
        "{line}"
    );
    assert!(line.starts_with("{\"name\":\"out.safetensors\""), "{line}");
    assert_eq!(journal::read(&journal).unwrap(), stats.shards);

    // One changed byte changes the digest.
    let mut bytes = fs::read(&out).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&out, &bytes).unwrap();
    assert_ne!(shard_digest(&plan, 0, 1000).unwrap(), record.digest);
}

/// A chunk larger than a [`PIECE`] is hashed and written a piece at a time;
/// its digest is still the one `shard_digest` computes from the file, a
/// chunk in one go (a resumed run compares the two). Copies of a cached
/// input go through `pread` ([`copy_through`]), of a cold one through the
/// map: both paths are run.
#[test]
fn a_chunk_written_in_pieces_has_the_digest_of_its_bytes() {
    let dir = Scratch::new("pieces");
    let n = PIECE + PIECE / 2 + 3; // f32 elements: a copy spans 6 pieces and a bit
    let (src, values) = source(&dir.0, n);
    let copied: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (to, cold) in [("F32", false), ("F32", true), ("BF16", false)] {
        let out = dir.0.join(format!("out-{to}.safetensors"));
        let plan = plan_for(&src, &out, n as u64, to);
        for chunk_bytes in [DEFAULT_CHUNK_BYTES, 3 * PIECE + 5] {
            if cold {
                evict(&src);
            }
            let opts = ExecOptions {
                chunk_bytes,
                ..ExecOptions::default()
            };
            let stats = execute(&plan, &opts, &Progress::default()).unwrap();
            assert_eq!(
                shard_digest(&plan, 0, chunk_bytes).unwrap(),
                stats.shards[0].digest,
                "{to}, {chunk_bytes}-byte chunks, cold {cold}"
            );
            if to == "F32" {
                let bytes = fs::read(&out).unwrap();
                let header = Header::parse(&out, &bytes).unwrap();
                let data = &bytes[header.data_start() as usize..];
                assert!(data[8..] == copied[..], "{chunk_bytes}"); // after "step"
            }
        }
    }
}

/// Drop `path`'s pages from the page cache (where the OS lets us).
fn evict(path: &Path) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let file = fs::File::open(path).unwrap();
        // Written back first: dirty pages are not dropped.
        file.sync_all().unwrap();
        // SAFETY: advisory, on our own descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// The plan's sources: these files at their current sizes.
fn sources_of(paths: &[PathBuf]) -> Vec<SourceFile> {
    paths
        .iter()
        .map(|p| SourceFile {
            path: p.clone(),
            size: fs::metadata(p).unwrap().len(),
        })
        .collect()
}

/// A one-tensor safetensors file of raw `bytes`; returns the tensor's absolute offsets.
fn one_tensor(path: &Path, name: &str, dtype: DType, shape: Vec<u64>, bytes: &[u8]) -> (u64, u64) {
    let header = Header {
        metadata: None,
        tensors: vec![TensorInfo {
            name: name.into(),
            dtype,
            shape,
            data_offsets: (0, bytes.len() as u64),
        }],
        header_len: 0,
    };
    let mut file = header.to_bytes();
    let start = file.len() as u64;
    file.extend_from_slice(bytes);
    fs::write(path, &file).unwrap();
    (start, start + bytes.len() as u64)
}

#[test]
fn dequantizes_fp8_with_a_scale_in_another_file() {
    use crate::cast::scalar;
    use crate::values::dequant::{Dequant, Operand};

    let dir = Scratch::new("dequant");
    let (rows, cols) = (5u64, 7u64); // 2x3 blocks: a 3x3 grid with partial edges
    let q: Vec<u8> = (0..rows * cols)
        .map(|k| scalar::f32_to_e4m3((k as f32 - 17.0) * 9.0, Fp8Overflow::Saturate))
        .collect();
    let mut scales: Vec<f32> = (0..9).map(|i| 0.25 + i as f32).collect();
    scales[8] = 1000.0; // the last block: 160 * 1000 overflows fp16
    let weight = dir.0.join("w.safetensors");
    let scale = dir.0.join("s.safetensors");
    let w_at = one_tensor(&weight, "l.weight", DType::F8E4M3, vec![rows, cols], &q);
    let s_bytes: Vec<u8> = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
    let s_at = one_tensor(
        &scale,
        "l.weight_scale_inv",
        DType::F32,
        vec![3, 3],
        &s_bytes,
    );
    let out = dir.0.join("out.safetensors");
    let plan = Plan {
        version: PLAN_VERSION,
        sources: sources_of(&[weight.clone(), scale.clone()]),
        shards: vec![ShardPlan {
            name: "out.safetensors".into(),
            path: out.clone(),
            metadata: None,
            tensors: vec![TensorPlan {
                name: "l.weight".into(),
                shape: vec![rows, cols],
                source: 0,
                src_dtype: DType::F8E4M3,
                dst_dtype: DType::F16,
                src_offsets: w_at,
                dst_offsets: (0, 2 * rows * cols),
                value: Value::Dequant(Box::new(Dequant::Fp8Scaled {
                    scale: Operand {
                        name: "l.weight_scale_inv".into(),
                        source: 1,
                        dtype: "F32".into(),
                        shape: vec![3, 3],
                        offsets: s_at,
                    },
                    block: (2, 3),
                })),
            }],
        }],
    };
    let opts = ExecOptions {
        chunk_bytes: 12, // three f32 values a chunk: rows and blocks split everywhere
        ..ExecOptions::default()
    };
    let stats = execute(&plan, &opts, &Progress::default()).unwrap();
    let bytes = fs::read(&out).unwrap();
    let header = Header::parse(&out, &bytes).unwrap();
    let data = &bytes[header.data_start() as usize..];
    let mut overflowed = 0;
    for k in 0..(rows * cols) as usize {
        let (i, j) = (k as u64 / cols, k as u64 % cols);
        let value = scalar::e4m3_to_f32(q[k]) * scales[((i / 2) * 3 + j / 3) as usize];
        let want = scalar::f32_to_f16(value);
        assert_eq!(
            u16::from_le_bytes([data[2 * k], data[2 * k + 1]]),
            want,
            "element {k}"
        );
        overflowed += u64::from(value.is_finite() && value.abs() >= 65520.0);
    }
    assert!(overflowed > 0);
    assert_eq!(losses(&stats).len(), 1);
    assert_eq!(losses(&stats)[0].1.overflow, overflowed);
    assert_eq!(losses(&stats)[0].1.elements, rows * cols);

    // A scale grid that does not fit the weight is refused before anything is written.
    let mut bad = plan.clone();
    if let Value::Dequant(d) = &mut bad.shards[0].tensors[0].value {
        let Dequant::Fp8Scaled { block, .. } = &mut **d else {
            unreachable!()
        };
        *block = (3, 3);
    }
    fs::remove_file(&out).unwrap();
    let err = execute(&bad, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("needs 2x3"), "{err}");
    assert!(!out.exists());
}

#[test]
fn dequantizes_gptq_and_bnb_under_their_output_names_in_any_chunking() {
    use crate::cast::scalar;
    use crate::values::dequant::{Dequant, Dequantizer, Operand};

    let dir = Scratch::new("dequant-int");
    let mut files = Vec::new();
    let mut put = |name: &str, dtype: DType, shape: Vec<u64>, bytes: Vec<u8>| {
        let path = dir.0.join(format!("{}.safetensors", files.len()));
        let at = one_tensor(&path, name, dtype, shape.clone(), &bytes);
        files.push(path);
        let op = Operand {
            name: name.into(),
            source: files.len() - 1,
            dtype: dtype.safetensors_name().into(),
            shape,
            offsets: at,
        };
        (op, bytes)
    };
    let words = |v: Vec<u32>| v.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>();
    // GPTQ 4-bit, 16 outputs x 16 inputs in two groups of 8, permuted.
    let (qweight, qweight_bytes) = put(
        "l.qweight",
        DType::I32,
        vec![2, 16],
        words((0..32u32).map(|k| k.wrapping_mul(0x9E37_79B9)).collect()),
    );
    let (qzeros, _) = put(
        "l.qzeros",
        DType::I32,
        vec![2, 2],
        words(vec![0x7777_7777, 0x1234_5678, 0x89AB_CDEF, 0x7777_7777]),
    );
    let scales: Vec<u8> = (0..32)
        .flat_map(|k| scalar::f32_to_f16(0.001 * (k + 1) as f32).to_le_bytes())
        .collect();
    let (scales, _) = put("l.scales", DType::F16, vec![2, 16], scales);
    let g: Vec<u32> = (0..16u32).map(|i| (i * 5 % 16) / 8).collect();
    let (g_idx, _) = put("l.g_idx", DType::I32, vec![16], words(g));
    // bnb 4-bit, 45 values (odd) in blocks of 8 with F32 absmax.
    let (packed, packed_bytes) = put(
        "b.weight",
        DType::U8,
        vec![23, 1],
        (0..23u8).map(|k| k.wrapping_mul(37)).collect(),
    );
    let absmax: Vec<u8> = (0..6)
        .flat_map(|b| (1.5f32 + b as f32).to_le_bytes())
        .collect();
    let (absmax, _) = put("b.weight.absmax", DType::F32, vec![6], absmax);
    let code: Vec<u8> = (0..16)
        .flat_map(|c| (c as f32 / 7.5 - 1.0).to_le_bytes())
        .collect();
    let (quant_map, _) = put("b.weight.quant_map", DType::F32, vec![16], code);

    let gptq = Dequant::Gptq {
        qzeros,
        scales,
        g_idx: Some(g_idx),
        group_size: 8,
        bits: 4,
        zero_plus_one: true,
    };
    let bnb = Dequant::Bnb4 {
        absmax,
        quant_map,
        blocksize: 8,
        nested: None,
    };
    let out = dir.0.join("out.safetensors");
    let tensor = |name: &str, shape: Vec<u64>, src: &Operand, at: u64, how: &Dequant| {
        let n: u64 = shape.iter().product();
        TensorPlan {
            name: name.into(),
            shape,
            source: src.source,
            src_dtype: src.dtype.parse().unwrap(),
            dst_dtype: DType::BF16,
            src_offsets: src.offsets,
            dst_offsets: (at, at + 2 * n),
            value: Value::Dequant(Box::new(how.clone())),
        }
    };
    let plan = Plan {
        version: PLAN_VERSION,
        sources: sources_of(&files),
        shards: vec![ShardPlan {
            name: "out.safetensors".into(),
            path: out.clone(),
            metadata: None,
            tensors: vec![
                tensor("l.weight", vec![16, 16], &qweight, 0, &gptq),
                tensor("b.weight", vec![5, 9], &packed, 512, &bnb),
            ],
        }],
    };
    // What each tensor must hold: its whole dequantization, rounded once.
    let expected = |how: &Dequant, from: DType, shape: &[u64], src: &[u8]| -> Vec<u8> {
        let maps: Vec<Vec<u8>> = files.iter().map(|p| fs::read(p).unwrap()).collect();
        let operand = |op: &Operand| -> Result<&[u8], String> {
            Ok(&maps[op.source][op.offsets.0 as usize..op.offsets.1 as usize])
        };
        let d = Dequantizer::new(how, from, shape, src.len(), &operand).unwrap();
        let n: u64 = shape.iter().product();
        let mut values = vec![0u8; 4 * n as usize];
        d.dequantize(src, 0, &mut values);
        values
            .chunks_exact(4)
            .flat_map(|b| {
                scalar::f32_to_bf16(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()
            })
            .collect()
    };
    let want_l = expected(&gptq, DType::I32, &[16, 16], &qweight_bytes);
    let want_b = expected(&bnb, DType::U8, &[5, 9], &packed_bytes);

    for chunk_bytes in [8usize, 60, 1 << 20] {
        let progress = Progress::default();
        let opts = ExecOptions {
            chunk_bytes, // 8: one GPTQ row and two bnb values a chunk
            ..ExecOptions::default()
        };
        let stats = execute(&plan, &opts, &progress).unwrap();
        let bytes = fs::read(&out).unwrap();
        let header = Header::parse(&out, &bytes).unwrap();
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l.weight", "b.weight"]);
        assert_eq!(header.tensors[0].shape, [16, 16]);
        let data = &bytes[header.data_start() as usize..];
        assert_eq!(&data[..512], &want_l[..], "chunk {chunk_bytes}");
        assert_eq!(&data[512..], &want_b[..], "chunk {chunk_bytes}");
        let elements: Vec<(&str, u64)> = stats
            .losses()
            .map(|(n, l)| (n.as_str(), l.elements))
            .collect();
        assert_eq!(elements, [("l.weight", 256), ("b.weight", 45)]);
        // Progress counts each source once, however many chunks read it whole.
        assert_eq!(
            progress.bytes_done.load(Ordering::Relaxed),
            (qweight_bytes.len() + packed_bytes.len()) as u64
        );
        assert_eq!(
            shard_digest(&plan, 0, chunk_bytes).unwrap(),
            stats.shards[0].digest
        );
        assert_eq!(scan(&plan, &Progress::default()).unwrap(), losses(&stats));
    }

    // A GPTQ operand of the wrong shape is refused before anything is written.
    let mut bad = plan.clone();
    if let Value::Dequant(d) = &mut bad.shards[0].tensors[0].value {
        let Dequant::Gptq { scales, .. } = &mut **d else {
            unreachable!()
        };
        scales.shape = vec![1, 32];
    }
    fs::remove_file(&out).unwrap();
    let err = execute(&bad, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(
        err.to_string().contains("tensor \"l.weight\"") && err.to_string().contains("l.scales"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn quantizes_weights_and_their_scales_in_any_chunking_scales_after_weights() {
    use crate::cast::scalar;
    use crate::values::quantize::fp8::Fp8Blocks;
    use crate::values::quantize::Quantize;

    let dir = Scratch::new("quantize");
    // A 6 x 8 bf16 weight in 4 x 3 blocks (a 2 x 3 grid, edges cut), and a
    // 3 x 5 f16 weight per row; one file each.
    let wide: Vec<u8> = (0..48)
        .flat_map(|k| {
            scalar::f32_to_bf16((k as f32 * 0.7).sin() * (1 + k % 5) as f32).to_le_bytes()
        })
        .collect();
    let rows: Vec<u8> = (0..15)
        .flat_map(|k| scalar::f32_to_f16((k as f32 - 7.0) / 64.0).to_le_bytes())
        .collect();
    let (a, b) = (dir.0.join("a.safetensors"), dir.0.join("b.safetensors"));
    let a_at = one_tensor(&a, "w.weight", DType::BF16, vec![6, 8], &wide);
    let b_at = one_tensor(&b, "r.weight", DType::F16, vec![3, 5], &rows);
    let out = dir.0.join("out.safetensors");
    let tensor = |name: &str,
                  shape: Vec<u64>,
                  src: (usize, &str, (u64, u64)),
                  to: &str,
                  at: u64,
                  how: Quantize| {
        let n: u64 = shape.iter().product();
        let size = to.parse::<DType>().unwrap().size() as u64;
        TensorPlan {
            name: name.into(),
            shape,
            source: src.0,
            src_dtype: src.1.parse().unwrap(),
            dst_dtype: to.parse().unwrap(),
            src_offsets: src.2,
            dst_offsets: (at, at + size * n),
            value: Value::Quantize(Box::new(how), None),
        }
    };
    let scale = |weight: &str, shape: &[u64], block| Quantize::Fp8Scale {
        block,
        weight: weight.into(),
        weight_shape: shape.to_vec(),
    };
    // Data order as the planner lays it out: scales (F32) first.
    let plan = Plan {
        version: PLAN_VERSION,
        sources: sources_of(&[a.clone(), b.clone()]),
        shards: vec![ShardPlan {
            name: "out.safetensors".into(),
            path: out.clone(),
            metadata: None,
            tensors: vec![
                tensor(
                    "w.weight_scale_inv",
                    vec![2, 3],
                    (0, "BF16", a_at),
                    "F32",
                    0,
                    scale("w.weight", &[6, 8], (4, 3)),
                ),
                tensor(
                    "r.weight_scale",
                    vec![3, 1],
                    (1, "F16", b_at),
                    "F32",
                    24,
                    scale("r.weight", &[3, 5], (1, 5)),
                ),
                tensor(
                    "w.weight",
                    vec![6, 8],
                    (0, "BF16", a_at),
                    "F8_E4M3",
                    36,
                    Quantize::Fp8Weight { block: (4, 3) },
                ),
                tensor(
                    "r.weight",
                    vec![3, 5],
                    (1, "F16", b_at),
                    "F8_E4M3",
                    84,
                    Quantize::Fp8Weight { block: (1, 5) },
                ),
            ],
        }],
    };
    // Each weight's scales run right after it.
    let maps = map_sources(&plan.sources).unwrap();
    let Checked { jobs, .. } = check_shard(&plan.shards[0], &plan, &maps).unwrap();
    assert_eq!(run_order(&jobs), [2, 0, 3, 1]);
    let order: Vec<usize> = chunks_of(&jobs, 1).iter().map(|c| c.job).collect();
    assert_eq!(
        order,
        [2, 2, 0, 0, 3, 3, 3, 1, 1, 1],
        "one block-row a chunk at least"
    );

    // What each tensor holds: the whole weight quantized at once.
    let whole = |from: DType, shape: &[u64], block, src: &[u8]| {
        let q = Fp8Blocks::new(from, shape, block).unwrap();
        let n: u64 = shape.iter().product();
        let mut values = Vec::new();
        let mut bytes = vec![0u8; n as usize];
        let mut s = vec![0f32; q.grid().iter().product::<u64>() as usize];
        let loss = q.quantize(
            src,
            &mut values,
            &mut bytes,
            &mut s,
            &CastOptions::default(),
        );
        let s: Vec<u8> = s.iter().flat_map(|x| x.to_le_bytes()).collect();
        (bytes, s, loss)
    };
    let (wq, ws, wl) = whole(DType::BF16, &[6, 8], (4, 3), &wide);
    let (rq, rs, rl) = whole(DType::F16, &[3, 5], (1, 5), &rows);
    for chunk_bytes in [1usize, 64, 1 << 20] {
        let progress = Progress::default();
        let opts = ExecOptions {
            chunk_bytes,
            ..ExecOptions::default()
        };
        let stats = execute(&plan, &opts, &progress).unwrap();
        let bytes = fs::read(&out).unwrap();
        let header = Header::parse(&out, &bytes).unwrap();
        let data = &bytes[header.data_start() as usize..];
        assert_eq!(&data[..24], &ws[..], "chunk {chunk_bytes}");
        assert_eq!(&data[24..36], &rs[..]);
        assert_eq!(&data[36..84], &wq[..]);
        assert_eq!(&data[84..], &rq[..]);
        // Loss for the weights only; the weights' bytes are read once.
        assert_eq!(
            losses(&stats),
            [("w.weight".to_string(), wl), ("r.weight".to_string(), rl)]
        );
        let read = (wide.len() + rows.len()) as u64;
        assert_eq!(stats.bytes_read, read);
        assert_eq!(progress.bytes_done.load(Ordering::Relaxed), read);
        assert_eq!(
            shard_digest(&plan, 0, chunk_bytes).unwrap(),
            stats.shards[0].digest
        );
        assert_eq!(scan(&plan, &Progress::default()).unwrap(), losses(&stats));
    }

    // Scales whose grid does not fit the weight are refused before writing.
    let mut bad = plan.clone();
    bad.shards[0].tensors[0].shape = vec![3, 2];
    bad.shards[0].tensors[0].dst_offsets = (0, 24);
    fs::remove_file(&out).unwrap();
    let err = execute(&bad, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("needs [2, 3]"), "{err}");
    let mut bad = plan.clone();
    bad.shards[0].tensors[2].dst_dtype = DType::BF16;
    bad.shards[0].tensors[2].dst_offsets = (36, 132);
    let err = execute(&bad, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("they are F8_E4M3"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_failed_commit_stops_the_workers_and_is_the_error() {
    let dir = Scratch::new("commit-fails");
    // 16 MiB of f32 per shard, 256 chunks of 64 KiB: casting a shard takes far
    // longer than the committer thread needs to be scheduled, even on a busy machine.
    let n = 1 << 22;
    let (src, _) = source(&dir.0, n);
    let mut plan = plan_for(&src, &dir.0.join("unused"), n as u64, "F16");
    let one = plan.shards[0].clone();
    plan.shards = (0..8)
        .map(|i| {
            let mut shard = one.clone();
            shard.name = format!("m-{i}.safetensors");
            shard.path = dir.0.join(&shard.name);
            shard
        })
        .collect();
    // The first shard cannot be renamed into place: a folder holds its name.
    let blocked = &plan.shards[0].path;
    fs::create_dir_all(blocked.join("in-the-way")).unwrap();
    let opts = ExecOptions {
        chunk_bytes: 64 << 10,
        fsync: false,
        ..ExecOptions::default()
    };
    let progress = Progress::default();
    let err = execute(&plan, &opts, &progress).unwrap_err();
    assert!(
        err.to_string().contains(&*blocked.to_string_lossy()),
        "the failed commit is the error: {err}"
    );
    let shard_bytes = 4 * n as u64 + 8;
    let done = progress.bytes_done.load(Ordering::Relaxed);
    assert!(
        done <= 4 * shard_bytes,
        "the workers went on after the failed commit: {done} bytes of {}",
        8 * shard_bytes
    );
    for shard in &plan.shards[1..] {
        assert!(!shard.path.exists(), "{} put in place", shard.name);
    }
    let left: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "only the input and the folder: {left:?}");
}

/// Many tiny f32 tensors, end to end in the input; `step` (i64) in the middle.
/// Returns the plan (all to F16, `step` copied) and each tensor's values.
fn tiny_tensors(dir: &Path, count: usize, per: usize) -> (Plan, Vec<Vec<f32>>) {
    let mut tensors = Vec::new();
    let mut values = Vec::new();
    let mut at = 0u64;
    for i in 0..count {
        // Tensor i holds i values beyond f16's range (overflow counts differ).
        let v: Vec<f32> = (0..per)
            .map(|k| {
                if k < i % per {
                    1e6
                } else {
                    (k as f32 * 0.1 + i as f32).sin()
                }
            })
            .collect();
        let len = 4 * per as u64;
        tensors.push(TensorInfo {
            name: format!("t{i}"),
            dtype: DType::F32,
            shape: vec![per as u64],
            data_offsets: (at, at + len),
        });
        at += len;
        values.push(v);
        if i == count / 2 {
            tensors.push(TensorInfo {
                name: "step".into(),
                dtype: DType::I64,
                shape: vec![],
                data_offsets: (at, at + 8),
            });
            at += 8;
        }
    }
    let header = Header {
        metadata: None,
        tensors,
        header_len: 0,
    };
    let mut bytes = header.to_bytes();
    let start = bytes.len() as u64;
    for (i, v) in values.iter().enumerate() {
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        if i == count / 2 {
            bytes.extend(7i64.to_le_bytes());
        }
    }
    let src = dir.join("tiny.safetensors");
    fs::write(&src, &bytes).unwrap();
    let mut plans = Vec::new();
    let mut dst = 0u64;
    for t in &header.tensors {
        let (dtype, out) = if t.dtype == DType::I64 {
            ("I64", 8)
        } else {
            ("F16", 2 * per as u64)
        };
        plans.push(TensorPlan {
            name: t.name.clone(),
            shape: t.shape.clone(),
            source: 0,
            src_dtype: t.dtype,
            dst_dtype: dtype.parse().unwrap(),
            src_offsets: (start + t.data_offsets.0, start + t.data_offsets.1),
            dst_offsets: (dst, dst + out),
            value: Value::Cast,
        });
        dst += out;
    }
    let plan = Plan {
        version: PLAN_VERSION,
        sources: sources_of(&[src]),
        shards: vec![ShardPlan {
            name: "out.safetensors".into(),
            path: dir.join("out.safetensors"),
            metadata: None,
            tensors: plans,
        }],
    };
    (plan, values)
}

#[test]
fn tiny_tensors_run_in_shared_chunks_with_their_own_losses() {
    let dir = Scratch::new("tiny");
    let (plan, values) = tiny_tensors(&dir.0, 301, 7);
    let maps = map_sources(&plan.sources).unwrap();
    let Checked { jobs, .. } = check_shard(&plan.shards[0], &plan, &maps).unwrap();
    // 28-byte tensors in 1 KiB chunks: about 36 to a chunk, split where the
    // i64 `step` (another dtype pair) sits.
    let chunks = chunks_of(&jobs, 1024);
    assert!(chunks.len() < 20, "{} chunks for 302 tensors", chunks.len());
    let step = jobs.iter().position(|j| j.plan.name == "step").unwrap();
    assert!(chunks.iter().any(|c| c.job == step && c.last == step));
    let covered: usize = chunks.iter().map(|c| c.last + 1 - c.job).sum();
    assert_eq!(covered, jobs.len(), "every tensor in exactly one chunk");

    for chunk_bytes in [1024, 1 << 20, 28] {
        let opts = ExecOptions {
            chunk_bytes,
            ..ExecOptions::default()
        };
        let out = &plan.shards[0].path;
        let stats = execute(&plan, &opts, &Progress::default()).unwrap();
        // Each tensor's own loss: tensor i has i % 7 values beyond f16.
        assert_eq!(losses(&stats).len(), 301);
        for (name, loss) in stats.losses() {
            let i: usize = name[1..].parse().unwrap();
            assert_eq!(
                (loss.elements, loss.overflow),
                (7, (i % 7) as u64),
                "{name}"
            );
        }
        // The bytes are each tensor cast on its own.
        let bytes = fs::read(out).unwrap();
        let header = Header::parse(out, &bytes).unwrap();
        let data = &bytes[header.data_start() as usize..];
        for (t, v) in header
            .tensors
            .iter()
            .filter(|t| t.name != "step")
            .zip(&values)
        {
            let src: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut want = vec![0u8; src.len() / 2];
            cast::cast(&src, DType::F32, &mut want, DType::F16, &opts.cast).unwrap();
            let (a, b) = t.data_offsets;
            assert_eq!(&data[a as usize..b as usize], &want[..], "{}", t.name);
        }
        let s = header.tensors.iter().find(|t| t.name == "step").unwrap();
        assert_eq!(
            &data[s.data_offsets.0 as usize..s.data_offsets.1 as usize],
            &7i64.to_le_bytes()
        );
        // The digest a resume recomputes is the one the run recorded.
        assert_eq!(
            shard_digest(&plan, 0, chunk_bytes).unwrap(),
            stats.shards[0].digest
        );
    }
}

#[test]
fn a_chunk_cast_in_cache_blocks_counts_and_casts_every_block() {
    let dir = Scratch::new("cast-blocks");
    let per_block = crate::values::cast::CAST_BLOCK / 4;
    let n = 2 * per_block + per_block / 2 + 7; // two whole blocks and a partial one
    let (src, _) = source(&dir.0, n);
    // Overflow (> 464 in e4m3) and underflow (below e4m3's smallest subnormal)
    // on both sides of every block edge and in the last, partial block.
    let mut bytes = fs::read(&src).unwrap();
    let data = Header::read(&src).unwrap().data_start() as usize;
    let mut set =
        |i: usize, v: f32| bytes[data + 4 * i..data + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    for edge in [per_block, 2 * per_block] {
        set(edge - 1, 1e4);
        set(edge, -3e-5);
        set(edge + 1, f32::NAN);
    }
    set(n - 1, -2e4);
    fs::write(&src, &bytes).unwrap();
    let values = &bytes[data..data + 4 * n];

    let out = dir.0.join("out.safetensors");
    let plan = plan_for(&src, &out, n as u64, "F8_E4M3");
    let opts = ExecOptions {
        chunk_bytes: 4 * n, // one chunk: the blocks are all inside it
        ..ExecOptions::default()
    };
    let stats = execute(&plan, &opts, &Progress::default()).unwrap();

    let expected = LossRule::new(DType::F32, DType::F8E4M3).scan(values);
    assert!(expected.overflow >= 3 && expected.underflow >= 2 && expected.nan_in == 2);
    assert_eq!(losses(&stats), vec![("a".to_string(), expected)]);
    let mut cast_whole = vec![0u8; n];
    cast::cast(
        values,
        DType::F32,
        &mut cast_whole,
        DType::F8E4M3,
        &CastOptions::default(),
    )
    .unwrap();
    let written = fs::read(&out).unwrap();
    let start = Header::read(&out).unwrap().data_start() as usize + 8; // after `step`
    assert_eq!(&written[start..start + n], &cast_whole[..]);
}

/// A shard whose header would pass what safetensors readers accept is refused
/// before anything is written, even when its tensor data is tiny; the length
/// the planner measures is the length the executor would have written.
#[test]
fn a_header_past_the_limit_is_refused_and_measured_exactly() {
    let dir = Scratch::new("huge-header");
    let (src, _) = source(&dir.0, 4);
    let out = dir.0.join("out.safetensors");
    let mut plan = plan_for(&src, &out, 4, "BF16");
    let small = header_lens(&plan)[0];
    let maps = map_sources(&plan.sources).unwrap();
    let checked = check_shard(&plan.shards[0], &plan, &maps).unwrap();
    assert_eq!(small, checked.header_len_written());
    drop(checked);
    plan.shards[0].tensors[1].name = "a".repeat(MAX_HEADER_LEN as usize);
    assert!(header_lens(&plan)[0] > MAX_HEADER_LEN);
    let err = execute(&plan, &ExecOptions::default(), &Progress::default()).unwrap_err();
    assert!(matches!(err, Error::HeaderTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("out.safetensors"), "{err}");
    assert!(!out.exists() && fs::read_dir(&dir.0).unwrap().count() == 1);
}
