//! Header validation: each rejection on a hand-made file, then properties
//! over garbage and mutated files (never a panic, never a bogus accept).

use proptest::prelude::*;

use super::*;

/// A file from raw header JSON and a data buffer of `data_len` bytes.
fn file(json: &str, data_len: usize) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend(std::iter::repeat_n(0xAB, data_len));
    out
}

fn problem(bytes: &[u8]) -> HeaderProblem {
    match Header::parse(Path::new("m.safetensors"), bytes) {
        Err(Error::Header { problem, path }) => {
            assert_eq!(path, Path::new("m.safetensors"));
            problem
        }
        other => panic!("expected a header error, got {other:?}"),
    }
}

const GOOD: &str = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}"#;

#[test]
fn accepts_a_valid_file_and_keeps_header_order() {
    let h = Header::parse(Path::new("m"), &file(GOOD, 12)).unwrap();
    assert_eq!(h.metadata, Some(vec![("format".into(), "pt".into())]));
    let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["b", "a"]);
    assert_eq!(h.tensors[1].dtype, DType::BF16);
    assert_eq!(h.tensors[1].numel(), 2);
    assert_eq!(h.data_len(), 12);
    assert_eq!(h.data_start(), 8 + GOOD.len() as u64);
}

#[test]
fn round_trips_through_to_bytes() {
    let h = Header::parse(Path::new("m"), &file(GOOD, 12)).unwrap();
    let mut bytes = h.to_bytes();
    assert_eq!((bytes.len() - 8) % 8, 0, "data must start 8-aligned");
    bytes.extend(std::iter::repeat_n(0, 12));
    let back = Header::parse(Path::new("m"), &bytes).unwrap();
    assert_eq!(back.tensors, h.tensors);
    assert_eq!(back.metadata, h.metadata);
}

#[test]
fn names_with_quotes_and_unicode_survive_serialization() {
    let h = Header {
        metadata: None,
        tensors: vec![TensorInfo {
            name: "we\"ird\\näme".into(),
            dtype: DType::U8,
            shape: vec![3],
            data_offsets: (0, 3),
        }],
        header_len: 0,
    };
    let mut bytes = h.to_bytes();
    bytes.extend([1, 2, 3]);
    assert_eq!(
        Header::parse(Path::new("m"), &bytes).unwrap().tensors,
        h.tensors
    );
}

#[test]
fn empty_and_scalar_tensors_are_fine() {
    let json = r#"{"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"e":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]}}"#;
    let h = Header::parse(Path::new("m"), &file(json, 8)).unwrap();
    assert_eq!(h.tensors[0].numel(), 1);
    assert_eq!(h.tensors[1].numel(), 0);
    assert_eq!(
        Header::parse(Path::new("m"), &file("{}", 0))
            .unwrap()
            .tensors,
        vec![]
    );
}

#[test]
fn rejects_short_files_and_huge_or_lying_lengths() {
    assert_eq!(problem(&[1, 2, 3]), HeaderProblem::TooShort { file_len: 3 });
    let mut huge = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    assert!(matches!(
        problem(&huge),
        HeaderProblem::HeaderTooLarge { .. }
    ));
    let mut past = 1000u64.to_le_bytes().to_vec();
    past.extend_from_slice(b"{}");
    assert_eq!(
        problem(&past),
        HeaderProblem::HeaderPastEnd {
            len: 1000,
            file_len: 10
        }
    );
    let mut max = u64::MAX.to_le_bytes().to_vec();
    max.extend_from_slice(b"{}");
    assert!(matches!(
        problem(&max),
        HeaderProblem::HeaderTooLarge { .. }
    ));
}

#[test]
fn rejects_bad_text() {
    let mut f = file("{\"a\":1}", 0);
    f[10] = 0xFF;
    assert!(matches!(problem(&f), HeaderProblem::NotUtf8 { offset: 2 }));
    assert!(matches!(
        problem(&file("[1,2]", 0)),
        HeaderProblem::NotJson { .. }
    ));
    assert!(matches!(
        problem(&file(" {}", 0)),
        HeaderProblem::NotJson { .. }
    ));
    assert!(matches!(
        problem(&file("{\"a\":", 0)),
        HeaderProblem::NotJson { .. }
    ));
    assert!(matches!(
        problem(&file("{} x", 0)),
        HeaderProblem::NotJson { .. }
    ));
}

