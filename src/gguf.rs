//! GGUF reader: header, metadata, tensor infos — parsed from a byte slice (the mmap, or a fuzzer's
//! input) with checked arithmetic everywhere.
//!
//! Invariants a successful [`parse`] guarantees to the rest of the crate:
//! - every count was bounded by the bytes left in the file before anything was allocated for it;
//! - keys and tensor names are unique, valid UTF-8;
//! - every tensor has 1..=4 dimensions, each >= 1, a type ggml knows, a row length that is a
//!   multiple of the type's block size, and an element and byte count that fit in `i64`;
//! - tensor data ranges are aligned, in file order, do not overlap, and lie inside the file.
//!
//! Nothing here reads tensor data; it only proves where the data is.

use std::collections::HashMap;

use crate::ggml;

/// Why a file is not a usable GGUF file. Each message names the key, tensor or field at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    #[error("not a GGUF file (magic bytes {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (phi4 reads versions 2 and 3)")]
    BadVersion(u32),
    #[error("file truncated: {what} needs {need} bytes at offset {at}, but the file has {len}")]
    Truncated { what: String, at: u64, need: u64, len: u64 },
    #[error("{what} count {count} is impossible: the {left} bytes left in the file hold at most {max}")]
    CountTooLarge { what: String, count: u64, left: u64, max: u64 },
    #[error("{what}: size overflows ({detail})")]
    Overflow { what: String, detail: String },
    #[error("metadata key {key:?}: {msg}")]
    BadValue { key: String, msg: String },
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    #[error("tensor {name:?}: {msg}")]
    BadTensor { name: String, msg: String },
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    #[error("general.alignment: {0}")]
    BadAlignment(String),
    #[error("tensor {name:?}: data offset {offset}: {msg}")]
    BadOffset { name: String, offset: u64, msg: String },
}

/// Metadata value types, numbered as in the GGUF specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type occupies in a file (used to bound counts).
    fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// A metadata value. Strings are kept as bytes: vocabulary entries need not be UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(Vec<u8>),
    /// Element type and elements (all of that type).
    Array(ValueType, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type, if its value is representable as i128 (all are).
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// One tensor's header entry, with its data range proven inside the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length. Unused trailing dimensions are 1.
    pub dims: [u64; 4],
    pub n_dims: usize,
    pub ggml_type: ggml::Type,
    /// Absolute offset of the first data byte in the file.
    pub file_offset: u64,
    /// Data size in bytes.
    pub size: u64,
}

impl TensorInfo {
    pub fn shape(&self) -> &[u64] {
        &self.dims[..self.n_dims]
    }
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct Gguf {
    pub version: u32,
    pub alignment: u64,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// Total file length the header was checked against.
    pub file_len: u64,
}

const MAGIC: &[u8; 4] = b"GGUF";
/// Deepest array nesting accepted (GGUF allows arrays of arrays; nobody needs more than this).
const MAX_NESTING: u32 = 8;
/// ggml tensor names hold at most 63 bytes plus the terminating NUL.
const MAX_TENSOR_NAME: usize = 63;
const DEFAULT_ALIGNMENT: u64 = 32;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        if n > self.left() {
            return Err(GgufError::Truncated {
                what: what(),
                at: self.pos as u64,
                need: n,
                len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that will be followed by `count` items of at least `min_item` bytes each.
    fn count(&mut self, min_item: u64, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        let count = self.u64(what)?;
        let max = self.left() / min_item.max(1);
        if count > max {
            return Err(GgufError::CountTooLarge { what: what(), count, left: self.left(), max });
        }
        Ok(count)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let len = self.count(1, &|| format!("{} string length", what()))?;
        self.take(len, what)
    }
}

/// Parse a GGUF header from the whole file's bytes.
pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic: [u8; 4] = r.array(&|| "magic".into())?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufError::BadVersion(version));
    }
    // Smallest tensor info: name (8 + 1) + n_dims (4) + one dim (8) + type (4) + offset (8).
    let n_tensors = r.u64(&|| "tensor count".into())?;
    // Smallest metadata entry: key (8 + 1) + type (4) + a one-byte value.
    let n_kv = r.count(14, &|| "metadata key/value".into())?;
    // Checked after the KV count is read, against what is left then.
    let max_tensors = r.left() / 33;
    if n_tensors > max_tensors {
        return Err(GgufError::CountTooLarge {
            what: "tensor".into(),
            count: n_tensors,
            left: r.left(),
            max: max_tensors,
        });
    }

