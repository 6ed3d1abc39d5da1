//! phi4: Phi-4 inference on ggml's CPU kernels, with a small stable C ABI.
//! See ARCHITECTURE.md for the map of the code.

pub mod forward;
pub mod ggml;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod sample;
pub mod synth;
pub mod chat;
pub mod tokenizer;
pub mod session;
#[allow(non_camel_case_types)]
pub mod ffi;
