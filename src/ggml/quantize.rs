//! Encoding f32 rows as a tensor type, as GGUF files store them, and decoding them.

use llama_cpp_sys_2 as sys;

use super::types::Type;

/// Encode rows of `n_per_row` f32 values as `ty` (F32, F16, or a quantized type below), as they
/// are stored in a GGUF file. The types ggml quantizes only with an importance matrix (IQ2_XS,
/// IQ2_XXS) are given one that weighs every column alike.
pub fn quantize(ty: Type, src: &[f32], n_per_row: usize) -> Result<Vec<u8>, String> {
    if n_per_row == 0
        || !src.len().is_multiple_of(n_per_row)
        || !(n_per_row as u64).is_multiple_of(ty.block_size())
    {
        return Err(format!(
            "{} values in rows of {n_per_row} do not make whole {ty:?} blocks of {}",
            src.len(),
            ty.block_size()
        ));
    }
    let nrows = src.len() / n_per_row;
    let mut out = vec![0u8; ty.row_size(n_per_row as u64) as usize * nrows];
    if ty == Type::F32 {
        out.iter_mut()
            .zip(src.iter().flat_map(|v| v.to_le_bytes()))
            .for_each(|(o, b)| *o = b);
        return Ok(out);
    }
    // ggml_quantize_chunk aborts on a type it has no quantizer for: only these are passed on.
    if ![
        Type::F16,
        Type::Q4_0,
        Type::Q8_0,
        Type::Q2_K,
        Type::Q3_K,
        Type::Q4_K,
        Type::Q5_K,
        Type::Q6_K,
        Type::IQ4_XS,
        Type::IQ3_S,
        Type::IQ3_XXS,
        Type::IQ2_S,
        Type::IQ2_XS,
        Type::IQ2_XXS,
    ]
    .contains(&ty)
    {
        return Err(format!(
            "{ty:?} cannot be written here (f32, f16, q4_0, q8_0, q2_K, q3_K, q4_K, q5_K, q6_K, iq4_xs, iq3_s, iq3_xxs, iq2_s, iq2_xs, iq2_xxs)"
        ));
    }
    // SAFETY: a query of ggml's type table; ty is one of the types above.
    let uniform =
        unsafe { sys::ggml_quantize_requires_imatrix(ty.0) }.then(|| vec![1.0f32; n_per_row]);
    let imatrix = uniform.as_ref().map_or(std::ptr::null(), |u| u.as_ptr());
    // SAFETY: src holds nrows*n_per_row floats, out holds nrows rows of ty, the importance
    // matrix (where ggml asks for one) n_per_row floats.
    unsafe {
        sys::ggml_quantize_init(ty.0);
        sys::ggml_quantize_chunk(
            ty.0,
            src.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            nrows as i64,
            n_per_row as i64,
            imatrix,
        );
    }
    Ok(out)
}

/// Decode rows of `n_per_row` values of `ty` (as a GGUF file stores them) to f32.
pub fn dequantize(ty: Type, bytes: &[u8], n_per_row: usize) -> Result<Vec<f32>, String> {
    let Some(to_float) = ty.traits().to_float else {
        return Err(format!("{ty:?} has no decoder to f32"));
    };
    let row = ty.row_size(n_per_row as u64) as usize;
    if n_per_row == 0
        || !(n_per_row as u64).is_multiple_of(ty.block_size())
        || !bytes.len().is_multiple_of(row)
    {
        return Err(format!(
            "{} bytes are not whole rows of {n_per_row} {ty:?} values",
            bytes.len()
        ));
    }
    let mut out = vec![0f32; bytes.len() / row * n_per_row];
    // SAFETY: bytes holds whole rows (whole blocks) of ty, out one f32 per value they code.
    unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), out.len() as i64) };
    Ok(out)
}
