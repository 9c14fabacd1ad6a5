//! Header fuzzing that runs in CI for a bounded time.
//!
//! 1. Every file in `tests/corpus/` (hand-made hostile headers, plus any input
//!    a fuzz run ever found to misbehave) must be rejected without a panic.
//! 2. A mutation fuzzer derives inputs from valid files (byte flips, digit
//!    edits, truncation, splicing, length-prefix lies) for
//!    `FASTCAST_FUZZ_SECONDS` seconds (default 5) and checks that the parser
//!    never panics and that whatever it accepts is self-consistent. A failing
//!    input is written to `target/fuzz-failures/` to be added to the corpus.
//!
//! (cargo-fuzz needs a nightly toolchain; this runs on stable everywhere.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fastcast_core::format::header::{Header, TensorInfo};
use fastcast_core::DType;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

#[test]
fn corpus_is_rejected_cleanly() {
    let mut seen = 0;
    for entry in std::fs::read_dir(corpus()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| Header::parse(&path, &bytes));
        let parsed = result.unwrap_or_else(|_| panic!("{} panicked", path.display()));
        let err = parsed.expect_err(&format!("{} was accepted", path.display()));
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        // Reading from disk must agree with parsing from memory.
        assert_eq!(
            Header::read(&path).unwrap_err().to_string(),
            err.to_string()
        );
        seen += 1;
    }
    assert!(seen >= 20, "the corpus went missing ({seen} files)");
}

/// A small deterministic generator (no dependency, reproducible from the seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn valid_file(rng: &mut Rng) -> Vec<u8> {
    let dtypes = [
        DType::F32,
        DType::BF16,
        DType::U8,
        DType::I64,
        DType::F8E4M3,
        DType::F4,
    ];
    let mut offset = 0;
    let tensors = (0..1 + rng.below(6))
        .map(|i| {
            let dtype = dtypes[rng.below(dtypes.len())];
            let shape = vec![2 * (1 + rng.below(4)) as u64, 1 + rng.below(3) as u64];
            let n = shape.iter().product::<u64>() * dtype.bits() / 8;
            let t = TensorInfo {
                name: format!("model.layers.{i}.weight"),
                dtype,
                shape,
                data_offsets: (offset, offset + n),
            };
            offset += n;
            t
        })
        .collect();
    let header = Header {
        metadata: Some(vec![("format".into(), "pt".into())]),
        tensors,
        header_len: 0,
    };
    let mut bytes = header.to_bytes();
    bytes.extend((0..offset).map(|i| i as u8));
    bytes
}

fn mutate(rng: &mut Rng, mut bytes: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        match rng.below(7) {
            0 => {
                let i = rng.below(len);
                bytes[i] ^= 1 << rng.below(8);
            }
            1 => {
                // Edit a digit inside the JSON: shapes and offsets that lie.
                let digits: Vec<usize> = (8..len.min(4096))
                    .filter(|&i| bytes[i].is_ascii_digit())
                    .collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    bytes[i] = b"0123456789"[rng.below(10)];
                }
            }
            2 => bytes.truncate(rng.below(len + 1)),
            3 => {
                let extra = rng.below(64);
                bytes.extend((0..extra).map(|_| rng.next() as u8));
            }
            4 if len >= 8 => {
                // Lie in the length prefix.
                let lie = match rng.below(3) {
                    0 => rng.next(),
                    1 => u64::from_le_bytes(bytes[..8].try_into().unwrap()) + rng.below(16) as u64,
                    _ => rng.below(len) as u64,
                };
                bytes[..8].copy_from_slice(&lie.to_le_bytes());
            }
            5 => {
                // Splice a JSON token somewhere in the header.
                let tokens: [&[u8]; 8] = [b"{", b"}", b"\"", b",", b":", b"[", b"-1", b"1e99"];
                let at = 8 + rng.below(len.saturating_sub(8).min(2048));
                let t = tokens[rng.below(tokens.len())];
                if at <= len {
                    bytes.splice(at..at, t.iter().copied());
                }
            }
            _ => {
                let (a, b) = (rng.below(len), rng.below(len));
                bytes.swap(a, b);
            }
        }
        if bytes.is_empty() {
            break;
        }
    }
    bytes
}

#[test]
fn mutation_fuzz_for_a_bounded_time() {
    let seconds: u64 = std::env::var("FASTCAST_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed = std::env::var("FASTCAST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_F00D_u64);
    let mut rng = Rng(seed | 1);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut accepted) = (0u64, 0u64);
    while Instant::now() < deadline {
        for _ in 0..256 {
            let base = valid_file(&mut rng);
            let input = mutate(&mut rng, base);
            let outcome = std::panic::catch_unwind(|| Header::parse(Path::new("fuzz"), &input));
            let ok = match &outcome {
                Err(_) => false,
                Ok(Err(_)) => true,
                Ok(Ok(h)) => {
                    accepted += 1;
                    // Accepted means: every tensor's bytes are inside the file
                    // and the tensors tile the data exactly.
                    h.data_start() + h.data_len() == input.len() as u64
                        && h.tensors.iter().all(|t| {
                            t.data_offsets.1 <= h.data_len()
                                && t.numel() * t.dtype.bits() == t.nbytes() * 8
                        })
                }
            };
            if !ok {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
                std::fs::create_dir_all(&dir).unwrap();
                let file = dir.join(format!("case-{seed:x}-{runs}.bin"));
                std::fs::write(&file, &input).unwrap();
                panic!(
                    "header parser misbehaved; input saved to {}",
                    file.display()
                );
            }
            runs += 1;
        }
    }
    eprintln!("fuzzed {runs} inputs in {seconds} s ({accepted} accepted)");
    assert!(runs > 1000);
}
