//! The limits and defaults of sessions and schedulers, in one place: the library checks against
//! them, the C header states them (`PHI4_MAX_CONTEXT`, …: compile-time checked equal), and the
//! CLI's help and the server's messages print them.

/// The largest context a session may have (Phi-4's 16K), whatever a file claims.
pub const MAX_CONTEXT: usize = 16384;
/// The context of a session that asks for none (`n_ctx: 0`), if the model's is not smaller.
pub const DEFAULT_CONTEXT: usize = 4096;
/// Prompt tokens per micro-batch, unless a session asks for another number.
pub const DEFAULT_BATCH: usize = 512;
/// The most threads a session or scheduler may ask for. More than [`cpu_count`] are accepted
/// and clamped to it: threads beyond the CPUs only wait for each other.
pub const MAX_THREADS: usize = 512;
/// The most sessions one step of a scheduler may take.
pub const MAX_BATCH: usize = 64;

/// CPUs this process may run on (its affinity mask and CPU quota considered).
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `n_threads` in 1..=[`MAX_THREADS`], or why not.
pub fn check_threads(n_threads: usize) -> Result<(), String> {
    if (1..=MAX_THREADS).contains(&n_threads) {
        Ok(())
    } else {
        Err(format!(
            "n_threads {n_threads} must be at least 1 and at most {MAX_THREADS}"
        ))
    }
}

/// `max_batch` in 1..=[`MAX_BATCH`], or why not.
pub fn check_max_batch(max_batch: usize) -> Result<(), String> {
    if (1..=MAX_BATCH).contains(&max_batch) {
        Ok(())
    } else {
        Err(format!("max_batch {max_batch} must be in 1..={MAX_BATCH}"))
    }
}

/// The most calls one reply may make when parallel tool calls are allowed.
pub const MAX_TOOL_CALLS: usize = 16;
/// The most alternatives a generated token's log-probabilities may list (OpenAI's and Ollama's 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The most tokens a generation may draft per step ([`crate::GenerateParams::draft`]).
pub const MAX_DRAFT: usize = 16;
/// The most sessions whose drafts one step of a scheduler verifies (the others' tokens wait
/// for the next step): what a step's compute buffer is sized for, with a logits row per token.
pub const VERIFY_PER_STEP: usize = 4;
/// Tokens drafted per step unless a generation asks otherwise: prompt lookup starts at 3 and
/// climbs to this while its drafts are right (a step of 8 tokens, the kernels' block); replies
/// that do not repeat their input are hardly drafted at all (README: Speculative decoding).
pub const DEFAULT_DRAFT: usize = 7;
