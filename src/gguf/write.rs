//! Writing a GGUF (v3) file as a stream: the header first, then each tensor's data in the order
//! the header declared it.

use std::io::{self, BufWriter, Seek, Write};
use std::path::Path;

use super::{Array, TensorType, Value, DEFAULT_ALIGNMENT, MAGIC};

/// A streaming GGUF writer (alignment 32).
pub struct Writer {
    out: BufWriter<std::fs::File>,
    sizes: Vec<u64>,
    next: usize,
}

fn pad_to(out: &mut impl Write, pos: u64) -> io::Result<u64> {
    let padded = pos.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
    out.write_all(&vec![0u8; (padded - pos) as usize])?;
    Ok(padded)
}

impl Writer {
    pub fn create(path: &Path) -> io::Result<Writer> {
        let out = BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?);
        Ok(Writer {
            out,
            sizes: Vec::new(),
            next: 0,
        })
    }

    /// Write the header: metadata, then tensor infos (name, shape in ggml order, type).
    pub fn header<'a>(
        &mut self,
        kv: &[(String, Value)],
        tensors: impl Iterator<Item = (&'a str, &'a [u64], TensorType)>,
    ) -> io::Result<()> {
        let tensors: Vec<_> = tensors.collect();
        let o = &mut self.out;
        o.write_all(MAGIC)?;
        o.write_all(&3u32.to_le_bytes())?;
        o.write_all(&(tensors.len() as u64).to_le_bytes())?;
        o.write_all(&(kv.len() as u64).to_le_bytes())?;
        for (k, v) in kv {
            write_str(o, k.as_bytes())?;
            o.write_all(&(v.value_type() as u32).to_le_bytes())?;
            write_value(o, v)?;
        }
        let mut offset = 0u64;
        for (name, ne, ty) in &tensors {
            write_str(o, name.as_bytes())?;
            o.write_all(&(ne.len() as u32).to_le_bytes())?;
            for d in *ne {
                o.write_all(&d.to_le_bytes())?;
            }
            o.write_all(&ty.raw().to_le_bytes())?;
            o.write_all(&offset.to_le_bytes())?;
            let size = ty.row_size(ne[0]) * ne[1..].iter().product::<u64>();
            self.sizes.push(size);
            offset += size.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let pos = o.stream_position()?;
        pad_to(o, pos)?;
        Ok(())
    }

    /// The next tensor's data (exactly its size).
    pub fn tensor_data(&mut self, data: &[u8]) -> io::Result<()> {
        match self.sizes.get(self.next) {
            Some(&size) if size == data.len() as u64 => {}
            want => {
                let msg = format!(
                    "tensor #{}: {} bytes of data, the header declared {want:?}",
                    self.next,
                    data.len()
                );
                return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
            }
        }
        self.next += 1;
        self.out.write_all(data)?;
        pad_to(&mut self.out, data.len() as u64)?;
        Ok(())
    }

    /// Flush; returns the file size. Every declared tensor's data must have been written.
    pub fn finish(mut self) -> io::Result<u64> {
        if self.next != self.sizes.len() {
            let msg = format!(
                "{} of {} tensors' data written",
                self.next,
                self.sizes.len()
            );
            return Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        }
        self.out.flush()?;
        self.out.stream_position()
    }
}

fn write_str(o: &mut impl Write, s: &[u8]) -> io::Result<()> {
    o.write_all(&(s.len() as u64).to_le_bytes())?;
    o.write_all(s)
}

fn write_value(o: &mut impl Write, v: &Value) -> io::Result<()> {
    match v {
        Value::U8(x) => o.write_all(&[*x]),
        Value::I8(x) => o.write_all(&x.to_le_bytes()),
        Value::U16(x) => o.write_all(&x.to_le_bytes()),
        Value::I16(x) => o.write_all(&x.to_le_bytes()),
        Value::U32(x) => o.write_all(&x.to_le_bytes()),
        Value::I32(x) => o.write_all(&x.to_le_bytes()),
        Value::F32(x) => o.write_all(&x.to_le_bytes()),
        Value::Bool(x) => o.write_all(&[*x as u8]),
        Value::String(s) => write_str(o, s),
        Value::U64(x) => o.write_all(&x.to_le_bytes()),
        Value::I64(x) => o.write_all(&x.to_le_bytes()),
        Value::F64(x) => o.write_all(&x.to_le_bytes()),
        Value::Array(a) => {
            o.write_all(&(a.elem_type() as u32).to_le_bytes())?;
            o.write_all(&(a.len() as u64).to_le_bytes())?;
            write_array(o, a)
        }
    }
}

fn write_array(o: &mut impl Write, a: &Array) -> io::Result<()> {
    macro_rules! each {
        ($v:expr) => {
            $v.iter().try_for_each(|x| o.write_all(&x.to_le_bytes()))
        };
    }
    match a {
        Array::U8(v) => o.write_all(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => v.iter().try_for_each(|&b| o.write_all(&[b as u8])),
        Array::String(v) => v.iter().try_for_each(|s| write_str(o, s)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}
