//! Tensor types: ggml's type ids, with their block and row sizes.

use std::ffi::CStr;

use llama_cpp_sys_2 as sys;

use super::kernels::kernels;

/// A ggml tensor type that this build of ggml knows.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Type(pub(super) sys::ggml_type);

impl std::fmt::Debug for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Type {
    pub const F32: Type = Type(sys::GGML_TYPE_F32);
    pub const F16: Type = Type(sys::GGML_TYPE_F16);
    pub const Q4_0: Type = Type(sys::GGML_TYPE_Q4_0);
    pub const Q8_0: Type = Type(sys::GGML_TYPE_Q8_0);
    pub const Q2_K: Type = Type(sys::GGML_TYPE_Q2_K);
    pub const Q3_K: Type = Type(sys::GGML_TYPE_Q3_K);
    pub const IQ4_XS: Type = Type(sys::GGML_TYPE_IQ4_XS);
    pub const IQ3_S: Type = Type(sys::GGML_TYPE_IQ3_S);
    pub const IQ3_XXS: Type = Type(sys::GGML_TYPE_IQ3_XXS);
    pub const IQ2_S: Type = Type(sys::GGML_TYPE_IQ2_S);
    pub const IQ2_XS: Type = Type(sys::GGML_TYPE_IQ2_XS);
    pub const IQ2_XXS: Type = Type(sys::GGML_TYPE_IQ2_XXS);
    pub const Q4_K: Type = Type(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: Type = Type(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: Type = Type(sys::GGML_TYPE_Q6_K);
    pub const I32: Type = Type(sys::GGML_TYPE_I32);
    pub const I8: Type = Type(sys::GGML_TYPE_I8);

    /// The type with this id, if ggml has it (ids of removed types answer `None`).
    pub fn from_raw(id: u32) -> Option<Type> {
        if id >= sys::GGML_TYPE_COUNT {
            return None;
        }
        // SAFETY: id < GGML_TYPE_COUNT, the bound ggml_get_type_traits asserts; it returns a
        // pointer into a static table.
        let traits = unsafe { &*sys::ggml_get_type_traits(id) };
        (traits.blck_size > 0 && traits.type_size > 0 && !traits.type_name.is_null())
            .then_some(Type(id))
    }

    pub fn raw(self) -> u32 {
        self.0
    }

    pub(super) fn traits(self) -> &'static sys::ggml_type_traits {
        // SAFETY: a Type only exists for ids that from_raw accepted (or the constants above).
        unsafe { &*sys::ggml_get_type_traits(self.0) }
    }

    pub fn name(self) -> &'static str {
        // SAFETY: type_name is a static NUL-terminated string (checked non-null in from_raw).
        unsafe { CStr::from_ptr(self.traits().type_name) }
            .to_str()
            .unwrap_or("?")
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.traits().blck_size as u64
    }

    pub fn is_quantized(self) -> bool {
        self.traits().is_quantized
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().type_size as u64
    }

    /// Bytes of one row of `n` elements (`n` a multiple of the block size).
    pub fn row_size(self, n: u64) -> u64 {
        n / self.block_size() * self.type_size()
    }

    /// Whether ggml's CPU backend can multiply with this type and convert it to f32 (what a
    /// weight needs for `mul_mat` and `get_rows`).
    pub fn cpu_supported(self) -> bool {
        // SAFETY: valid type id; ggml_get_type_traits_cpu returns a pointer into a static table.
        let cpu = unsafe { &*(kernels().type_traits)(self.0) };
        cpu.vec_dot.is_some() && (self == Type::F32 || self.traits().to_float.is_some())
    }
}

/// f32 → f16 bits (ggml's conversion).
pub fn f32_to_f16(v: f32) -> u16 {
    // SAFETY: pure conversion.
    unsafe { sys::ggml_fp32_to_fp16(v) }
}
