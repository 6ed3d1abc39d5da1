//! The errors of evaluation and of sessions, shared by the forward pass, the scheduler, sessions
//! and the C boundary.

use crate::ggml;

/// Why an evaluation did not complete.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EvalError {
    #[error("context full: {needed} positions needed, the session holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary (0..{n_vocab})")]
    BadToken { id: u32, n_vocab: usize },
    #[error("cancelled")]
    Cancelled,
    #[error("a batched decode step failed (see the error of the session that ran it)")]
    StepFailed,
    #[error("{0}")]
    Alloc(#[from] ggml::AllocError),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the prompt needs {needed} positions but the context holds {n_ctx}")]
    ContextOverflow { needed: usize, n_ctx: usize },
    #[error("{0}")]
    BadParams(String),
    /// The constraint does not compile, or failed during the generation.
    #[error("format: {0}")]
    Constraint(String),
    #[error("{0}")]
    Eval(#[from] EvalError),
}
