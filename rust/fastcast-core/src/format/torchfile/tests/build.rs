//! Test files made by hand: a zip laid out as torch's writer lays it out,
//! and pickles written opcode by opcode.

/// A zip as `PyTorchStreamWriter` writes it: local headers with flag 0x0808
/// and zero sizes, data 64-aligned by an "FB" extra field, a 16-byte data
/// descriptor, the central directory, a ZIP64 end record, its locator and
/// the 32-bit end record.
pub struct Zip {
    pub bytes: Vec<u8>,
    /// Offset of each member's local header, in order.
    pub locals: Vec<usize>,
    /// Offset of each member's central-directory entry, in order.
    pub centrals: Vec<usize>,
    /// Offset of the ZIP64 end record and of the 32-bit one.
    pub zip64: usize,
    pub eocd: usize,
}

pub fn zip(members: &[(&str, &[u8])]) -> Zip {
    let mut out = Vec::new();
    let mut locals = Vec::new();
    for (name, data) in members {
        locals.push(out.len());
        let flags: u16 = if data.is_empty() { 0x0800 } else { 0x0808 };
        let before = out.len() + 30 + name.len() + 4;
        let pad = (64 - before % 64) % 64;
        put(&mut out, &[0x50, 0x4b, 3, 4]);
        put(&mut out, &0u16.to_le_bytes()); // version needed
        put(&mut out, &flags.to_le_bytes());
        put(&mut out, &[0; 2 + 4 + 4 + 4 + 4]); // method, time/date, crc, sizes
        put(&mut out, &(name.len() as u16).to_le_bytes());
        put(&mut out, &(4 + pad as u16).to_le_bytes());
        put(&mut out, name.as_bytes());
        put(&mut out, b"FB");
        put(&mut out, &(pad as u16).to_le_bytes());
        out.extend(std::iter::repeat_n(b'Z', pad));
        put(&mut out, data);
        if !data.is_empty() {
            put(&mut out, &[0x50, 0x4b, 7, 8, 0, 0, 0, 0]);
            put(&mut out, &(data.len() as u32).to_le_bytes());
            put(&mut out, &(data.len() as u32).to_le_bytes());
        }
    }
    let cd_offset = out.len();
    let mut centrals = Vec::new();
    for ((name, data), &local) in members.iter().zip(&locals) {
        centrals.push(out.len());
        let flags: u16 = if data.is_empty() { 0x0800 } else { 0x0808 };
        put(&mut out, &[0x50, 0x4b, 1, 2, 0, 0, 0, 0]);
        put(&mut out, &flags.to_le_bytes());
        put(&mut out, &[0; 2 + 4 + 4]); // method, time/date, crc
        put(&mut out, &(data.len() as u32).to_le_bytes());
        put(&mut out, &(data.len() as u32).to_le_bytes());
        put(&mut out, &(name.len() as u16).to_le_bytes());
        put(&mut out, &[0; 2 + 2 + 2 + 2 + 4]); // extra, comment, disk, attributes
        put(&mut out, &(local as u32).to_le_bytes());
        put(&mut out, name.as_bytes());
    }
    let cd_size = out.len() - cd_offset;
    let n = members.len() as u64;
    let zip64 = out.len();
    put(&mut out, &[0x50, 0x4b, 6, 6]);
    put(&mut out, &44u64.to_le_bytes());
    put(&mut out, &[0x1e, 3, 0x2d, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for v in [n, n, cd_size as u64, cd_offset as u64] {
        put(&mut out, &v.to_le_bytes());
    }
    put(&mut out, &[0x50, 0x4b, 6, 7, 0, 0, 0, 0]);
    put(&mut out, &(zip64 as u64).to_le_bytes());
    put(&mut out, &1u32.to_le_bytes());
    let eocd = out.len();
    put(&mut out, &[0x50, 0x4b, 5, 6, 0, 0, 0, 0]);
    put(&mut out, &(n as u16).to_le_bytes());
    put(&mut out, &(n as u16).to_le_bytes());
    put(&mut out, &(cd_size as u32).to_le_bytes());
    put(&mut out, &(cd_offset as u32).to_le_bytes());
    put(&mut out, &0u16.to_le_bytes());
    Zip {
        bytes: out,
        locals,
        centrals,
        zip64,
        eocd,
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(bytes);
}

/// The members torch 2.15 writes around `data.pkl` and the storages.
pub fn torch_zip(pickle: &[u8], storages: &[(&str, &[u8])]) -> Zip {
    let mut members: Vec<(String, &[u8])> = vec![
        ("archive/data.pkl".into(), pickle),
        ("archive/.format_version".into(), b"1"),
        ("archive/.storage_alignment".into(), b"64"),
        ("archive/byteorder".into(), b"little"),
    ];
    for (key, data) in storages {
        members.push((format!("archive/data/{key}"), data));
    }
    members.push(("archive/version".into(), b"3\n"));
    members.push((
        "archive/.data/serialization_id".into(),
        b"1234567890123456789012345678901234567890",
    ));
    let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    zip(&refs)
}

pub fn torch_file(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    torch_zip(pickle, storages).bytes
}

/// A pickle written opcode by opcode (protocol 2, as torch writes it).
#[derive(Clone, Default)]
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Pickle {
        Pickle(vec![0x80, 2])
    }
    pub fn op(mut self, op: u8) -> Pickle {
        self.0.push(op);
        self
    }
    pub fn raw(mut self, bytes: &[u8]) -> Pickle {
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn mark(self) -> Pickle {
        self.op(b'(')
    }
    pub fn str(self, s: &str) -> Pickle {
        let len = (s.len() as u32).to_le_bytes();
        self.op(b'X').raw(&len).raw(s.as_bytes())
    }
    pub fn int(self, v: i64) -> Pickle {
        match v {
            0..=0xFF => self.op(b'K').raw(&[v as u8]),
            0x100..=0xFFFF => self.op(b'M').raw(&(v as u16).to_le_bytes()),
            _ if i32::try_from(v).is_ok() => self.op(b'J').raw(&(v as i32).to_le_bytes()),
            _ => self.op(0x8a).raw(&[8]).raw(&v.to_le_bytes()),
        }
    }
    pub fn global(self, module: &str, name: &str) -> Pickle {
        self.op(b'c')
            .raw(module.as_bytes())
            .raw(b"\n")
            .raw(name.as_bytes())
            .raw(b"\n")
    }
    pub fn put(self, id: u8) -> Pickle {
        self.op(b'q').raw(&[id])
    }
    pub fn get(self, id: u8) -> Pickle {
        self.op(b'h').raw(&[id])
    }
    pub fn tuple_of(self, items: &[i64]) -> Pickle {
        let mut p = self.mark();
        for &i in items {
            p = p.int(i);
        }
        p.op(b't')
    }
    pub fn ordered_dict(self) -> Pickle {
        self.global("collections", "OrderedDict").op(b')').op(b'R')
    }
    pub fn persid(self, storage_type: (&str, &str), key: &str, numel: i64) -> Pickle {
        self.mark()
            .str("storage")
            .global(storage_type.0, storage_type.1)
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b't')
            .op(b'Q')
    }
    /// `_rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())`.
    pub fn tensor_v2(
        self,
        storage: &str,
        key: &str,
        numel: i64,
        offset: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> Pickle {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .persid(("torch", storage), key, numel)
            .int(offset)
            .tuple_of(shape)
            .tuple_of(stride)
            .op(0x89)
            .ordered_dict()
            .op(b't')
            .op(b'R')
    }
    /// `_rebuild_tensor_v3(untyped storage, offset, shape, stride, False,
    /// OrderedDict(), torch.<dtype>)`.
    pub fn tensor_v3(
        self,
        dtype: &str,
        key: &str,
        nbytes: i64,
        shape: &[i64],
        stride: &[i64],
    ) -> Pickle {
        self.global("torch._utils", "_rebuild_tensor_v3")
            .mark()
            .persid(("torch.storage", "UntypedStorage"), key, nbytes)
            .int(0)
            .tuple_of(shape)
            .tuple_of(stride)
            .op(0x89)
            .ordered_dict()
            .global("torch", dtype)
            .op(b't')
            .op(b'R')
    }
    /// `argparse.Namespace(lr=1)` as pickle writes it: NEWOBJ, then BUILD.
    pub fn namespace(self) -> Pickle {
        self.global("argparse", "Namespace")
            .op(b')')
            .op(0x81)
            .op(b'}')
            .str("lr")
            .int(1)
            .op(b's')
            .op(b'b')
    }
    pub fn stop(self) -> Vec<u8> {
        self.op(b'.').0
    }
}

/// `{"w": <what>}` around a pickle fragment that leaves one value.
pub fn dict_w(value: Pickle) -> Vec<u8> {
    let mut p = Pickle::new().op(b'}').str("w");
    p.0.extend_from_slice(&value.0);
    p.op(b's').stop()
}
