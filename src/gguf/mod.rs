//! GGUF files: the types of a header (metadata values, tensor infos), the reader ([`parse`], from a
//! byte slice: the mmap, or a fuzzer's input) and a streaming [`Writer`].
//!
//! Invariants a successful [`parse`] guarantees to the rest of the crate:
//! - every count was bounded by the bytes left in the file before anything was allocated for it;
//! - keys and tensor names are unique, valid UTF-8;
//! - every tensor has 1..=4 dimensions, each >= 1, a type ggml knows, a row length that is a
//!   multiple of the type's block size, and an element and byte count that fit in `i64`;
//! - tensor data ranges are aligned, in file order, do not overlap, and lie inside the file.
//!
//! Nothing here reads tensor data; it only proves where the data is.

mod read;
mod write;

use crate::hash::Map;

pub use read::parse;
pub use write::Writer;

/// Encode rows of f32 values as a tensor type, as a GGUF file stores them, and decode them.
pub use crate::ggml::{dequantize, quantize};

/// Parse the header of the GGUF file at `path`. The file is mapped, not read: only the pages of
/// the header are touched, however large the file.
pub fn parse_file(path: &std::path::Path) -> Result<Gguf, GgufError> {
    let map = crate::ggml::map_path(path).map_err(|e| GgufError::Io {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    parse(&map)
}

/// A tensor's element type (ggml's type ids; the quantized types store blocks of elements).
pub use crate::ggml::Type as TensorType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// Why a file is not a usable GGUF file. Each message names the key, tensor or field at fault.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GgufError {
    /// The file could not be opened or mapped ([`parse_file`]).
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    #[error("not a GGUF file (magic bytes {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (phi4 reads versions 2 and 3)")]
    BadVersion(u32),
    #[error("file truncated: {what} needs {need} bytes at offset {at}, but the file has {len}")]
    Truncated {
        what: String,
        at: u64,
        need: u64,
        len: u64,
    },
    #[error(
        "{what} count {count} is impossible: the {left} bytes left in the file hold at most {max}"
    )]
    CountTooLarge {
        what: String,
        count: u64,
        left: u64,
        max: u64,
    },
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
    BadOffset {
        name: String,
        offset: u64,
        msg: String,
    },
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
    pub(crate) fn from_u32(v: u32) -> Option<Self> {
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
    pub(crate) fn min_size(self) -> u64 {
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
    Array(Array),
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

/// An array of metadata values, stored by element type: no more memory than its bytes in the file
/// (a string costs its bytes and one offset). Arrays of arrays are not supported (nor by
/// llama.cpp).
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Strings),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl Array {
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Byte strings packed into one buffer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Strings {
    bytes: Vec<u8>,
    /// End of each string in `bytes`.
    ends: Vec<usize>,
}

impl Strings {
    pub fn with_capacity(n: usize) -> Strings {
        Strings {
            bytes: Vec::new(),
            ends: Vec::with_capacity(n),
        }
    }

    pub fn push(&mut self, s: &[u8]) {
        self.bytes.extend_from_slice(s);
        self.ends.push(self.bytes.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.bytes[start..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index in range"))
    }
}

impl<S: AsRef<[u8]>> FromIterator<S> for Strings {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Strings {
        let mut out = Strings::default();
        iter.into_iter().for_each(|s| out.push(s.as_ref()));
        out
    }
}

/// One tensor's header entry, with its data range proven inside the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length. Unused trailing dimensions are 1.
    pub dims: [u64; 4],
    pub n_dims: usize,
    pub ggml_type: TensorType,
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
    index: Map<String, usize>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
    /// Total file length the header was checked against.
    pub file_len: u64,
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
        GgufError::BadValue {
            key: key.into(),
            msg: format!("must be {want}, found {}", v.value_type().name()),
        }
    }

    fn missing(key: &str) -> GgufError {
        GgufError::BadValue {
            key: key.into(),
            msg: "missing".into(),
        }
    }

    /// An integer in `0..=u32::MAX`; `Ok(None)` when the key is absent.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let i = v
            .as_int()
            .ok_or_else(|| Self::wrong(key, "an integer", v))?;
        u32::try_from(i).map(Some).map_err(|_| GgufError::BadValue {
            key: key.into(),
            msg: format!("{i} is out of range"),
        })
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
            Some(Value::String(s)) => {
                std::str::from_utf8(s)
                    .map(Some)
                    .map_err(|_| GgufError::BadValue {
                        key: key.into(),
                        msg: "not valid UTF-8".into(),
                    })
            }
            Some(v) => Err(Self::wrong(key, "a string", v)),
        }
    }

    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_str(key)?.ok_or_else(|| Self::missing(key))
    }

    /// An array whose element type must be `elem`.
    pub fn array(&self, key: &str, elem: ValueType) -> Result<&Array, GgufError> {
        match self.get(key) {
            None => Err(Self::missing(key)),
            Some(Value::Array(a)) if a.elem_type() == elem => Ok(a),
            Some(Value::Array(a)) => Err(GgufError::BadValue {
                key: key.into(),
                msg: format!(
                    "must be an array of {}, found an array of {}",
                    elem.name(),
                    a.elem_type().name()
                ),
            }),
            Some(v) => Err(Self::wrong(key, &format!("an array of {}", elem.name()), v)),
        }
    }

    /// An array of strings.
    pub fn strings(&self, key: &str) -> Result<&Strings, GgufError> {
        match self.array(key, ValueType::String)? {
            Array::String(s) => Ok(s),
            _ => unreachable!("array() checked the element type"),
        }
    }

    /// An array of i32.
    pub fn i32s(&self, key: &str) -> Result<&[i32], GgufError> {
        match self.array(key, ValueType::I32)? {
            Array::I32(v) => Ok(v),
            _ => unreachable!("array() checked the element type"),
        }
    }
}
