//! phi4: Phi-4 inference on ggml's CPU kernels, with a small stable C ABI.
//!
//! Load a [`Model`] from a GGUF file, open a [`Session`] on it, and chat:
//!
//! ```no_run
//! use std::sync::Arc;
//! use phi4::{chat::{Message, Role}, GenerateParams, Model, Session, SessionParams};
//!
//! let model = Arc::new(Model::load("phi4.gguf".as_ref(), Default::default())?);
//! let mut session = Session::new(model, &SessionParams::default())?;
//! let messages = [Message::new(Role::User, "Hello!")];
//! let outcome = session.chat(&messages, &GenerateParams::default(), &mut |_, piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! println!("\n({} tokens, {})", outcome.timings.eval_count, outcome.reason.as_str());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See ARCHITECTURE.md for the map of the code.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod chat;
pub mod constrain;
pub mod draft;
pub mod error;
pub mod gguf;
pub mod limits;
pub mod matmul;
pub mod memory;
pub mod model;
pub mod sample;
pub mod scheduler;
pub mod session;
pub mod state;
pub mod tokenizer;
pub mod tools;

mod ffi;
mod forward;
mod ggml;
mod governor;
mod hash;
mod kv_cache;
mod pretokenizer;

pub use constrain::Constraint;
pub use draft::{Drafter, PromptLookup};
pub use error::{EvalError, SessionError};
pub use kv_cache::KvType;
pub use model::{Config, LoadError, LoadParams, Model, Resident};
pub use sample::SamplingParams;
pub use scheduler::Scheduler;
pub use session::{
    DoneReason, GenerateParams, Logprob, Outcome, Overflow, Session, SessionParams, Token,
};
pub use state::StateError;
pub use tools::{Tool, ToolCall, ToolChoice, Tools};

/// CPU features ggml uses on this machine, by name (e.g. `["SSE3", "AVX", "AVX2", "F16C", "FMA"]`):
/// those of the kernel variant that runs ([`cpu_variant`]).
pub fn cpu_features() -> Vec<&'static str> {
    ggml::cpu_features()
}

/// The CPU kernel variant that runs: the best one of this build that the CPU and the OS
/// support, chosen once per process (e.g. "avx2", "avx512_vnni"; "armv8-a", "dotprod", "i8mm").
/// The environment variable `PHI4_CPU_VARIANT` may name another supported one.
pub fn cpu_variant() -> &'static str {
    ggml::cpu_variant()
}

/// Every CPU kernel variant of this build, best first, with whether this machine runs it.
pub fn cpu_variants() -> Vec<(&'static str, bool)> {
    ggml::cpu_variants()
}
