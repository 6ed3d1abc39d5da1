//! Parsing a GGUF header from bytes: `parse` = header → metadata → tensor infos → data placement.
//! Every count is bounded by the bytes left before anything is allocated for it, and all
//! arithmetic on sizes and offsets is checked.

use super::{
    Array, Gguf, GgufError, Strings, TensorInfo, Value, ValueType, DEFAULT_ALIGNMENT, MAGIC,
};
use crate::ggml;
use crate::hash::{Map, Set};

/// Most metadata entries and tensors a file may declare (Phi-4 files have about 40 and 243):
/// with these, everything parsed costs a small multiple of the file's bytes.
const MAX_KV: u64 = 1 << 16;
const MAX_TENSORS: u64 = 1 << 16;
/// ggml tensor names hold at most 63 bytes plus the terminating NUL.
const MAX_TENSOR_NAME: usize = 63;
/// Fewest bytes of one metadata entry: key (8 + 1) + type (4) + a one-byte value.
const MIN_KV_BYTES: u64 = 14;
/// Fewest bytes of one tensor info: name (8 + 1) + n_dims (4) + one dim (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 33;

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
        self.bound(count, min_item, what)
    }

    /// `count` items of at least `min_item` bytes must fit in what is left.
    fn bound(
        &self,
        count: u64,
        min_item: u64,
        what: &dyn Fn() -> String,
    ) -> Result<u64, GgufError> {
        let max = self.left() / min_item.max(1);
        if count > max {
            return Err(GgufError::CountTooLarge {
                what: what(),
                count,
                left: self.left(),
                max,
            });
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
    let (version, n_tensors, n_kv) = header(&mut r)?;
    let (metadata, index) = metadata(&mut r, n_kv)?;
    let alignment = alignment(index.get("general.alignment").map(|&i| &metadata[i].1))?;
    let mut tensors = tensor_infos(&mut r, n_tensors)?;
    let data_offset = place_data(&mut tensors, r.pos as u64, alignment, bytes.len() as u64)?;
    Ok(Gguf {
        version,
        alignment,
        metadata,
        index,
        tensors,
        data_offset,
        file_len: bytes.len() as u64,
    })
}

/// Magic, version and the two counts (each bounded by the bytes that must follow).
fn header(r: &mut Reader<'_>) -> Result<(u32, u64, u64), GgufError> {
    let magic: [u8; 4] = r.array(&|| "magic".into())?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(GgufError::BadVersion(version));
    }
    let n_tensors = r.u64(&|| "tensor count".into())?;
    let n_kv = r.count(MIN_KV_BYTES, &|| "metadata key/value".into())?;
    // Checked after the KV count is read, against what is left then.
    let n_tensors = r.bound(n_tensors, MIN_TENSOR_INFO_BYTES, &|| "tensor".into())?;
    for (what, count, max) in [
        ("metadata key/value", n_kv, MAX_KV),
        ("tensor", n_tensors, MAX_TENSORS),
    ] {
        if count > max {
            return Err(GgufError::CountTooLarge {
                what: what.into(),
                count,
                left: r.left(),
                max,
            });
        }
    }
    Ok((version, n_tensors, n_kv))
}

type Metadata = (Vec<(String, Value)>, Map<String, usize>);

/// `n_kv` key/value pairs: unique, non-empty UTF-8 keys.
fn metadata(r: &mut Reader<'_>, n_kv: u64) -> Result<Metadata, GgufError> {
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut index = Map::default();
    for i in 0..n_kv {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let key = std::str::from_utf8(key)
            .map_err(|_| GgufError::BadValue {
                key: String::from_utf8_lossy(key).into_owned(),
                msg: "key is not valid UTF-8".into(),
            })?
            .to_owned();
        if key.is_empty() {
            return Err(GgufError::BadValue {
                key,
                msg: "empty key".into(),
            });
        }
        let ty = r.u32(&|| format!("type of metadata key {key:?}"))?;
        let value = read_value(r, &key, ty)?;
        if index.insert(key.clone(), metadata.len()).is_some() {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.push((key, value));
    }
    Ok((metadata, index))
}

/// `general.alignment`: a u32 power of two, 32 when absent.
fn alignment(v: Option<&Value>) -> Result<u64, GgufError> {
    match v {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => Ok(u64::from(*a)),
        Some(Value::U32(a)) => Err(GgufError::BadAlignment(format!(
            "{a} is not a power of two"
        ))),
        Some(v) => Err(GgufError::BadAlignment(format!(
            "must be u32, found {}",
            v.value_type().name()
        ))),
    }
}

/// `n_tensors` tensor infos: unique names, known types, shapes whose sizes fit in i64. Offsets
/// are still relative to the data section.
fn tensor_infos(r: &mut Reader<'_>, n_tensors: u64) -> Result<Vec<TensorInfo>, GgufError> {
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors as usize);
    let mut names = Set::default();
    for i in 0..n_tensors {
        let t = tensor_info(r, i)?;
        if !names.insert(t.name.clone()) {
            return Err(GgufError::DuplicateTensor(t.name));
        }
        tensors.push(t);
    }
    Ok(tensors)
}

