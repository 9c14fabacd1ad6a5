//! A pickle interpreter that executes nothing.
//!
//! It runs the opcodes torch.save emits (protocol 2, plus the few protocol-4
//! and Python-2 ones old or unusual writers use) over untrusted bytes and
//! builds plain data: values live in an arena and the memo holds indices,
//! so a value referenced a million times is stored once. Calls (`REDUCE`,
//! `NEWOBJ`) never run: a short allow-list becomes data (an `OrderedDict`,
//! a tensor, bytes); a known code-execution gadget is refused by name; any
//! other callable becomes an opaque object that only its name describes.
//! Every size read from the input is checked against what remains before
//! anything is allocated, and the arena, memo and tensor count are capped.

use std::collections::HashMap;

use crate::dtype::DType;

use super::zip::quoted;

/// Index of a value in the arena.
pub type Id = u32;

/// The most values (arena slots) one pickle may create; each is small
/// (32 bytes), so this caps the interpreter's memory near 256 MiB.
pub const MAX_VALUES: usize = 1 << 23;
/// The most tensors one pickle may rebuild.
pub const MAX_TENSORS: usize = 1 << 20;
/// The most dimensions a tensor may have.
pub const MAX_NDIM: usize = 64;
/// The longest module or attribute name a `GLOBAL` may give.
const MAX_GLOBAL_NAME: usize = 1024;

/// A pickled value.
#[derive(Debug)]
pub enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Box<str>),
    /// Bytes (their content never matters here).
    Bytes,
    Tuple(Box<[Id]>),
    List(Vec<Id>),
    /// Items in insertion order; keys may repeat (checked where it matters).
    Dict {
        items: Vec<(Id, Id)>,
        ordered: bool,
    },
    /// A `GLOBAL` reference not called (yet).
    Global(Box<Global>),
    /// A persistent id: index into [`Pickled::storages`].
    Storage(u32),
    /// A rebuilt tensor: index into [`Pickled::tensors`].
    Tensor(u32),
    /// An instance of a class fastcast does not interpret (`argparse.Namespace`).
    Object(Box<str>),
}

// MAX_VALUES is sized for values of at most 32 bytes.
const _: () = assert!(std::mem::size_of::<Value>() <= 32);

/// `module.name` as a `GLOBAL` gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub module: String,
    pub name: String,
}

impl Global {
    fn is(&self, module: &str, name: &str) -> bool {
        self.module == module && self.name == name
    }
    fn dotted(&self) -> String {
        format!("{}.{}", self.module, self.name)
    }
}

/// A storage as a persistent id declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageDecl {
    /// The key: the member `P/data/<key>` holds the bytes.
    pub key: String,
    /// Element type of the storage (`U8` for an `UntypedStorage`).
    pub dtype: DType,
    /// Elements the storage holds (bytes for an `UntypedStorage`).
    pub numel: u64,
}

/// A tensor as a `_rebuild_tensor*` call declares it (not yet checked
/// against its storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDecl {
    /// Index into [`Pickled::storages`].
    pub storage: u32,
    pub dtype: DType,
    pub offset: u64,
    pub shape: Vec<u64>,
    pub stride: Vec<u64>,
}

/// What a pickle holds, once interpreted.
#[derive(Debug)]
pub struct Pickled {
    pub values: Vec<Value>,
    pub root: Id,
    /// Every storage a persistent id named, once per key.
    pub storages: Vec<StorageDecl>,
    pub tensors: Vec<TensorDecl>,
}

impl Pickled {
    pub fn value(&self, id: Id) -> &Value {
        &self.values[id as usize]
    }
}

/// Interpret `data` (the bytes of `data.pkl`).
pub fn interpret(data: &[u8]) -> Result<Pickled, String> {
    let mut vm = Machine {
        data,
        pos: 0,
        values: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: Vec::new(),
        storage_keys: HashMap::new(),
        tensors: Vec::new(),
        gadget: None,
    };
    // Shared constants, so floods of None/True/False cost no arena slots.
    vm.values.extend([Value::None, Value::Bool, Value::Bool]);
    let root = vm.run()?;
    if let Some(gadget) = vm.gadget {
        return Err(format!(
            "pickle imports {gadget}, which fastcast never runs"
        ));
    }
    Ok(Pickled {
        values: vm.values,
        root,
        storages: vm.storages,
        tensors: vm.tensors,
    })
}

