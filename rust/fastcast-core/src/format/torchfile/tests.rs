//! The torch.save reader on hand-made files: what it reads, and each hostile
//! class of the reference's section 6 it refuses (numbers in comments).

mod build;
mod fuzz;

use std::path::Path;
use std::time::Instant;

use build::{dict_w, torch_file, torch_zip, zip, Pickle};

use super::*;

fn read(bytes: &[u8]) -> Result<TorchFile, String> {
    match TorchFile::parse(Path::new("m.bin"), bytes) {
        Ok(f) => Ok(f),
        Err(Error::Checkpoint { path, problem }) => {
            assert_eq!(path, Path::new("m.bin"));
            assert!(!problem.contains('\n'), "one line: {problem}");
            Err(problem)
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

/// The refusal of `bytes`, which must contain `needle`.
#[track_caller]
fn refused(bytes: &[u8], needle: &str) {
    match read(bytes) {
        Ok(f) => panic!("accepted, expected {needle:?}: {f:?}"),
        Err(problem) => assert!(problem.contains(needle), "{problem:?} lacks {needle:?}"),
    }
}

fn tensors(f: &TorchFile) -> Vec<(String, &TensorView)> {
    f.entries
        .iter()
        .filter_map(|e| match &e.leaf {
            Leaf::Tensor(t) => Some((e.path.join("."), t)),
            Leaf::Other(_) => None,
        })
        .collect()
}

fn others(f: &TorchFile) -> Vec<(String, &str)> {
    f.entries
        .iter()
        .filter_map(|e| match &e.leaf {
            Leaf::Other(o) => Some((e.path.join("."), o.as_str())),
            Leaf::Tensor(_) => None,
        })
        .collect()
}

const F32_32: [u8; 128] = [7; 128];

/// `{"w": tensor}` over one F32 storage "0" of 32 elements.
fn one_tensor(offset: i64, shape: &[i64], stride: &[i64]) -> Vec<u8> {
    torch_file(
        &dict_w(Pickle::default().tensor_v2("FloatStorage", "0", 32, offset, shape, stride)),
        &[("0", &F32_32)],
    )
}

/// `{"w": <value>}` in a torch file with storage "0" of 32 F32.
fn with_value(value: Pickle) -> Vec<u8> {
    torch_file(&dict_w(value), &[("0", &F32_32)])
}

// ---- what is read ----

#[test]
fn reads_a_state_dict_as_absolute_ranges() {
    let pickle = Pickle::new()
        .ordered_dict()
        .mark()
        .str("a")
        .tensor_v2("FloatStorage", "0", 32, 0, &[4, 8], &[8, 1])
        .put(9)
        .str("b")
        .tensor_v2("HalfStorage", "1", 4, 0, &[4], &[1])
        .op(b'u')
        .stop();
    let z = torch_zip(&pickle, &[("0", &F32_32), ("1", &[1; 8])]);
    let f = read(&z.bytes).unwrap();
    assert_eq!(f.prefix, "archive");
    assert!(f.unreferenced.is_empty());
    let t = tensors(&f);
    assert_eq!(t.len(), 2);
    let (name, a) = &t[0];
    assert_eq!(name, "a");
    assert_eq!(a.dtype, DType::F32);
    assert_eq!(
        (a.shape.clone(), a.stride.clone()),
        (vec![4, 8], vec![8, 1])
    );
    assert!(a.contiguous);
    let (begin, end) = a.offsets;
    assert_eq!(begin % 64, 0, "torch aligns data to 64 bytes");
    assert_eq!(&z.bytes[begin as usize..end as usize], &F32_32[..]);
    assert_eq!(t[1].1.dtype, DType::F16);
    assert_eq!(t[1].1.offsets.1 - t[1].1.offsets.0, 8);
}

#[test]
fn tied_views_and_overlaps_share_a_storage() {
    // (38) transposed view, (39) tied duplicate, (40) overlapping slices,
    // (37) stride 0 on one storage.
    let pickle = Pickle::new()
        .op(b'}')
        .mark()
        .str("w")
        .tensor_v2("FloatStorage", "0", 32, 0, &[4, 8], &[8, 1])
        .put(50)
        .str("tied")
        .get(50)
        .str("t")
        .tensor_v2("FloatStorage", "0", 32, 0, &[8, 4], &[1, 8])
        .str("s1")
        .tensor_v2("FloatStorage", "0", 32, 4, &[8], &[1])
        .str("s2")
        .tensor_v2("FloatStorage", "0", 32, 8, &[8], &[1])
        .str("x")
        .tensor_v2("FloatStorage", "0", 32, 8, &[3, 8], &[0, 1])
        .str("r")
        .tensor_v2("FloatStorage", "0", 32, 3, &[1, 4], &[99, 1])
        .op(b'u')
        .stop();
    let f = read(&torch_file(&pickle, &[("0", &F32_32)])).unwrap();
    let t = tensors(&f);
    let base = t[0].1.offsets.0;
    assert_eq!(t[1].1, t[0].1, "tied");
    let tr = t[2].1;
    assert!(!tr.contiguous);
    assert_eq!(tr.offsets, (base, base + 128));
    assert_eq!(t[3].1.offsets, (base + 16, base + 48));
    assert_eq!(t[4].1.offsets, (base + 32, base + 64));
    let x = t[5].1;
    assert!(!x.contiguous, "stride 0 is not row-major");
    assert_eq!(x.offsets, (base + 32, base + 64));
    let r = t[6].1;
    assert!(r.contiguous, "a size-1 dimension's stride is ignored");
    assert_eq!(r.offsets, (base + 12, base + 28));
}

#[test]
fn scalars_and_empty_tensors_are_fine() {
    // (36)
    let pickle = Pickle::new()
        .op(b'}')
        .mark()
        .str("s")
        .tensor_v2("DoubleStorage", "0", 1, 0, &[], &[])
        .str("e")
        .tensor_v2("FloatStorage", "1", 0, 0, &[0, 3], &[3, 1])
        .str("e2")
        .tensor_v2("DoubleStorage", "0", 1, 1, &[0], &[1])
        .op(b'u')
        .stop();
    let f = read(&torch_file(&pickle, &[("0", &[0; 8]), ("1", &[])])).unwrap();
    let t = tensors(&f);
    assert_eq!(t[0].1.shape, Vec::<u64>::new());
    assert_eq!(t[0].1.offsets.1 - t[0].1.offsets.0, 8);
    let (b, e) = t[1].1.offsets;
    assert_eq!(b, e);
    assert!(t[1].1.contiguous);
    assert_eq!(t[2].1.offsets.0, t[0].1.offsets.1, "offset at the very end");
}

#[test]
fn v3_dtypes_parameters_and_subclass_rebuilds() {
    let param = |inner: Pickle| inner.op(0x88).ordered_dict().op(0x87).op(b'R');
    let pickle = Pickle::new()
        .op(b'}')
        .mark()
        .str("f8")
        .tensor_v3("float8_e4m3fn", "0", 16, &[4, 4], &[4, 1])
        .str("u64")
        .tensor_v3("uint64", "1", 16, &[2], &[1])
        .str("p")
        .raw(
            &param(
                Pickle::default()
                    .global("torch._utils", "_rebuild_parameter")
                    .tensor_v2("FloatStorage", "2", 2, 0, &[2], &[1]),
            )
            .0,
        )
        .str("sub")
        .global("torch._tensor", "_rebuild_from_type_v2")
        .mark()
        .global("torch._utils", "_rebuild_tensor_v2")
        .global("torch.nn.parameter", "Parameter")
        .mark()
        .persid(("torch", "FloatStorage"), "2", 2)
        .int(0)
        .tuple_of(&[2])
        .tuple_of(&[1])
        .op(0x89)
        .ordered_dict()
        .op(b't')
        .op(b'}')
        .op(b't')
        .op(b'R')
        .str("old")
        .global("torch.nn.parameter", "Parameter")
        .tensor_v2("FloatStorage", "2", 2, 0, &[2], &[1])
        .op(0x88)
        .op(0x86)
        .op(b'R')
        .op(b'u')
        .stop();
    let f = read(&torch_file(
        &pickle,
        &[("0", &[1; 16]), ("1", &[2; 16]), ("2", &[3; 8])],
    ))
    .unwrap();
    let t = tensors(&f);
    let dtypes: Vec<_> = t.iter().map(|(_, v)| v.dtype).collect();
    assert_eq!(
        dtypes,
        [
            DType::F8E4M3,
            DType::U64,
            DType::F32,
            DType::F32,
            DType::F32
        ]
    );
    assert_eq!(t[2].1, t[3].1);
    assert_eq!(t[2].1, t[4].1);
}

#[test]
fn non_tensor_leaves_are_described() {
    // {"sd": OrderedDict + BUILD(_metadata), "epoch": 3, "args": Namespace,
    //  "b": bytes, "l": [..], "e": {}, "k": {1: 2}, "n": None, "f": 0.5}
    let pickle = Pickle::new()
        .op(b'}')
        .mark()
        .str("sd")
        .ordered_dict()
        .str("w")
        .tensor_v2("FloatStorage", "0", 32, 0, &[32], &[1])
        .op(b's')
        .op(b'}')
        .str("_metadata")
        .ordered_dict()
        .op(b's')
        .op(b'b')
        .str("epoch")
        .int(3)
        .str("args")
        .namespace()
        .str("b")
        .global("_codecs", "encode")
        .str("xy")
        .str("latin1")
        .op(0x86)
        .op(b'R')
        .str("l")
        .op(b']')
        .mark()
        .int(1)
        .int(2)
        .op(b'e')
        .str("e")
        .op(b'}')
        .str("k")
        .op(b'}')
        .int(1)
        .int(2)
        .op(b's')
        .str("n")
        .op(b'N')
        .str("f")
        .op(b'G')
        .raw(&[0; 8])
        .str("big")
        .int(1 << 40)
        .str("t")
        .int(1)
        .int(2)
        .op(0x86)
        .op(b'u')
        .stop();
    let f = read(&torch_file(&pickle, &[("0", &F32_32)])).unwrap();
    assert_eq!(tensors(&f)[0].0, "sd.w");
    assert_eq!(
        others(&f),
        [
            ("epoch".into(), "int"),
            ("args".into(), "object argparse.Namespace"),
            ("b".into(), "bytes"),
            ("l".into(), "list of 2"),
            ("e".into(), "empty dict"),
            ("k".into(), "dict with non-string keys"),
            ("n".into(), "None"),
            ("f".into(), "float"),
            ("big".into(), "int"),
            ("t".into(), "tuple of 2"),
        ]
    );
}

#[test]
fn a_root_tensor_has_an_empty_path() {
    let pickle = Pickle::new()
        .tensor_v2("FloatStorage", "0", 32, 0, &[32], &[1])
        .stop();
    let f = read(&torch_file(&pickle, &[("0", &F32_32)])).unwrap();
    assert_eq!(f.entries.len(), 1);
    assert!(f.entries[0].path.is_empty());
}

#[test]
fn protocol_4_opcodes_are_read() {
    // FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL, SHORT_BINBYTES, BINBYTES.
    let body = Pickle::default()
        .op(b'}')
        .op(0x94)
        .op(0x8c)
        .raw(&[1, b'k'])
        .op(0x94)
        .op(0x8c)
        .raw(&[8])
        .raw(b"argparse")
        .op(0x8c)
        .raw(&[9])
        .raw(b"Namespace")
        .op(0x93)
        .op(0x94)
        .op(b')')
        .op(0x81)
        .op(b's')
        .op(0x8c)
        .raw(&[2, b'b', b'1'])
        .op(b'C')
        .raw(&[2, 0xff, 0])
        .op(b's')
        .op(0x8c)
        .raw(&[2, b'b', b'2'])
        .op(b'B')
        .raw(&3u32.to_le_bytes())
        .raw(b"abc")
        .op(b's')
        .op(0x8c)
        .raw(&[2, b'r', b'e'])
        .op(b'h')
        .raw(&[1])
        .op(b's')
        .op(b'.')
        .0;
    let mut pickle = vec![0x80, 4, 0x95];
    pickle.extend((body.len() as u64).to_le_bytes());
    pickle.extend(body);
    let f = read(&torch_file(&pickle, &[])).unwrap();
    assert_eq!(
        others(&f),
        [
            ("k".into(), "object argparse.Namespace"),
            ("b1".into(), "bytes"),
            ("b2".into(), "bytes"),
            ("re".into(), "str"),
        ]
    );
}

#[test]
fn unreferenced_storages_are_reported() {
    // (13) a hidden pickle in a member no tensor names is never read.
    let hidden = Pickle::new().global("os", "system").stop();
    let f = read(&torch_file(
        &dict_w(Pickle::default().tensor_v2("FloatStorage", "0", 32, 0, &[32], &[1])),
        &[("0", &F32_32), ("7", &hidden)],
    ))
    .unwrap();
    assert_eq!(f.unreferenced, ["archive/data/7"]);
}

#[test]
fn tensors_in_lists_are_checked_though_not_listed() {
    // Lists are leaves, but their tensors' storages are still checked.
    let list = |numel: i64| {
        let p = Pickle::default()
            .op(b']')
            .mark()
            .tensor_v2("FloatStorage", "0", numel, 0, &[1], &[1])
            .op(b'e');
        torch_file(&dict_w(p), &[("0", &F32_32)])
    };
    let f = read(&list(32)).unwrap();
    assert_eq!(others(&f), [("w".into(), "list of 1")]);
    assert!(f.unreferenced.is_empty());
    refused(&list(31), "holds 128 bytes, its storage declares 124");
}

#[test]
fn odd_string_keys_are_paths() {
    // (42) empty, newline, slash and 1 MB keys are data here; Python decides.
    let long = "k".repeat(1 << 20);
    let pickle = Pickle::new()
        .op(b'}')
        .mark()
        .str("")
        .int(1)
        .str("a\nb")
        .int(2)
        .str("a/b")
        .int(3)
        .str(&long)
        .int(4)
        .op(b'u')
        .stop();
    let f = read(&torch_file(&pickle, &[])).unwrap();
    let paths: Vec<_> = f.entries.iter().map(|e| e.path[0].len()).collect();
    assert_eq!(paths, [0, 3, 3, 1 << 20]);
}

// ---- code execution (1-13) ----

#[test]
fn gadgets_are_refused_by_name() {
    // (1) (2) (5) (6) (12)
    for (module, name) in [
        ("posix", "system"),
        ("os", "system"),
        ("nt", "system"),
        ("subprocess", "Popen"),
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("__builtin__", "getattr"),
        ("builtins", "__import__"),
        ("torch.storage", "_load_from_bytes"),
        ("torch", "load"),
        ("torch.jit", "load"),
        ("torch.hub", "load"),
        ("pip", "main"),
        ("pip._internal", "main"),
        ("runpy", "_run_code"),
        ("importlib", "import_module"),
    ] {
        let call = Pickle::default()
            .global(module, name)
            .str("touch /tmp/pwned")
            .op(0x85)
            .op(b'R');
        let needle = format!("pickle calls {module}.{name}, which fastcast never runs");
        refused(&with_value(call), &needle);
        // Named but not called: still refused.
        let named = Pickle::default().global(module, name);
        refused(
            &with_value(named),
            &format!("pickle imports {module}.{name}"),
        );
        // NEWOBJ is a call too.
        let new = Pickle::default().global(module, name).op(b')').op(0x81);
        refused(&with_value(new), "which fastcast never runs");
    }
}

#[test]
fn stack_global_from_memo_strings_is_refused() {
    // (3)
    let p = Pickle::default()
        .str("os")
        .put(1)
        .op(b'0')
        .get(1)
        .str("system")
        .op(0x93)
        .str("id")
        .op(0x85)
        .op(b'R');
    refused(&with_value(p), "POP"); // POP is not a torch opcode
    let p = Pickle::default()
        .str("os")
        .put(1)
        .str("system")
        .put(2)
        .op(0x93)
        .str("id")
        .op(0x85)
        .op(b'R');
    refused(&with_value(p), "pickle calls os.system");
}

#[test]
fn other_opcodes_are_refused() {
    // (4) INST/OBJ, (30) NEXT_BUFFER, and the rest of what torch never writes.
    for (op, name) in [
        (b'i', "INST"),
        (b'o', "OBJ"),
        (0x97, "NEXT_BUFFER"),
        (0x98, "READONLY_BUFFER"),
        (b'P', "PERSID"),
        (0x82, "EXT"),
        (0x92, "NEWOBJ_EX"),
        (b'S', "STRING"),
        (0xff, "0xff"),
    ] {
        refused(&with_value(Pickle::default().op(op)), name);
    }
}

#[test]
fn calls_that_rebuild_other_tensors_are_refused() {
    // (7) _rebuild_from_type_v2 with an arbitrary class, (8) numpy rebuild,
    // (45) sparse/meta/quantized rebuilds.
    let from_type = |cls: (&str, &str)| {
        Pickle::default()
            .global("torch._tensor", "_rebuild_from_type_v2")
            .mark()
            .global("torch._utils", "_rebuild_tensor_v2")
            .global(cls.0, cls.1)
            .op(b')')
            .op(b'}')
            .op(b't')
            .op(b'R')
    };
    refused(
        &with_value(from_type(("__main__", "Evil"))),
        "a tensor of class \"__main__.Evil\"",
    );
    refused(
        &with_value(from_type(("torch.distributed.tensor", "DTensor"))),
        "which fastcast does not read",
    );
    for name in [
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_qtensor",
        "_rebuild_nested_tensor",
        "_rebuild_wrapper_subclass",
    ] {
        let p = Pickle::default()
            .global("torch._utils", name)
            .op(b')')
            .op(b'R');
        refused(&with_value(p), &format!("torch._utils.{name}"));
    }
    // A Parameter whose data is not a tensor.
    let p = Pickle::default()
        .global("torch._utils", "_rebuild_parameter")
        .global("argparse", "Namespace")
        .op(b')')
        .op(b'R')
        .op(0x88)
        .ordered_dict()
        .op(0x87)
        .op(b'R');
    refused(&with_value(p), "where _rebuild_parameter takes a tensor");
}

#[test]
fn legacy_tar_and_other_formats_are_refused() {
    // (9) legacy raw, (10) tar, (31) empty, (63) safetensors/GGUF/npy.
    let mut legacy = LEGACY_MAGIC.to_vec();
    legacy.extend(Pickle::new().global("os", "system").stop());
    refused(&legacy, "legacy (pre-1.6) torch format: re-save it with torch.save(torch.load(f, weights_only=True), f2)");
    let mut tar = vec![0; 1024];
    tar[257..262].copy_from_slice(b"ustar");
    refused(
        &tar,
        "a tar-format torch file (pre-1.6 torch); fastcast refuses it",
    );
    refused(b"", "not a torch.save file (an empty file)");
    let mut st = 2u64.to_le_bytes().to_vec();
    st.extend(b"{}");
    refused(&st, "safetensors");
    refused(b"GGUF\x03\0\0\0", "GGUF");
    refused(b"\x93NUMPY\x01\x00", "npy");
    refused(&Pickle::new().op(b'N').stop(), "a bare pickle");
}

#[test]
fn torchscript_and_unknown_members_are_refused() {
    // (11)
    let pickle = Pickle::new().op(b'N').stop();
    let ts = zip(&[
        ("archive/data.pkl", &pickle),
        ("archive/constants.pkl", &pickle),
        ("archive/code/__torch__.py", b"def f(): pass"),
        ("archive/version", b"3"),
    ]);
    refused(&ts.bytes, "TorchScript");
    let hidden = zip(&[
        ("archive/data.pkl", &pickle),
        ("archive/extra.pkl", &pickle),
        ("archive/version", b"3"),
    ]);
    refused(&hidden.bytes, "unknown zip member \"archive/extra.pkl\"");
}

// ---- the pickle machine (14-31) ----

#[test]
fn container_opcodes_only_apply_to_their_container() {
    // (14) SETITEM(S) on a list or tuple, (15) APPEND on a dict, (16) BUILD
    // on anything but an OrderedDict or an opaque object.
    let cases = [
        (
            Pickle::default().op(b']').int(1).int(2).op(b's'),
            "SETITEM at byte",
        ),
        (
            Pickle::default().op(b')').mark().int(1).int(2).op(b'u'),
            "on tuple of 0, not a dict",
        ),
        (Pickle::default().op(b'}').int(1).op(b'a'), "APPEND at byte"),
        (
            Pickle::default().op(b'}').mark().int(1).op(b'e'),
            "not a list",
        ),
        (
            Pickle::default().op(b']').op(b'}').op(b'b'),
            "BUILD at byte",
        ),
        (Pickle::default().op(b'}').op(b'}').op(b'b'), "BUILD"),
        (
            Pickle::default()
                .global("argparse", "Namespace")
                .op(b'}')
                .op(b'b'),
            "BUILD",
        ),
        (Pickle::default().int(3).op(b'}').op(b'b'), "BUILD"),
    ];
    for (p, needle) in cases {
        refused(&with_value(p), needle);
    }
}

#[test]
fn persistent_ids_must_be_storages() {
    // (17) not a tuple, not 'storage', (18) torch.UntypedStorage under v2,
    // (43) keys that are paths, missing or negative.
    let pid = |fields: Pickle| Pickle::default().mark().raw(&fields.0).op(b't').op(b'Q');
    refused(
        &with_value(Pickle::default().str("storage").op(b'Q')),
        "is not a tuple",
    );
    let not_storage = Pickle::default()
        .str("module")
        .global("torch", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(32);
    refused(&with_value(pid(not_storage)), "is not a 'storage'");
    let short = Pickle::default().str("storage").str("0");
    refused(&with_value(pid(short)), "has 2 fields");
    let untyped = Pickle::default().tensor_v2("UntypedStorage", "0", 128, 0, &[32], &[1]);
    refused(&with_value(untyped), "torch.UntypedStorage is not allowed");
    for key in ["../data.pkl", "-1", "", "0x1", "123456789012345678901"] {
        let p = Pickle::default().tensor_v2("FloatStorage", key, 32, 0, &[32], &[1]);
        refused(&with_value(p), "is not a number");
    }
    let p = Pickle::default().tensor_v2("FloatStorage", "3", 32, 0, &[32], &[1]);
    refused(
        &with_value(p),
        "storage \"3\" has no zip member archive/data/3",
    );
    let fake = Pickle::default().tensor_v2("EvilStorage", "0", 32, 0, &[32], &[1]);
    refused(&with_value(fake), "torch.EvilStorage is unknown");
    let outside = Pickle::default()
        .mark()
        .str("storage")
        .global("numpy", "FloatStorage")
        .str("0")
        .str("cpu")
        .int(32)
        .op(b't')
        .op(b'Q');
    refused(&with_value(outside), "not a torch storage class");
}

#[test]
fn broken_stacks_and_memos_are_refused() {
    // (19) underflow and TUPLE without MARK, (20) undefined BINGET, (29) no
    // STOP or trailing bytes, (31) an empty pickle.
    refused(
        &with_value(Pickle::default().mark().op(b'R')),
        "stack underflow",
    );
    refused(
        &with_value(Pickle::default().int(1).op(b't')),
        "needs a MARK",
    );
    refused(
        &with_value(Pickle::default().mark().op(0x86)),
        "stack underflow",
    );
    refused(&with_value(Pickle::default().get(77)), "memo 77");
    refused(
        &with_value(Pickle::default().op(b'j').raw(&u32::MAX.to_le_bytes())),
        "never stored",
    );
    let mut no_stop = dict_w(Pickle::default().int(1));
    no_stop.pop();
    refused(&torch_file(&no_stop, &[]), "ends without STOP");
    let mut trailing = dict_w(Pickle::default().int(1));
    trailing.extend(b"junk");
    refused(
        &torch_file(&trailing, &[]),
        "4 bytes after the pickle's STOP",
    );
    refused(&torch_file(&[], &[]), "ends without STOP");
    refused(
        &torch_file(&Pickle::new().int(1).int(2).stop(), &[]),
        "2 values",
    );
    refused(
        &torch_file(&Pickle::new().mark().int(1).stop(), &[]),
        "1 marks",
    );
    let late_proto = Pickle::new().op(0x80).raw(&[2]).op(b'N').stop();
    refused(&torch_file(&late_proto, &[]), "protocol 2 at byte 2");
}

#[test]
fn memo_ids_are_sparse_and_sharing_is_cheap() {
    // (21) LONG_BINPUT 0xFFFFFFFF is fine, (22) billion laughs, (24) a list
    // containing itself, (23) deep nesting.
    let memo = Pickle::default()
        .int(5)
        .op(b'r')
        .raw(&u32::MAX.to_le_bytes())
        .op(b'j')
        .raw(&u32::MAX.to_le_bytes())
        .op(0x86);
    let f = read(&with_value(memo)).unwrap();
    assert_eq!(others(&f), [("w".into(), "tuple of 2")]);

    // t1 = (t0, t0), ..., t60: 2^60 leaves if anything copied or walked them.
    let mut laughs = Pickle::default().op(b')').put(0);
    for i in 0..60u8 {
        laughs = laughs.get(i).op(0x86).put(i + 1);
    }
    let start = Instant::now();
    assert_eq!(
        others(&read(&with_value(laughs)).unwrap())[0].1,
        "tuple of 2"
    );

    // The same with dicts, which are walked: {k0: d0, k1: d1...} with
    // d(i+1) = {0: di, 1: di, ...}, bounded by the depth and entry limits.
    let fan = |levels: u8, width: u8| {
        let mut p = Pickle::new().op(b'}').mark().str("k0").op(b'}').put(0);
        for i in 0..levels {
            p = p.str(&format!("k{}", i + 1)).op(b'}').mark();
            for k in 0..width {
                p = p.str(&k.to_string()).get(i);
            }
            p = p.op(b'u').put(i + 1);
        }
        torch_file(&p.op(b'u').stop(), &[])
    };
    refused(&fan(40, 2), "deeper than 16");
    refused(&fan(15, 8), "more than 2097152 entries");
    assert_eq!(read(&fan(10, 2)).unwrap().entries.len(), (1 << 11) - 1);

    // A list that contains itself is one leaf; a dict that does, too deep.
    let selfish = Pickle::default().op(b']').put(1).get(1).op(b'a');
    assert_eq!(
        others(&read(&with_value(selfish)).unwrap())[0].1,
        "list of 1"
    );
    let cyclic = Pickle::default()
        .op(b'}')
        .put(1)
        .str("again")
        .get(1)
        .op(b's');
    refused(&with_value(cyclic), "deeper than 16");

    // A million nested lists and a million open MARKs.
    let mut nested = Pickle::default();
    nested.0.extend(std::iter::repeat_n(b']', 1_000_000));
    nested.0.extend(std::iter::repeat_n(b'a', 999_999));
    assert_eq!(
        others(&read(&with_value(nested)).unwrap())[0].1,
        "list of 1"
    );
    let mut marks = Pickle::new();
    marks.0.extend(std::iter::repeat_n(b'(', 1_000_000));
    refused(
        &torch_file(&marks.op(b'N').stop(), &[]),
        "1000000 marks on its stack",
    );
    assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
}

#[test]
fn lengths_are_checked_before_allocating() {
    // (25) BINUNICODE of 4 GiB in a small file, (26) invalid UTF-8 and lone
    // surrogates, (27) LONG1 of 255 bytes.
    let huge = Pickle::default()
        .op(b'X')
        .raw(&u32::MAX.to_le_bytes())
        .raw(b"abc");
    refused(&with_value(huge), "claims 4294967295 bytes");
    let huge = Pickle::default().op(b'B').raw(&u32::MAX.to_le_bytes());
    refused(&with_value(huge), "claims 4294967295 bytes");
    let huge = Pickle::default().op(b'T').raw(&(-1i32).to_le_bytes());
    refused(&with_value(huge), "negative length");
    let bad = Pickle::default()
        .op(b'X')
        .raw(&2u32.to_le_bytes())
        .raw(&[0xff, 0xfe]);
    refused(&with_value(bad), "not valid UTF-8");
    let surrogate = Pickle::default()
        .op(b'X')
        .raw(&3u32.to_le_bytes())
        .raw(&[0xed, 0xa0, 0x80]);
    refused(&with_value(surrogate), "not valid UTF-8");
    let long = Pickle::default().op(0x8a).raw(&[255]).raw(&[1; 255]);
    refused(&with_value(long), "integer of 255 bytes");
    let long4 = Pickle::default().op(0x8b).raw(&u32::MAX.to_le_bytes());
    refused(&with_value(long4), "integer of 4294967295 bytes");
    let frame = Pickle::default().op(0x95).raw(&u64::MAX.to_le_bytes());
    refused(&with_value(frame), "frame at byte");
    let global = Pickle::default().op(b'c').raw(&[b'a'; 5000]);
    refused(&with_value(global), "GLOBAL at byte");
    let negative = Pickle::default().op(0x8a).raw(&[1, 0xff]);
    assert!(read(&with_value(negative)).is_ok());
}

// ---- geometry (28, 32-46) ----

#[test]
fn geometry_outside_the_storage_is_refused() {
    // (28) negative shape/stride, (32) size mismatch both ways, (33) a view
    // past the end, (34) overflowing dims, (35) 10^5 dims.
    refused(&one_tensor(0, &[-1], &[1]), "negative shape");
    refused(&one_tensor(0, &[4], &[-1]), "negative stride");
    refused(&one_tensor(-1, &[4], &[1]), "negative storage offset");
    let declared = |numel: i64| {
        torch_file(
            &dict_w(Pickle::default().tensor_v2("FloatStorage", "0", numel, 0, &[1], &[1])),
            &[("0", &F32_32)],
        )
    };
    refused(
        &declared(64),
        "zip member archive/data/0 holds 128 bytes, its storage declares 256",
    );
    refused(&declared(16), "holds 128 bytes, its storage declares 64");
    refused(&declared(1 << 62), "declares more than 2^64");
    refused(
        &one_tensor(1, &[32], &[1]),
        "reaches past the end of storage \"0\"",
    );
    refused(&one_tensor(0, &[5, 8], &[8, 1]), "reaches past the end");
    refused(&one_tensor(0, &[2, 2], &[1, 31]), "reaches past the end");
    refused(&one_tensor(33, &[0], &[1]), "reaches past the end");
    refused(
        &one_tensor(0, &[1 << 40, 1 << 40, 1 << 40], &[0, 0, 0]),
        "more elements than fit",
    );
    refused(
        &one_tensor(0, &[2, 1 << 62], &[1 << 62, 1]),
        "more elements than fit",
    );
    refused(
        &one_tensor(0, &[2, 2], &[i64::MAX, 1]),
        "reaches past the end",
    );
    refused(&one_tensor(0, &[4], &[1, 1]), "1 dimensions but 2 strides");
    let dims = vec![1i64; 100_000];
    refused(&one_tensor(0, &dims, &dims), "100000 dimensions");
    let dims = vec![1i64; 65];
    refused(&one_tensor(0, &dims, &dims), "65 dimensions");
    let dims = vec![1i64; 64];
    assert!(read(&one_tensor(0, &dims, &dims)).is_ok());
}

#[test]
fn one_dtype_per_storage_and_dtypes_by_name() {
    // (44) a storage used with two dtypes, (45) complex/quantized/bits,
    // (46) a dtype that does not exist.
    let two = Pickle::new()
        .op(b'}')
        .mark()
        .str("a")
        .tensor_v3("float16", "0", 16, &[8], &[1])
        .str("b")
        .tensor_v3("bfloat16", "0", 16, &[8], &[1])
        .op(b'u')
        .stop();
    refused(
        &torch_file(&two, &[("0", &[0; 16])]),
        "storage \"0\" is used as both float16 and bfloat16",
    );
    let redeclared = Pickle::new()
        .op(b'}')
        .mark()
        .str("a")
        .tensor_v2("FloatStorage", "0", 32, 0, &[4], &[1])
        .str("b")
        .tensor_v2("IntStorage", "0", 32, 0, &[4], &[1])
        .op(b'u')
        .stop();
    refused(
        &torch_file(&redeclared, &[("0", &F32_32)]),
        "declared twice",
    );
    for (dtype, needle) in [
        ("complex64", "complex"),
        ("qint8", "quantized"),
        ("bits8", "bit-packed"),
        ("float4_e2m1fn_x2", "does not read"),
        ("float8_e4m3fnuz", "does not read"),
        ("float8_e8m0fnu", "does not read"),
        ("float128", "unknown dtype torch.float128"),
    ] {
        let p = Pickle::default().tensor_v3(dtype, "0", 128, &[1], &[1]);
        refused(&with_value(p), needle);
    }
    for (storage, needle) in [
        ("ComplexFloatStorage", "complex"),
        ("QInt8Storage", "quantized"),
        ("QUInt4x2Storage", "quantized"),
    ] {
        let p = Pickle::default().tensor_v2(storage, "0", 16, 0, &[1], &[1]);
        refused(&with_value(p), needle);
    }
    let not_a_dtype = Pickle::default()
        .global("torch._utils", "_rebuild_tensor_v3")
        .mark()
        .persid(("torch.storage", "UntypedStorage"), "0", 128)
        .int(0)
        .tuple_of(&[1])
        .tuple_of(&[1])
        .op(0x89)
        .ordered_dict()
        .str("float32")
        .op(b't')
        .op(b'R');
    refused(&with_value(not_a_dtype), "as a tensor dtype");
}

#[test]
fn duplicate_keys_are_refused() {
    // (41) torch keeps the last; which one a converter writes must not be a guess.
    let p = Pickle::new()
        .op(b'}')
        .mark()
        .str("sd")
        .op(b'}')
        .mark()
        .str("x")
        .int(1)
        .str("x")
        .int(2)
        .op(b'u')
        .op(b'u')
        .stop();
    refused(&torch_file(&p, &[]), "duplicate key \"x\" in \"sd\"");
    let top = Pickle::new()
        .op(b'}')
        .str("x")
        .int(1)
        .op(b's')
        .str("x")
        .int(2)
        .op(b's')
        .stop();
    refused(&torch_file(&top, &[]), "in the top-level dict");
}

// ---- the zip container (47-65) ----

fn small() -> build::Zip {
    torch_zip(
        &dict_w(Pickle::default().tensor_v2("FloatStorage", "0", 32, 0, &[32], &[1])),
        &[("0", &F32_32)],
    )
}

fn patch(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

#[test]
fn the_builder_makes_a_readable_file() {
    assert!(read(&small().bytes).is_ok());
}

#[test]
fn duplicate_and_foreign_members_are_refused() {
    // (47) duplicate data.pkl, (48) two prefixes, (60) unsafe names.
    let pickle = Pickle::new().op(b'N').stop();
    let dup = zip(&[
        ("archive/data.pkl", &pickle),
        ("archive/data.pkl", &pickle),
        ("archive/version", b"3"),
    ]);
    refused(&dup.bytes, "appears twice");
    let two = zip(&[
        ("archive/data.pkl", &pickle),
        ("other/data.pkl", &pickle),
        ("archive/version", b"3"),
    ]);
    refused(&two.bytes, "two folders");
    let flat = zip(&[("data.pkl", &pickle)]);
    refused(&flat.bytes, "not in a folder");
    for name in [
        "archive/../data.pkl",
        "archive\\data.pkl",
        "/archive/data.pkl",
        "archive/da\0ta.pkl",
        "archive//data.pkl",
        "archive/./data.pkl",
    ] {
        let z = zip(&[(name, &pickle), ("archive/version", b"3")]);
        refused(&z.bytes, "not a plain relative path");
    }
    let bad = zip(&[("archive/\u{7f}", &pickle)]);
    refused(&bad.bytes, "not a plain relative path");
    refused(&zip(&[]).bytes, "not a torch.save file");
}

#[test]
fn headers_must_agree() {
    // (49) local/central name mismatch, (50) encryption in one header,
    // (51) deflated, (52) compressed != uncompressed.
    let z = small();
    let mut b = z.bytes.clone();
    b[z.locals[0] + 30 + 8] = b'X'; // "archive/data.pkl" -> "archive/Xata.pkl"
    refused(&b, "local header names another file");
    for at in [z.locals[0] + 6, z.centrals[0] + 8] {
        let mut b = z.bytes.clone();
        b[at] |= 1;
        refused(&b, "is encrypted");
    }
    let mut b = z.bytes.clone();
    b[z.centrals[2] + 9] |= 0x20; // bit 13
    refused(&b, "is encrypted");
    let mut b = z.bytes.clone();
    patch(&mut b, z.centrals[0] + 10, &8u16.to_le_bytes());
    refused(&b, "is compressed (method 8)");
    let mut b = z.bytes.clone();
    patch(&mut b, z.locals[0] + 8, &8u16.to_le_bytes());
    refused(&b, "compressed in its local header");
    let mut b = z.bytes.clone();
    let size = u32::from_le_bytes(
        b[z.centrals[0] + 24..z.centrals[0] + 28]
            .try_into()
            .unwrap(),
    );
    patch(&mut b, z.centrals[0] + 20, &(size - 1).to_le_bytes());
    refused(&b, "compressed size");
    let mut b = z.bytes.clone();
    patch(&mut b, z.locals[0] + 22, &(size + 1).to_le_bytes());
    refused(&b, "local header gives another size");
    let mut b = z.bytes.clone();
    patch(&mut b, z.locals[0] + 6, &0u16.to_le_bytes());
    refused(&b, "without a data descriptor");
}

#[test]
fn members_tile_the_file() {
    // (53) overlaps, (54) offsets past the end, (57) a junk prefix,
    // (65) truncation in the middle of a storage.
    let z = small();
    let mut b = z.bytes.clone();
    // data.pkl claims 200 more bytes, running into the next member.
    let at = z.centrals[0];
    let size = u32::from_le_bytes(b[at + 24..at + 28].try_into().unwrap()) + 200;
    patch(&mut b, at + 20, &size.to_le_bytes());
    patch(&mut b, at + 24, &size.to_le_bytes());
    refused(&b, "overlap");
    let mut b = z.bytes.clone();
    patch(
        &mut b,
        z.centrals[1] + 42,
        &(z.locals[0] as u32).to_le_bytes(),
    );
    refused(&b, "local header names another file");
    let mut b = z.bytes.clone();
    patch(&mut b, z.centrals[1] + 42, &0x7fff_0000u32.to_le_bytes());
    refused(&b, "runs past the end of the file");
    let mut b = z.bytes.clone();
    patch(&mut b, z.centrals[1] + 24, &0x7fff_0000u32.to_le_bytes());
    patch(&mut b, z.centrals[1] + 20, &0x7fff_0000u32.to_le_bytes());
    refused(&b, "runs past the start of the central directory");
    let mut junk = b"PK\x03\x04 a self-extractor stub ".to_vec();
    junk.extend(&z.bytes);
    refused(&junk, "ZIP64");
    let storage = z.locals[4] + 100;
    refused(
        &z.bytes[..storage],
        "no zip end-of-central-directory record",
    );
    // A member left out of the central directory: its bytes sit between
    // listed members, where a hidden pickle would.
    let pickle = Pickle::new().op(b'N').stop();
    let z = zip(&[
        ("archive/data.pkl", &pickle),
        ("archive/hidden.pkl", &pickle),
        ("archive/version", b"3"),
    ]);
    let cut = z.centrals[2] - z.centrals[1];
    let mut b = z.bytes[..z.centrals[1]].to_vec();
    b.extend(&z.bytes[z.centrals[2]..]);
    let (zip64, eocd) = (z.zip64 - cut, z.eocd - cut);
    let cd_size = u64::from_le_bytes(b[zip64 + 40..zip64 + 48].try_into().unwrap()) - cut as u64;
    patch(&mut b, zip64 + 24, &2u64.to_le_bytes());
    patch(&mut b, zip64 + 32, &2u64.to_le_bytes());
    patch(&mut b, zip64 + 40, &cd_size.to_le_bytes());
    patch(&mut b, zip64 + 56 + 8, &(zip64 as u64).to_le_bytes());
    patch(&mut b, eocd + 8, &2u16.to_le_bytes());
    patch(&mut b, eocd + 10, &2u16.to_le_bytes());
    patch(&mut b, eocd + 12, &(cd_size as u32).to_le_bytes());
    refused(&b, "unlisted bytes between zip members");
}

#[test]
fn end_records_must_agree() {
    // (55) ZIP64 vs 32-bit fields, (56) a comment or second end record,
    // (59) a wrong entry count.
    let z = small();
    let mut b = z.bytes.clone();
    patch(&mut b, z.zip64 + 32, &99u64.to_le_bytes());
    refused(&b, "multi-disk");
    let mut b = z.bytes.clone();
    patch(&mut b, z.zip64 + 24, &99u64.to_le_bytes());
    patch(&mut b, z.zip64 + 32, &99u64.to_le_bytes());
    refused(&b, "disagree");
    let mut b = z.bytes.clone();
    patch(&mut b, z.zip64 + 48, &1u64.to_le_bytes());
    refused(&b, "disagree");
    let mut b = z.bytes.clone();
    patch(&mut b, z.eocd + 8, &u16::MAX.to_le_bytes());
    patch(&mut b, z.eocd + 10, &u16::MAX.to_le_bytes());
    assert!(
        read(&b).is_ok(),
        "ZIP64 markers in the 32-bit record are fine"
    );
    let n = z.centrals.len() as u64;
    let mut b = z.bytes.clone();
    patch(&mut b, z.zip64 + 24, &(n + 1).to_le_bytes());
    patch(&mut b, z.zip64 + 32, &(n + 1).to_le_bytes());
    patch(&mut b, z.eocd + 8, &u16::MAX.to_le_bytes());
    patch(&mut b, z.eocd + 10, &u16::MAX.to_le_bytes());
    refused(&b, "counts 8 entries, the central directory holds 7");
    let mut b = z.bytes.clone();
    patch(&mut b, z.zip64 + 24, &(n - 1).to_le_bytes());
    patch(&mut b, z.zip64 + 32, &(n - 1).to_le_bytes());
    patch(&mut b, z.eocd + 8, &u16::MAX.to_le_bytes());
    patch(&mut b, z.eocd + 10, &u16::MAX.to_le_bytes());
    refused(&b, "more than the 6 entries");
    // A comment, with a fake end record inside it.
    let mut b = z.bytes.clone();
    patch(&mut b, z.eocd + 20, &22u16.to_le_bytes());
    b.extend(&z.bytes[z.eocd..]);
    refused(&b, "two zip end records");
    let mut b = z.bytes.clone();
    patch(&mut b, z.eocd + 20, &5u16.to_le_bytes());
    b.extend(b"hello");
    refused(&b, "has a comment");
    // Without ZIP64 records (as Python's zipfile writes small files).
    let mut plain = z.bytes[..z.zip64].to_vec();
    plain.extend(&z.bytes[z.eocd..]);
    assert!(read(&plain).is_ok());
    let mut b = plain.clone();
    let eocd = b.len() - 22;
    patch(&mut b, eocd + 8, &u16::MAX.to_le_bytes());
    patch(&mut b, eocd + 10, &u16::MAX.to_le_bytes());
    refused(&b, "ZIP64 markers but no ZIP64 record");
    let mut b = plain;
    let eocd = b.len() - 22;
    patch(&mut b, eocd + 4, &1u16.to_le_bytes());
    refused(&b, "multi-disk");
}

#[test]
fn zip64_extra_fields_carry_large_sizes() {
    // (58) a member whose 32-bit sizes are ZIP64 markers: the 8-byte sizes
    // in the extra field are used, and checked against the file.
    let names_extra = |big: u64| {
        let mut z = small();
        let at = z.centrals[4];
        let mut b = z.bytes[..at].to_vec();
        let mut entry = z.bytes[at..z.centrals[5]].to_vec();
        patch(&mut entry, 20, &u32::MAX.to_le_bytes());
        patch(&mut entry, 24, &u32::MAX.to_le_bytes());
        patch(&mut entry, 30, &20u16.to_le_bytes());
        let mut extra = vec![1, 0, 16, 0];
        extra.extend(big.to_le_bytes());
        extra.extend(big.to_le_bytes());
        entry.extend(extra);
        b.extend(entry);
        b.extend(&z.bytes[z.centrals[5]..z.zip64]);
        let grow = 20u64;
        let zip64 = b.len();
        let mut tail = z.bytes[z.zip64..].to_vec();
        let cd_size = u64::from_le_bytes(tail[40..48].try_into().unwrap()) + grow;
        patch(&mut tail, 40, &cd_size.to_le_bytes());
        patch(&mut tail, 56 + 8, &(zip64 as u64).to_le_bytes());
        let e = 56 + 20;
        patch(&mut tail, e + 12, &(cd_size as u32).to_le_bytes());
        b.extend(tail);
        z.bytes = b;
        z.bytes
    };
    let f = read(&names_extra(128)).unwrap();
    assert_eq!(tensors(&f)[0].1.offsets.1 - tensors(&f)[0].1.offsets.0, 128);
    refused(
        &names_extra(5 << 30),
        "runs past the start of the central directory",
    );
}

#[test]
fn records_are_checked() {
    // (61) byteorder big/middle/missing, (62) version 99 or not a number.
    let pickle = Pickle::new().op(b'N').stop();
    let with = |records: &[(&str, &[u8])]| {
        let mut members: Vec<(&str, &[u8])> = vec![("archive/data.pkl", &pickle)];
        members.extend_from_slice(records);
        zip(&members).bytes
    };
    assert!(
        read(&with(&[("archive/version", b"3\n")])).is_ok(),
        "no byteorder: little"
    );
    assert!(read(&with(&[("archive/.data/version", b"1")])).is_ok());
    refused(
        &with(&[("archive/byteorder", b"big"), ("archive/version", b"3")]),
        "big-endian",
    );
    refused(
        &with(&[("archive/byteorder", b"middle"), ("archive/version", b"3")]),
        "\"middle\"",
    );
    refused(&with(&[("archive/version", b"99")]), "version 99");
    refused(&with(&[("archive/version", b"0")]), "version 0");
    refused(&with(&[("archive/version", b"x")]), "is not a number");
    refused(&with(&[("archive/version", b"+3")]), "is not a number");
    refused(&with(&[]), "no version record");
    refused(
        &with(&[("archive/version", b"3"), ("archive/.data/version", b"3")]),
        "two version records",
    );
    refused(
        &with(&[("archive/version", &[b'3'; 65])]),
        "torch writes a few",
    );
    refused(
        &with(&[
            ("archive/.storage_alignment", b"x"),
            ("archive/version", b"3"),
        ]),
        "not a number",
    );
    let no_pickle = zip(&[("archive/version", b"3")]);
    refused(&no_pickle.bytes, "no archive/data.pkl");
}

#[test]
fn reads_from_disk_like_from_memory() {
    let dir = crate::scratch::Scratch::new("torchfile");
    let path = dir.0.join("m.bin");
    std::fs::write(&path, small().bytes).unwrap();
    let f = TorchFile::read(&path).unwrap();
    assert_eq!(f, read(&small().bytes).unwrap());
    std::fs::write(&path, b"").unwrap();
    let err = TorchFile::read(&path).unwrap_err().to_string();
    assert!(
        err.ends_with("m.bin: an empty file, not a torch.save file"),
        "{err}"
    );
    let err = TorchFile::read(&dir.0.join("missing.bin")).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
}
