//! A bounded mutation fuzzer of the zip and pickle stages, run with the unit
//! tests (so in CI): valid torch-like files are mutated (bit flips,
//! truncation, inserted bytes, length fields set to huge or zero values,
//! spliced opcodes) for a fixed number of seeded iterations. Every outcome
//! must be a value or a clean refusal, never a panic, within a time bound;
//! and whatever is accepted must point inside the file.
//!
//! `FASTCAST_TORCH_FUZZ_ITERS` (default 3000 a stage) and
//! `FASTCAST_FUZZ_SEED` change the run; a failing input is written to
//! `target/fuzz-failures/`.

use std::path::Path;
use std::time::{Duration, Instant};

use super::build::{torch_file, Pickle};
use super::*;

/// splitmix64: small, seeded, no dependency.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A pickle and its storages (key, bytes).
type Base = (Vec<u8>, Vec<(&'static str, Vec<u8>)>);

/// The pickles the mutations start from: plain, views, v3, nested, opaque.
fn base_pickles() -> Vec<Base> {
    let plain = Pickle::new()
        .ordered_dict()
        .mark()
        .str("a")
        .tensor_v2("FloatStorage", "0", 8, 0, &[2, 4], &[4, 1])
        .put(40)
        .str("tied")
        .get(40)
        .str("t")
        .tensor_v2("FloatStorage", "0", 8, 1, &[3, 2], &[1, 3])
        .str("f8")
        .tensor_v3("float8_e5m2", "1", 6, &[2, 3], &[3, 1])
        .op(b'u')
        .stop();
    let nested = Pickle::new()
        .op(b'}')
        .mark()
        .str("state_dict")
        .op(b'}')
        .str("w")
        .tensor_v2("LongStorage", "0", 1, 0, &[], &[])
        .op(b's')
        .str("epoch")
        .int(3)
        .str("args")
        .namespace()
        .op(b'u')
        .stop();
    vec![
        (plain, vec![("0", vec![1; 32]), ("1", vec![2; 6])]),
        (nested, vec![("0", vec![3; 8])]),
    ]
}

fn file_of(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = storages.iter().map(|(k, d)| (*k, d.as_slice())).collect();
    torch_file(pickle, &refs)
}

fn mutate(rng: &mut Seeded, mut bytes: Vec<u8>, opcodes: bool) -> Vec<u8> {
    for _ in 0..1 + rng.below(3) {
        let len = bytes.len();
        if len == 0 {
            break;
        }
        match rng.below(8) {
            0 => bytes[rng.below(len)] ^= 1 << rng.below(8),
            1 => bytes.truncate(rng.below(len)),
            2 => {
                let at = rng.below(len + 1);
                let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, extra);
            }
            3 | 4 => {
                // A length, count or offset field set to an extreme.
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = rng.below(len.saturating_sub(width) + 1);
                let value = match rng.below(4) {
                    0 => u64::MAX,
                    1 => 0,
                    2 => u64::from(u32::MAX),
                    _ => rng.next(),
                };
                let end = (at + width).min(len);
                bytes[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
            }
            5 if opcodes => {
                // Splice an opcode, with a small argument, anywhere.
                const OPS: &[u8] =
                    b"().NKMJXhqjRbQtsuae}]01\x80\x81\x85\x86\x87\x88\x89\x8a\x8c\x93\x94\x95";
                let at = rng.below(len + 1);
                let op = [OPS[rng.below(OPS.len())], rng.next() as u8];
                bytes.splice(at..at, op[..1 + rng.below(2)].iter().copied());
            }
            _ => {
                // Copy a run over another place.
                let (a, b) = (rng.below(len), rng.below(len));
                let n = rng.below(32).min(len - a).min(len - b);
                let run = bytes[a..a + n].to_vec();
                bytes[b..b + n].copy_from_slice(&run);
            }
        }
    }
    bytes
}

/// What an accepted file must satisfy.
fn consistent(file: &TorchFile, len: u64) -> bool {
    file.entries.iter().all(|e| match &e.leaf {
        Leaf::Other(_) => true,
        Leaf::Tensor(t) => {
            let (begin, end) = t.offsets;
            let numel: u64 = t.shape.iter().product();
            begin <= end
                && end <= len
                && (!t.contiguous || end - begin == numel * t.dtype.size() as u64)
        }
    })
}

fn fuzz(stage: &str, opcodes: bool, make: impl Fn(&mut Seeded) -> Vec<u8>) {
    let iterations: u64 = std::env::var("FASTCAST_TORCH_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let seed: u64 = std::env::var("FASTCAST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x70C4_F00D);
    let mut rng = Seeded(seed);
    let (mut accepted, mut slowest) = (0, Duration::ZERO);
    for i in 0..iterations {
        let input = make(&mut rng);
        let input = if opcodes {
            input
        } else {
            mutate(&mut rng, input, false)
        };
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(|| TorchFile::parse(Path::new("fuzz"), &input));
        let took = start.elapsed();
        slowest = slowest.max(took);
        let ok = match &outcome {
            Err(_) => false,
            Ok(Err(Error::Checkpoint { problem, .. })) => !problem.contains('\n'),
            Ok(Err(_)) => false,
            Ok(Ok(file)) => {
                accepted += 1;
                consistent(file, input.len() as u64)
            }
        };
        if !ok || took > Duration::from_secs(2) {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("torch-{stage}-{seed:x}-{i}.bin"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{stage} input {i} misbehaved ({took:?}): {outcome:?}; saved to {}",
                path.display()
            );
        }
    }
    eprintln!("{stage}: {iterations} inputs, {accepted} accepted, slowest {slowest:?}");
}

#[test]
fn fuzz_the_zip_container() {
    let bases: Vec<Vec<u8>> = base_pickles().iter().map(|(p, s)| file_of(p, s)).collect();
    fuzz("zip", false, |rng| bases[rng.below(bases.len())].clone());
}

#[test]
fn fuzz_the_pickle() {
    let bases = base_pickles();
    fuzz("pickle", true, |rng| {
        let (pickle, storages) = &bases[rng.below(bases.len())];
        let pickle = mutate(rng, pickle.clone(), true);
        file_of(&pickle, storages)
    });
}