    let mut metadata = Vec::with_capacity(n_kv.min(1024) as usize);
    let mut index = HashMap::new();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let key = std::str::from_utf8(key)
            .map_err(|_| GgufError::BadValue {
                key: String::from_utf8_lossy(key).into_owned(),
                msg: "key is not valid UTF-8".into(),
            })?
            .to_owned();
        if key.is_empty() {
            return Err(GgufError::BadValue { key, msg: "empty key".into() });
        }
        let ty = r.u32(&|| format!("type of metadata key {key:?}"))?;
        let value = read_value(&mut r, &key, ty, 0)?;
        if index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }

    let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some(Value::U32(a)) => return Err(GgufError::BadAlignment(format!("{a} is not a power of two"))),
        Some(v) => {
            return Err(GgufError::BadAlignment(format!("must be u32, found {}", v.value_type().name())))
        }
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(4096) as usize);
    let mut names = HashMap::new();
    for i in 0..n_tensors {
        let name = r.string(&|| format!("tensor #{i} name"))?;
        let name = match std::str::from_utf8(name) {
            Ok(s) if !s.is_empty() && s.len() <= MAX_TENSOR_NAME => s.to_owned(),
            _ => {
                return Err(GgufError::BadTensor {
                    name: String::from_utf8_lossy(name).into_owned(),
                    msg: format!("name must be 1..={MAX_TENSOR_NAME} bytes of UTF-8"),
                })
            }
        };
        let bad = |msg: String| GgufError::BadTensor { name: name.clone(), msg };
        let n_dims = r.u32(&|| format!("tensor {name:?} dimension count"))? as usize;
        if !(1..=4).contains(&n_dims) {
            return Err(bad(format!("{n_dims} dimensions (ggml supports 1 to 4)")));
        }
        let mut dims = [1u64; 4];
        for d in dims.iter_mut().take(n_dims) {
            *d = r.u64(&|| format!("tensor {name:?} dimensions"))?;
            if *d == 0 {
                return Err(bad("a dimension is 0".into()));
            }
        }
        let raw_type = r.u32(&|| format!("tensor {name:?} type"))?;
        let ggml_type = ggml::Type::from_raw(raw_type)
            .ok_or_else(|| bad(format!("unknown ggml type {}", raw_type as i32)))?;
        let offset = r.u64(&|| format!("tensor {name:?} offset"))?;

        let overflow = |detail: String| GgufError::Overflow { what: format!("tensor {name:?}"), detail };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| overflow(format!("element count of {:?}", &dims[..n_dims])))?;
        let blck = ggml_type.block_size();
        if dims[0] % blck != 0 {
            return Err(bad(format!(
                "row length {} is not a multiple of {}'s block size {blck}",
                dims[0],
                ggml_type.name()
            )));
        }
        let size = (n_elements / blck)
            .checked_mul(ggml_type.type_size())
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| overflow(format!("byte count of {n_elements} {} elements", ggml_type.name())))?;
        if names.insert(name.clone(), tensors.len()).is_some() {
            return Err(GgufError::DuplicateTensor(name));
        }
        tensors.push(TensorInfo { name, dims, n_dims, ggml_type, file_offset: offset, size });
    }

    let file_len = bytes.len() as u64;
    let data_offset = align_up(r.pos as u64, alignment).ok_or_else(|| GgufError::Overflow {
        what: "data section".into(),
        detail: "aligned start".into(),
    })?;
    // Offsets are relative to the data section until here; make them absolute and prove each
    // range is aligned, in order, non-overlapping and inside the file.
    let mut next_free = 0u64;
    for t in tensors.iter_mut() {
        let rel = t.file_offset;
        let err = |msg: String| GgufError::BadOffset { name: t.name.clone(), offset: rel, msg };
        if rel % alignment != 0 {
            return Err(err(format!("not a multiple of the alignment {alignment}")));
        }
        if rel < next_free {
            return Err(err(format!("out of order or overlapping: the previous tensor ends at {next_free}")));
        }
        let end = rel
            .checked_add(t.size)
            .and_then(|e| e.checked_add(data_offset))
            .ok_or_else(|| err(format!("offset + size {} overflows", t.size)))?;
        if end > file_len {
            return Err(err(format!(
                "data ends at byte {end}, past the end of the file ({file_len} bytes)"
            )));
        }
        next_free = rel + t.size;
        t.file_offset = data_offset + rel;
    }
    if !tensors.is_empty() && data_offset > file_len {
        return Err(GgufError::Truncated {
            what: "tensor data section".into(),
            at: data_offset,
            need: 0,
            len: file_len,
        });
    }

    Ok(Gguf { version, alignment, metadata, index, tensors, data_offset, file_len })
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x / a * a)
}