fn tensor_info(r: &mut Reader<'_>, i: u64) -> Result<TensorInfo, GgufError> {
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
    let bad = |msg: String| GgufError::BadTensor {
        name: name.clone(),
        msg,
    };
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

    let overflow = |detail: String| GgufError::Overflow {
        what: format!("tensor {name:?}"),
        detail,
    };
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
        .ok_or_else(|| {
            overflow(format!(
                "byte count of {n_elements} {} elements",
                ggml_type.name()
            ))
        })?;
    Ok(TensorInfo {
        name,
        dims,
        n_dims,
        ggml_type,
        file_offset: offset,
        size,
    })
}

/// Make tensor offsets absolute and prove each data range aligned, in order, non-overlapping and
/// inside the file. Returns the data section's offset.
fn place_data(
    tensors: &mut [TensorInfo],
    header_end: u64,
    alignment: u64,
    file_len: u64,
) -> Result<u64, GgufError> {
    let data_offset = align_up(header_end, alignment).ok_or_else(|| GgufError::Overflow {
        what: "data section".into(),
        detail: "aligned start".into(),
    })?;
    let mut next_free = 0u64;
    for t in tensors.iter_mut() {
        let rel = t.file_offset;
        let err = |msg: String| GgufError::BadOffset {
            name: t.name.clone(),
            offset: rel,
            msg,
        };
        if rel % alignment != 0 {
            return Err(err(format!("not a multiple of the alignment {alignment}")));
        }
        if rel < next_free {
            return Err(err(format!(
                "out of order or overlapping: the previous tensor ends at {next_free}"
            )));
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
    Ok(data_offset)
}

pub(super) fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x / a * a)
}

fn read_value(r: &mut Reader<'_>, key: &str, ty: u32) -> Result<Value, GgufError> {
    let bad = |msg: String| GgufError::BadValue {
        key: key.to_owned(),
        msg,
    };
    let ty =
        ValueType::from_u32(ty).ok_or_else(|| bad(format!("unknown value type {}", ty as i32)))?;
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
        ValueType::Bool => Value::Bool(bool_byte(r.array::<1>(&what)?[0]).map_err(bad)?),
        ValueType::String => Value::String(r.string(&what)?.to_vec()),
        ValueType::Array => Value::Array(read_array(r, key)?),
    })
}

fn bool_byte(b: u8) -> Result<bool, String> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        b => Err(format!("bool byte {b} is neither 0 nor 1")),
    }
}

/// An array: element type, count (bounded by the bytes left), elements stored by type.
fn read_array(r: &mut Reader<'_>, key: &str) -> Result<Array, GgufError> {
    let bad = |msg: String| GgufError::BadValue {
        key: key.to_owned(),
        msg,
    };
    let elem_raw = r.u32(&|| format!("element type of {key:?}"))?;
    let elem = ValueType::from_u32(elem_raw)
        .ok_or_else(|| bad(format!("unknown array element type {}", elem_raw as i32)))?;
    if elem == ValueType::Array {
        return Err(bad(
            "arrays of arrays (nested arrays) are not supported".into()
        ));
    }
    let n = r.count(elem.min_size(), &|| format!("array {key:?} element"))? as usize;
    // The count is proven: n elements of at least min_size bytes each are in the file.
    let what = || format!("array {key:?}");
    macro_rules! fixed {
        ($variant:ident, $t:ty) => {{
            let bytes = r.take((n * std::mem::size_of::<$t>()) as u64, &what)?;
            Array::$variant(
                bytes
                    .chunks_exact(std::mem::size_of::<$t>())
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk size")))
                    .collect(),
            )
        }};
    }
    Ok(match elem {
        ValueType::U8 => Array::U8(r.take(n as u64, &what)?.to_vec()),
        ValueType::I8 => Array::I8(r.take(n as u64, &what)?.iter().map(|&b| b as i8).collect()),
        ValueType::U16 => fixed!(U16, u16),
        ValueType::I16 => fixed!(I16, i16),
        ValueType::U32 => fixed!(U32, u32),
        ValueType::I32 => fixed!(I32, i32),
        ValueType::F32 => fixed!(F32, f32),
        ValueType::U64 => fixed!(U64, u64),
        ValueType::I64 => fixed!(I64, i64),
        ValueType::F64 => fixed!(F64, f64),
        ValueType::Bool => Array::Bool(
            r.take(n as u64, &what)?
                .iter()
                .map(|&b| bool_byte(b))
                .collect::<Result<_, _>>()
                .map_err(bad)?,
        ),
        ValueType::String => {
            let mut s = Strings::with_capacity(n);
            for _ in 0..n {
                s.push(r.string(&what)?);
            }
            Array::String(s)
        }
        ValueType::Array => unreachable!("rejected above"),
    })
}