#[test]
fn rejects_bad_metadata() {
    let p = problem(&file(r#"{"__metadata__":{"a":1}}"#, 0));
    assert!(matches!(p, HeaderProblem::BadMetadata { .. }), "{p}");
    let p = problem(&file(r#"{"__metadata__":{"a":"x","a":"y"}}"#, 0));
    assert!(p.to_string().contains("listed twice"), "{p}");
    let h = Header::parse(Path::new("m"), &file(r#"{"__metadata__":null}"#, 0)).unwrap();
    assert_eq!(h.metadata, None);
}

#[test]
fn rejects_duplicate_tensors() {
    let json = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    assert_eq!(
        problem(&file(json, 2)),
        HeaderProblem::DuplicateTensor { tensor: "a".into() }
    );
}

#[test]
fn rejects_bad_entries() {
    for json in [
        r#"{"a":{"dtype":"U8","shape":[1]}}"#,
        r#"{"a":{"dtype":7,"shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
        r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
        r#"{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
        r#"{"a":[]}"#,
    ] {
        let p = problem(&file(json, 1));
        assert!(
            matches!(p, HeaderProblem::BadEntry { ref tensor, .. } if tensor == "a"),
            "{json}: {p}"
        );
    }
    let p = problem(&file(
        r#"{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    ));
    assert_eq!(
        p,
        HeaderProblem::UnknownDtype {
            tensor: "a".into(),
            dtype: "Q7".into()
        }
    );
}

#[test]
fn rejects_sizes_that_disagree() {
    let p = problem(&file(
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert!(
        matches!(p, HeaderProblem::SizeMismatch { expected: 12, .. }),
        "{p}"
    );
    assert!(
        p.to_string().contains("hold 8 bytes but F32 [3] needs 12"),
        "{p}"
    );
    let p = problem(&file(
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert!(matches!(p, HeaderProblem::ShapeOverflow { .. }), "{p}");
    let p = problem(&file(
        r#"{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert!(matches!(p, HeaderProblem::ShapeOverflow { .. }), "{p}");
    let p = problem(&file(
        r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
        2,
    ));
    assert!(p.to_string().contains("not a whole number of bytes"), "{p}");
    let p = problem(&file(
        r#"{"a":{"dtype":"U8","shape":[0],"data_offsets":[5,0]}}"#,
        5,
    ));
    assert!(matches!(p, HeaderProblem::OffsetsReversed { .. }), "{p}");
}

#[test]
fn rejects_offsets_that_do_not_tile() {
    let past = r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}}"#;
    assert_eq!(
        problem(&file(past, 4)),
        HeaderProblem::DataPastEnd {
            tensor: "a".into(),
            end: 8,
            data_len: 4
        }
    );
    let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
    assert!(matches!(
        problem(&file(overlap, 6)),
        HeaderProblem::Overlap { .. }
    ));
    let gap = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#;
    assert!(matches!(
        problem(&file(gap, 5)),
        HeaderProblem::Gap {
            begin: 3,
            expected: 2,
            ..
        }
    ));
    let late = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
    assert!(matches!(problem(&file(late, 4)), HeaderProblem::Gap { .. }));
    let trailing = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    assert_eq!(
        problem(&file(trailing, 5)),
        HeaderProblem::TrailingBytes { extra: 3 }
    );
}

#[test]
fn read_from_disk_checks_the_same_things() {
    let dir = std::env::temp_dir().join(format!("fastcast-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.safetensors");
    std::fs::write(&good, file(GOOD, 12)).unwrap();
    assert_eq!(Header::read(&good).unwrap().tensors.len(), 2);
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &file(GOOD, 12)[..GOOD.len() + 8 + 6]).unwrap();
    let err = Header::read(&truncated).unwrap_err().to_string();
    assert!(
        err.contains("truncated.safetensors") && err.contains("past the end of the data"),
        "{err}"
    );
    let missing = Header::read(&dir.join("nope.safetensors")).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Entries are checked in header order, each parsed on its own, so the first
/// entry at fault is the one named even when a later one is not well-formed;
/// a repeated name is told before any entry's problem.
#[test]
fn the_first_entry_at_fault_is_named_whatever_follows_it() {
    let json = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]},"b":{"dtype":7}}"#;
    assert!(matches!(
        problem(&file(json, 8)),
        HeaderProblem::SizeMismatch { tensor, .. } if tensor == "a"
    ));
    let json = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":7},"a":1}"#;
    assert!(matches!(
        problem(&file(json, 8)),
        HeaderProblem::DuplicateTensor { tensor } if tensor == "a"
    ));
}

fn arb_header() -> impl Strategy<Value = Header> {
    let dtypes = prop::sample::select(crate::dtype::ALL.to_vec());
    let tensor = (dtypes, prop::collection::vec(0u64..5, 0..4));
    prop::collection::vec(tensor, 0..8).prop_map(|specs| {
        let mut offset = 0;
        let tensors = specs
            .into_iter()
            .enumerate()
            .map(|(i, (dtype, mut shape))| {
                let numel: u64 = shape.iter().product();
                if !(numel * dtype.bits()).is_multiple_of(8) {
                    shape = vec![2 * numel.max(1) * 4];
                }
                let n = shape.iter().product::<u64>() * dtype.bits() / 8;
                let t = TensorInfo {
                    name: format!("layer.{i}.w"),
                    dtype,
                    shape,
                    data_offsets: (offset, offset + n),
                };
                offset += n;
                t
            })
            .collect();
        Header {
            metadata: Some(vec![("format".into(), "pt".into())]),
            tensors,
            header_len: 0,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Header::parse(Path::new("g"), &bytes);
    }

    #[test]
    fn garbage_after_a_plausible_length_never_panics(json in ".{0,200}", data in 0usize..64) {
        let _ = Header::parse(Path::new("g"), &file(&json, data));
    }

    #[test]
    fn valid_headers_round_trip(h in arb_header()) {
        let mut bytes = h.to_bytes();
        bytes.extend(std::iter::repeat_n(0u8, h.data_len() as usize));
        let back = Header::parse(Path::new("v"), &bytes).unwrap();
        prop_assert_eq!(back.tensors, h.tensors);
    }

    /// `Header::check` (a header built in memory) accepts exactly what reading
    /// its bytes back accepts, whatever one field of one tensor is spoiled to.
    #[test]
    fn check_agrees_with_reading_the_bytes_back(
        mut h in arb_header(),
        which in any::<prop::sample::Index>(),
        field in 0u8..6,
        value in 0u64..64,
    ) {
        let n = h.tensors.len();
        if n > 0 {
            let other = h.tensors[(which.index(n) + 1) % n].name.clone();
            let t = &mut h.tensors[which.index(n)];
            match field {
                0 => t.data_offsets.0 = value,
                1 => t.data_offsets.1 = value,
                2 => t.shape.push(value),
                3 => t.name = other, // a duplicate, unless n == 1
                4 => t.name = "__metadata__".into(),
                _ => h.metadata = Some(vec![("a".into(), "1".into()), ("a".into(), "2".into())]),
            }
        }
        let data_len = h.tensors.iter().map(|t| t.data_offsets.1).max().unwrap_or(0);
        let bytes = h.to_bytes();
        let read = Header::parse_json(Path::new("c"), &bytes[8..], data_len);
        prop_assert_eq!(h.check(Path::new("c"), data_len).is_ok(), read.is_ok(), "{:?}", read);
    }

    #[test]
    fn mutated_files_never_panic(h in arb_header(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = h.to_bytes();
        bytes.extend(std::iter::repeat_n(0u8, h.data_len() as usize));
        let i = at.index(bytes.len());
        bytes[i] = byte;
        if let Ok(parsed) = Header::parse(Path::new("m"), &bytes) {
            // Anything accepted must still describe bytes inside the file.
            let end = parsed.data_start() + parsed.data_len();
            prop_assert_eq!(end, bytes.len() as u64);
        }
    }
}