fn read_value(r: &mut Reader<'_>, key: &str, ty: u32, depth: u32) -> Result<Value, GgufError> {
    let bad = |msg: String| GgufError::BadValue { key: key.to_owned(), msg };
    let ty = ValueType::from_u32(ty).ok_or_else(|| bad(format!("unknown value type {}", ty as i32)))?;
    let what = || format!("value of {key:?}");
    Ok(match ty {
        ValueType::U8 => Value::U8(r.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(r.array::<1>(&what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(r.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(r.array(&what)?)),
        ValueType::U32 => Value::U32(r.u32(&what)?),
        ValueType::I32 => Value::I32(r.u32(&what)? as i32),
        ValueType::F32 => Value::F32(f32::from_le_bytes(r.array(&what)?)),
        ValueType::U64 => Value::U64(r.u64(&what)?),
        ValueType::I64 => Value::I64(r.u64(&what)? as i64),
        ValueType::F64 => Value::F64(f64::from_le_bytes(r.array(&what)?)),
        ValueType::Bool => match r.array::<1>(&what)?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            b => return Err(bad(format!("bool byte {b} is neither 0 nor 1"))),
        },
        ValueType::String => Value::String(r.string(&what)?.to_vec()),
        ValueType::Array => {
            if depth >= MAX_NESTING {
                return Err(bad(format!("arrays nested deeper than {MAX_NESTING}")));
            }
            let elem_raw = r.u32(&|| format!("element type of {key:?}"))?;
            let elem = ValueType::from_u32(elem_raw)
                .ok_or_else(|| bad(format!("unknown array element type {}", elem_raw as i32)))?;
            let n = r.count(elem.min_size(), &|| format!("array {key:?} element"))?;
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(read_value(r, key, elem as u32, depth + 1)?);
            }
            Value::Array(elem, items)
        }
    })
}

/// Typed access to metadata. Scalars accept any integer (or float) type whose value fits;
/// arrays must have exactly the element type the key needs.
impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn wrong(key: &str, want: &str, v: &Value) -> GgufError {
        GgufError::BadValue { key: key.into(), msg: format!("must be {want}, found {}", v.value_type().name()) }
    }

    fn missing(key: &str) -> GgufError {
        GgufError::BadValue { key: key.into(), msg: "missing".into() }
    }

    /// An integer in `0..=u32::MAX`; `Ok(None)` when the key is absent.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let i = v.as_int().ok_or_else(|| Self::wrong(key, "an integer", v))?;
        u32::try_from(i)
            .map(Some)
            .map_err(|_| GgufError::BadValue { key: key.into(), msg: format!("{i} is out of range") })
    }

    pub fn u32(&self, key: &str) -> Result<u32, GgufError> {
        self.opt_u32(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(f)) => Ok(Some(*f)),
            Some(Value::F64(f)) => Ok(Some(*f as f32)),
            Some(v) => Err(Self::wrong(key, "f32", v)),
        }
    }

    pub fn f32(&self, key: &str) -> Result<f32, GgufError> {
        self.opt_f32(key)?.ok_or_else(|| Self::missing(key))
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => std::str::from_utf8(s)
                .map(Some)
                .map_err(|_| GgufError::BadValue { key: key.into(), msg: "not valid UTF-8".into() }),
            Some(v) => Err(Self::wrong(key, "a string", v)),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_str(key)?.ok_or_else(|| Self::missing(key))
    }

    /// The elements of an array whose element type must be `elem`.
    pub fn array(&self, key: &str, elem: ValueType) -> Result<&[Value], GgufError> {
        match self.get(key) {
            None => Err(Self::missing(key)),
            Some(Value::Array(t, items)) if *t == elem => Ok(items),
            Some(Value::Array(t, _)) => Err(GgufError::BadValue {
                key: key.into(),
                msg: format!("must be an array of {}, found an array of {}", elem.name(), t.name()),
            }),
            Some(v) => Err(Self::wrong(key, &format!("an array of {}", elem.name()), v)),
        }
    }
}