const NONE: Id = 0;
const FALSE: Id = 1;
const TRUE: Id = 2;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    values: Vec<Value>,
    stack: Vec<Id>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
    storages: Vec<StorageDecl>,
    storage_keys: HashMap<String, u32>,
    tensors: Vec<TensorDecl>,
    /// The first code-execution gadget a `GLOBAL` named, refused at the end
    /// even when never called.
    gadget: Option<String>,
}

impl<'a> Machine<'a> {
    fn run(&mut self) -> Result<Id, String> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    // PROTO: first only; protocols 2 to 5 share these opcodes.
                    let proto = self.take(1)?[0];
                    if at != 0 || !(2..=5).contains(&proto) {
                        return Err(format!(
                            "pickle protocol {proto} at byte {at} is not one torch writes"
                        ));
                    }
                }
                0x95 => {
                    // FRAME: a length hint; the frame must lie in the data.
                    let len = self.u64()?;
                    if len > (self.data.len() - self.pos) as u64 {
                        return Err(format!("pickle frame at byte {at} runs past the end"));
                    }
                }
                b'.' => return self.stop(),
                b'(' => {
                    self.marks.push(self.stack.len());
                }
                b'N' => self.push_id(NONE)?,
                0x88 => self.push_id(TRUE)?,
                0x89 => self.push_id(FALSE)?,
                b'K' => {
                    let v = self.take(1)?[0];
                    self.push(Value::Int(v.into()))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()))?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(v.into()))?;
                }
                0x8a => {
                    let n = self.take(1)?[0].into();
                    self.long(n)?;
                }
                0x8b => {
                    let n = u32::from_le_bytes(self.array()?) as usize;
                    self.long(n)?;
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Value::Float)?;
                }
                b'X' => {
                    let n = u32::from_le_bytes(self.array()?) as usize;
                    self.string(n)?;
                }
                0x8c => {
                    let n = self.take(1)?[0].into();
                    self.string(n)?;
                }
                // Python 2 byte strings, which torch.load decodes as UTF-8.
                b'U' => {
                    let n = self.take(1)?[0].into();
                    self.string(n)?;
                }
                b'T' => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n)
                        .map_err(|_| format!("pickle string at byte {at} has a negative length"))?;
                    self.string(n)?;
                }
                b'B' => {
                    let n = u32::from_le_bytes(self.array()?) as usize;
                    self.take(n)?;
                    self.push(Value::Bytes)?;
                }
                b'C' => {
                    let n = self.take(1)?[0].into();
                    self.take(n)?;
                    self.push(Value::Bytes)?;
                }
                b')' => self.push(Value::Tuple(Box::new([])))?,
                b'}' => self.push(Value::Dict {
                    items: Vec::new(),
                    ordered: false,
                })?,
                b']' => self.push(Value::List(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items.into()))?;
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let items = self.pop_n(n)?;
                    self.push(Value::Tuple(items.into()))?;
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?;
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let items = pairs(&items, at)?;
                    self.push(Value::Dict {
                        items,
                        ordered: false,
                    })?;
                }
                b's' => {
                    let kv = self.pop_n(2)?;
                    self.set_items(&kv, at)?;
                }
                b'u' => {
                    let kv = self.pop_mark()?;
                    self.set_items(&kv, at)?;
                }
                b'a' => {
                    let v = self.pop_n(1)?;
                    self.append(&v, at)?;
                }
                b'e' => {
                    let vs = self.pop_mark()?;
                    self.append(&vs, at)?;
                }
                b'q' => {
                    let id = self.take(1)?[0].into();
                    self.put(id)?;
                }
                b'r' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.put(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len()).map_err(|_| "pickle memo overflow")?;
                    self.put(id)?;
                }
                b'h' => {
                    let id = self.take(1)?[0].into();
                    self.get(id, at)?;
                }
                b'j' => {
                    let id = u32::from_le_bytes(self.array()?);
                    self.get(id, at)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let both = self.pop_n(2)?;
                    let (Value::Str(module), Value::Str(name)) =
                        (self.value(both[0]), self.value(both[1]))
                    else {
                        return Err(format!(
                            "pickle STACK_GLOBAL at byte {at} takes two strings"
                        ));
                    };
                    let (module, name) = (module.to_string(), name.to_string());
                    self.global(module, name)?;
                }
                b'R' => {
                    let both = self.pop_n(2)?;
                    let id = self.reduce(both[0], both[1], at)?;
                    self.push_id(id)?;
                }
                0x81 => {
                    let both = self.pop_n(2)?;
                    let id = self.new_object(both[0], at)?;
                    self.push_id(id)?;
                }
                b'b' => {
                    let state = self.pop_n(1)?;
                    self.build(state[0], at)?;
                }
                b'Q' => {
                    let pid = self.pop_n(1)?;
                    let id = self.persistent(pid[0], at)?;
                    self.push_id(id)?;
                }
                _ => {
                    return Err(format!(
                        "pickle opcode {} at byte {at} is not one torch.save writes",
                        opcode_name(op)
                    ))
                }
            }
        }
    }

    fn stop(&mut self) -> Result<Id, String> {
        if self.pos != self.data.len() {
            return Err(format!(
                "{} bytes after the pickle's STOP",
                self.data.len() - self.pos
            ));
        }
        if self.stack.len() != 1 || !self.marks.is_empty() {
            return Err(format!(
                "the pickle stops with {} values and {} marks on its stack (1 and 0 expected)",
                self.stack.len(),
                self.marks.len()
            ));
        }
        Ok(self.stack[0])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(if self.pos == self.data.len() {
                "the pickle ends without STOP; truncated?".into()
            } else {
                format!(
                    "pickle item at byte {} claims {n} bytes, only {} remain",
                    self.pos,
                    self.data.len() - self.pos
                )
            });
        };
        let data: &'a [u8] = self.data;
        let bytes = &data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A newline-terminated `GLOBAL` argument.
    fn line(&mut self) -> Result<String, String> {
        let rest = &self.data[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_NAME + 1)];
        let Some(len) = window.iter().position(|&b| b == b'\n') else {
            return Err(format!(
                "pickle GLOBAL at byte {} has no name line",
                self.pos
            ));
        };
        let line = std::str::from_utf8(&window[..len])
            .ok()
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic()))
            .ok_or_else(|| format!("pickle GLOBAL at byte {} is not a plain name", self.pos))?
            .to_owned();
        self.pos += len + 1;
        Ok(line)
    }

    /// A new value in the arena (not on the stack).
    fn alloc(&mut self, value: Value) -> Result<Id, String> {
        if self.values.len() >= MAX_VALUES {
            return Err(format!(
                "the pickle creates more than {MAX_VALUES} values; fastcast stops there"
            ));
        }
        self.values.push(value);
        Ok(self.values.len() as Id - 1)
    }

    fn push_id(&mut self, id: Id) -> Result<(), String> {
        if self.stack.len() >= MAX_VALUES {
            return Err(format!("the pickle's stack grows past {MAX_VALUES} values"));
        }
        self.stack.push(id);
        Ok(())
    }

    fn push(&mut self, value: Value) -> Result<(), String> {
        let id = self.alloc(value)?;
        self.push_id(id)
    }

    fn value(&self, id: Id) -> &Value {
        &self.values[id as usize]
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err(format!(
                "pickle stack underflow before byte {} (an opcode needs {n} values)",
                self.pos
            ));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let Some(mark) = self.marks.pop() else {
            return Err(format!(
                "pickle opcode before byte {} needs a MARK and there is none",
                self.pos
            ));
        };
        Ok(self.stack.split_off(mark))
    }

    fn top(&self, at: usize) -> Result<Id, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(&id) if self.stack.len() > floor => Ok(id),
            _ => Err(format!("pickle stack underflow at byte {at}")),
        }
    }

    fn long(&mut self, n: usize) -> Result<(), String> {
        if n > 8 {
            return Err(format!(
                "pickle integer of {n} bytes at byte {}; fastcast reads up to 8",
                self.pos
            ));
        }
        let bytes = self.take(n)?;
        let mut buf = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
            [0xFF; 8]
        } else {
            [0; 8]
        };
        buf[..n].copy_from_slice(bytes);
        self.push(Value::Int(i64::from_le_bytes(buf)))
    }

    fn string(&mut self, n: usize) -> Result<(), String> {
        let at = self.pos;
        let bytes = self.take(n)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| format!("pickle string at byte {at} is not valid UTF-8"))?;
        let s: Box<str> = s.into();
        self.push(Value::Str(s))
    }

    fn put(&mut self, id: u32) -> Result<(), String> {
        let top = *self
            .stack
            .last()
            .ok_or_else(|| format!("pickle memo store at byte {} with an empty stack", self.pos))?;
        if self.memo.len() >= MAX_VALUES && !self.memo.contains_key(&id) {
            return Err(format!("the pickle's memo grows past {MAX_VALUES} entries"));
        }
        self.memo.insert(id, top);
        Ok(())
    }

    fn get(&mut self, id: u32, at: usize) -> Result<(), String> {
        let value = *self.memo.get(&id).ok_or_else(|| {
            format!("pickle fetches memo {id} at byte {at}, which was never stored")
        })?;
        self.push_id(value)
    }

    fn global(&mut self, module: String, name: String) -> Result<(), String> {
        let global = Global { module, name };
        if self.gadget.is_none() && is_gadget(&global) {
            self.gadget = Some(global.dotted());
        }
        self.push(Value::Global(Box::new(global)))
    }

    fn set_items(&mut self, kv: &[Id], at: usize) -> Result<(), String> {
        let target = self.top(at)?;
        let new = pairs(kv, at)?;
        match &mut self.values[target as usize] {
            Value::Dict { items, .. } => {
                items.extend(new);
                Ok(())
            }
            other => Err(format!(
                "pickle SETITEM at byte {at} on {}, not a dict",
                describe_kind(other)
            )),
        }
    }

    fn append(&mut self, vs: &[Id], at: usize) -> Result<(), String> {
        let target = self.top(at)?;
        match &mut self.values[target as usize] {
            Value::List(items) => {
                items.extend_from_slice(vs);
                Ok(())
            }
            other => Err(format!(
                "pickle APPEND at byte {at} on {}, not a list",
                describe_kind(other)
            )),
        }
    }

    /// `BUILD` sets an object's state (`__setstate__` in Python). Only an
    /// OrderedDict (a state dict's `_metadata`) and opaque objects, whose
    /// state is dropped, may receive one.
    fn build(&mut self, _state: Id, at: usize) -> Result<(), String> {
        let target = self.top(at)?;
        match self.value(target) {
            Value::Dict { ordered: true, .. } | Value::Object(_) => Ok(()),
            other => Err(format!(
                "pickle BUILD at byte {at} on {}; fastcast sets state only on an \
                 OrderedDict or an opaque object",
                describe_kind(other)
            )),
        }
    }

    /// `BINPERSID`: `('storage', <storage type>, key, location, numel)`.
    fn persistent(&mut self, pid: Id, at: usize) -> Result<Id, String> {
        let bad = |why: &str| format!("pickle persistent id at byte {at} {why}");
        let Value::Tuple(fields) = self.value(pid) else {
            return Err(bad("is not a tuple"));
        };
        let [tag, kind, key, location, numel] = fields[..] else {
            return Err(bad(&format!(
                "has {} fields, not ('storage', type, key, location, numel)",
                fields.len()
            )));
        };
        if !matches!(self.value(tag), Value::Str(s) if &**s == "storage") {
            return Err(bad("is not a 'storage'"));
        }
        let Value::Global(kind) = self.value(kind) else {
            return Err(bad("names no storage type"));
        };
        let dtype = storage_dtype(kind)?;
        let Value::Str(key) = self.value(key) else {
            return Err(bad("has a key that is not a string"));
        };
        if key.is_empty() || key.len() > 20 || !key.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "storage key {} is not a number (torch names storages 0, 1, 2...)",
                quoted(key)
            ));
        }
        if !matches!(self.value(location), Value::Str(_)) {
            return Err(bad("has a location that is not a string"));
        }
        let numel = match self.value(numel) {
            Value::Int(n) => u64::try_from(*n).map_err(|_| bad("has a negative size"))?,
            _ => return Err(bad("has a size that is not an integer")),
        };
        let decl = StorageDecl {
            key: key.to_string(),
            dtype,
            numel,
        };
        let index = match self.storage_keys.get(&decl.key) {
            Some(&i) => {
                if self.storages[i as usize] != decl {
                    return Err(format!(
                        "storage {} is declared twice with different types or sizes",
                        quoted(&decl.key)
                    ));
                }
                i
            }
            None => {
                let i = self.storages.len() as u32;
                self.storage_keys.insert(decl.key.clone(), i);
                self.storages.push(decl);
                i
            }
        };
        self.alloc(Value::Storage(index))
    }

    /// `NEWOBJ`: `cls.__new__(cls, *args)`, never run: an OrderedDict or an
    /// opaque object.
    fn new_object(&mut self, cls: Id, at: usize) -> Result<Id, String> {
        let Value::Global(global) = self.value(cls) else {
            return Err(format!(
                "pickle NEWOBJ at byte {at} on {}, not a class",
                describe_kind(self.value(cls))
            ));
        };
        if is_gadget(global) {
            return Err(format!(
                "pickle calls {}, which fastcast never runs",
                global.dotted()
            ));
        }
        let value = if global.is("collections", "OrderedDict") {
            Value::Dict {
                items: Vec::new(),
                ordered: true,
            }
        } else {
            Value::Object(global.dotted().into())
        };
        self.alloc(value)
    }

    /// `REDUCE`: `callable(*args)`, turned into data for the allow-list.
    fn reduce(&mut self, callable: Id, args: Id, at: usize) -> Result<Id, String> {
        let Value::Global(global) = self.value(callable) else {
            return Err(format!(
                "pickle REDUCE at byte {at} calls {}, not a global",
                describe_kind(self.value(callable))
            ));
        };
        let global = (**global).clone();
        let Value::Tuple(args) = self.value(args) else {
            return Err(format!(
                "pickle REDUCE at byte {at} passes {} as arguments",
                describe_kind(self.value(args))
            ));
        };
        let args = args.to_vec();
        self.call(&global, &args, at)
    }

    fn call(&mut self, global: &Global, args: &[Id], at: usize) -> Result<Id, String> {
        if is_gadget(global) {
            return Err(format!(
                "pickle calls {}, which fastcast never runs",
                global.dotted()
            ));
        }
        let module = global.module.as_str();
        let name = global.name.as_str();
        let value = match (module, name) {
            ("collections", "OrderedDict") => {
                if !args.is_empty() {
                    return Err(format!("pickle builds an OrderedDict with arguments at byte {at}"));
                }
                Value::Dict {
                    items: Vec::new(),
                    ordered: true,
                }
            }
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3") => {
                let tensor = self.rebuild_tensor(name, args, at)?;
                if self.tensors.len() >= MAX_TENSORS {
                    return Err(format!("the pickle rebuilds more than {MAX_TENSORS} tensors"));
                }
                self.tensors.push(tensor);
                Value::Tensor(self.tensors.len() as u32 - 1)
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                // (data, requires_grad, backward_hooks[, state]): the tensor.
                let expected = if name == "_rebuild_parameter" { 3 } else { 4 };
                if args.len() != expected {
                    return Err(format!("pickle calls {name} with {} arguments at byte {at}", args.len()));
                }
                return self.tensor_arg(args[0], name, at);
            }
            // Old files call the class itself: Parameter(data, requires_grad).
            ("torch.nn.parameter" | "torch.nn", "Parameter") if !args.is_empty() => {
                return self.tensor_arg(args[0], "Parameter", at);
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                return self.rebuild_from_type(args, at);
            }
            ("_codecs", "encode") => match args {
                [text, encoding] => match (self.value(*text), self.value(*encoding)) {
                    (Value::Str(text), Value::Str(enc)) if matches!(&**enc, "latin1" | "latin-1") => {
                        if text.chars().any(|c| u32::from(c) > 0xFF) {
                            return Err(format!("pickle encodes non-latin-1 text as bytes at byte {at}"));
                        }
                        Value::Bytes
                    }
                    _ => return Err(format!("pickle calls _codecs.encode on something other than latin-1 text at byte {at}")),
                },
                _ => return Err(format!("pickle calls _codecs.encode with {} arguments at byte {at}", args.len())),
            },
            ("builtins" | "__builtin__", "bytes" | "bytearray") if args.is_empty() => Value::Bytes,
            ("torch._utils" | "torch._tensor", _) if name.starts_with("_rebuild") => {
                return Err(format!(
                    "a tensor rebuilt by {} ({}), which fastcast does not read",
                    global.dotted(),
                    rebuild_kind(name)
                ));
            }
            _ => Value::Object(global.dotted().into()),
        };
        self.alloc(value)
    }

    /// An argument that must be a tensor (a Parameter's data).
    fn tensor_arg(&self, id: Id, what: &str, at: usize) -> Result<Id, String> {
        match self.value(id) {
            Value::Tensor(_) => Ok(id),
            other => Err(format!(
                "pickle passes {} where {what} takes a tensor (byte {at})",
                describe_kind(other)
            )),
        }
    }

    /// `_rebuild_from_type_v2(func, cls, args, state)`: a tensor subclass.
    /// Only Parameter and Tensor with no state, rebuilt by an allow-listed
    /// function, are plain tensors.
    fn rebuild_from_type(&mut self, args: &[Id], at: usize) -> Result<Id, String> {
        let [func, cls, inner, state] = args[..] else {
            return Err(format!(
                "pickle calls _rebuild_from_type_v2 with {} arguments at byte {at}",
                args.len()
            ));
        };
        let cls_name = match self.value(cls) {
            Value::Global(g) => g.dotted(),
            other => describe_kind(other),
        };
        if !matches!(
            cls_name.as_str(),
            "torch.nn.parameter.Parameter" | "torch.Tensor" | "torch._tensor.Tensor"
        ) {
            return Err(format!(
                "a tensor of class {} (via _rebuild_from_type_v2), which fastcast does not read",
                quoted(&cls_name)
            ));
        }
        let empty_state = match self.value(state) {
            Value::None => true,
            Value::Dict { items, .. } => items.is_empty(),
            _ => false,
        };
        if !empty_state {
            return Err(format!(
                "a {cls_name} with Python state (via _rebuild_from_type_v2), which fastcast does not read"
            ));
        }
        let func = match self.value(func) {
            Value::Global(g) if g.module == "torch._utils" && g.name.starts_with("_rebuild_") => {
                (**g).clone()
            }
            other => {
                return Err(format!(
                    "_rebuild_from_type_v2 rebuilds with {}, not a torch rebuild function",
                    describe_kind(other)
                ))
            }
        };
        let Value::Tuple(inner) = self.value(inner) else {
            return Err(format!(
                "pickle calls _rebuild_from_type_v2 without an argument tuple at byte {at}"
            ));
        };
        let inner = inner.to_vec();
        let id = self.call(&func, &inner, at)?;
        self.tensor_arg(id, "_rebuild_from_type_v2", at)
    }

    /// `_rebuild_tensor(storage, offset, size, stride)`, `_v2(..., requires_grad,
    /// backward_hooks[, metadata])`, `_v3(..., requires_grad, backward_hooks,
    /// dtype[, metadata])`.
    fn rebuild_tensor(&self, name: &str, args: &[Id], at: usize) -> Result<TensorDecl, String> {
        let arity: &[usize] = match name {
            "_rebuild_tensor" => &[4],
            "_rebuild_tensor_v2" => &[6, 7],
            _ => &[7, 8],
        };
        if !arity.contains(&args.len()) {
            return Err(format!(
                "pickle calls {name} with {} arguments at byte {at}",
                args.len()
            ));
        }
        let Value::Storage(storage) = *self.value(args[0]) else {
            return Err(format!(
                "pickle passes {} where {name} takes a storage (byte {at})",
                describe_kind(self.value(args[0]))
            ));
        };
        let offset = self.count(args[1], "storage offset", at)?;
        let shape = self.counts(args[2], "shape", at)?;
        let stride = self.counts(args[3], "stride", at)?;
        if stride.len() != shape.len() {
            return Err(format!(
                "tensor at byte {at} has {} dimensions but {} strides",
                shape.len(),
                stride.len()
            ));
        }
        let storage_dtype = self.storages[storage as usize].dtype;
        let dtype = if name == "_rebuild_tensor_v3" {
            match self.value(args[6]) {
                Value::Global(g) if g.module == "torch" => tensor_dtype(&g.name)?,
                other => {
                    return Err(format!(
                        "pickle passes {} as a tensor dtype at byte {at}",
                        describe_kind(other)
                    ))
                }
            }
        } else {
            storage_dtype
        };
        Ok(TensorDecl {
            storage,
            dtype,
            offset,
            shape,
            stride,
        })
    }

    fn count(&self, id: Id, what: &str, at: usize) -> Result<u64, String> {
        match self.value(id) {
            Value::Int(n) => u64::try_from(*n)
                .map_err(|_| format!("tensor at byte {at} has a negative {what} ({n})")),
            other => Err(format!(
                "tensor at byte {at} has {} as its {what}",
                describe_kind(other)
            )),
        }
    }

    fn counts(&self, id: Id, what: &str, at: usize) -> Result<Vec<u64>, String> {
        let Value::Tuple(items) = self.value(id) else {
            return Err(format!(
                "tensor at byte {at} has {} as its {what}",
                describe_kind(self.value(id))
            ));
        };
        if items.len() > MAX_NDIM {
            return Err(format!(
                "tensor at byte {at} has {} dimensions; fastcast reads up to {MAX_NDIM}",
                items.len()
            ));
        }
        items.iter().map(|&i| self.count(i, what, at)).collect()
    }
}

/// `[k0, v0, k1, v1...]` as pairs.
fn pairs(flat: &[Id], at: usize) -> Result<Vec<(Id, Id)>, String> {
    if !flat.len().is_multiple_of(2) {
        return Err(format!("pickle sets a key without a value at byte {at}"));
    }
    Ok(flat.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
}

/// A value's kind, for messages and non-tensor leaves.
pub fn describe_kind(value: &Value) -> String {
    match value {
        Value::None => "None".into(),
        Value::Bool => "bool".into(),
        Value::Int(_) => "int".into(),
        Value::Float => "float".into(),
        Value::Str(_) => "str".into(),
        Value::Bytes => "bytes".into(),
        Value::Tuple(items) => format!("tuple of {}", items.len()),
        Value::List(items) => format!("list of {}", items.len()),
        Value::Dict { .. } => "dict".into(),
        Value::Global(g) => format!("global {}", g.dotted()),
        Value::Storage(_) => "storage".into(),
        Value::Tensor(_) => "tensor".into(),
        Value::Object(name) => format!("object {name}"),
    }
}

/// What a storage class holds. torch resolves any `torch[.cuda].<X>Storage`
/// by name; `UntypedStorage` must come from `torch.storage` (torch refuses
/// `torch.UntypedStorage`).
fn storage_dtype(kind: &Global) -> Result<DType, String> {
    let refused = |why: &str| Err(format!("storage type {} is {why}", kind.dotted()));
    if kind.is("torch.storage", "UntypedStorage") {
        return Ok(DType::U8);
    }
    let Some(base) = kind.name.strip_suffix("Storage") else {
        return refused("not a storage class");
    };
    if !matches!(kind.module.as_str(), "torch" | "torch.cuda") {
        return refused("not a torch storage class");
    }
    Ok(match base {
        "Double" => DType::F64,
        "Float" => DType::F32,
        "Half" => DType::F16,
        "BFloat16" => DType::BF16,
        "Long" => DType::I64,
        "Int" => DType::I32,
        "Short" => DType::I16,
        "Char" => DType::I8,
        "Byte" => DType::U8,
        "Bool" => DType::Bool,
        "ComplexDouble" | "ComplexFloat" | "ComplexHalf" => {
            return refused("complex, which fastcast does not read")
        }
        "QInt8" | "QInt32" | "QUInt8" | "QUInt4x2" | "QUInt2x4" => {
            return refused("quantized, which fastcast does not read")
        }
        "Untyped" => return refused("not allowed in a torch.save file (torch refuses it too)"),
        _ => return refused("unknown"),
    })
}

/// A `torch.<dtype>` global as `_rebuild_tensor_v3` passes it.
fn tensor_dtype(name: &str) -> Result<DType, String> {
    // Every dtype but the ones torch.save can hold and fastcast refuses.
    let unread = |d: &DType| {
        matches!(
            d,
            DType::C64
                | DType::F8E8M0
                | DType::F8E4M3Fnuz
                | DType::F8E5M2Fnuz
                | DType::F4
                | DType::F6E2M3
                | DType::F6E3M2
        )
    };
    let found = crate::dtype::ALL.iter().find(|d| d.torch_name() == name);
    if let Some(&d) = found.filter(|d| !unread(d)) {
        return Ok(d);
    }
    let kind = if name.starts_with("complex") || matches!(name, "cfloat" | "cdouble" | "chalf") {
        "complex"
    } else if name.starts_with("qint") || name.starts_with("quint") {
        "quantized"
    } else if name.starts_with("bits") {
        "a bit-packed dtype"
    } else if name.starts_with("float8")
        || name.starts_with("float4")
        || name.starts_with("float6")
        || name.starts_with("int")
        || name.starts_with("uint")
    {
        "a dtype fastcast does not read"
    } else {
        return Err(format!("unknown dtype torch.{name}"));
    };
    Err(format!(
        "dtype torch.{name} is {kind}, which fastcast does not read"
    ))
}

/// What an unsupported `_rebuild_*` builds, in words.
fn rebuild_kind(name: &str) -> &'static str {
    const KINDS: [(&str, &str); 9] = [
        ("sparse", "a sparse tensor"),
        ("nested", "a nested tensor"),
        ("meta", "a meta tensor with no data"),
        ("qtensor", "a quantized tensor"),
        ("wrapper_subclass", "a wrapper subclass"),
        ("numpy", "a tensor from numpy"),
        ("device", "a device tensor"),
        ("xla", "an XLA tensor"),
        ("dtensor", "a distributed tensor"),
    ];
    KINDS
        .iter()
        .find(|(part, _)| name.contains(part))
        .map_or("not an allow-listed rebuild", |(_, kind)| kind)
}

/// Known code-execution gadgets: modules whose callables run code, spawn
/// processes, load further pickles or touch the network, and builtins that
/// do. Nothing ever runs here; naming them makes the refusal plain.
fn is_gadget(g: &Global) -> bool {
    const MODULES: [&str; 34] = [
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "runpy",
        "importlib",
        "pip",
        "shutil",
        "socket",
        "pty",
        "code",
        "codeop",
        "commands",
        "ctypes",
        "multiprocessing",
        "pickle",
        "_pickle",
        "cPickle",
        "marshal",
        "dill",
        "joblib",
        "numexpr",
        "webbrowser",
        "asyncio",
        "timeit",
        "pdb",
        "bdb",
        "trace",
        "profile",
        "cProfile",
        "urllib",
        "http",
        "requests",
    ];
    const TORCH: [&str; 6] = [
        "torch.jit",
        "torch.hub",
        "torch.serialization",
        "torch.utils.cpp_extension",
        "torch._dynamo",
        "torch.package",
    ];
    const BUILTINS: [&str; 17] = [
        "eval",
        "exec",
        "execfile",
        "compile",
        "getattr",
        "setattr",
        "delattr",
        "__import__",
        "open",
        "file",
        "input",
        "breakpoint",
        "globals",
        "locals",
        "vars",
        "apply",
        "reload",
    ];
    let under =
        |m: &str| g.module == m || g.module.strip_prefix(m).is_some_and(|r| r.starts_with('.'));
    MODULES.iter().any(|m| under(m))
        || TORCH.iter().any(|m| under(m))
        || (matches!(g.module.as_str(), "builtins" | "__builtin__")
            && BUILTINS.contains(&g.name.as_str()))
        || g.is("torch", "load")
        || g.is("torch", "from_file")
        || g.is("torch.storage", "_load_from_bytes")
        || g.is("numpy.testing._private.utils", "runstring")
        || g.is("operator", "attrgetter")
        || g.is("operator", "methodcaller")
        || (g.module == "types" && g.name != "SimpleNamespace")
}

/// An opcode for a message: its pickle name when fastcast knows it.
fn opcode_name(op: u8) -> String {
    let name = match op {
        b'i' => "INST",
        b'o' => "OBJ",
        b'P' => "PERSID",
        0x82..=0x84 => "EXT",
        0x92 => "NEWOBJ_EX",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'p' => "PUT",
        b'g' => "GET",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        _ => return format!("0x{op:02x}"),
    };
    format!("{name} (0x{op:02x})")
}
