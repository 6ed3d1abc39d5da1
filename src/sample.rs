//! Sampling: choosing the next token from the logits.
//!
//! The chain, in llama.cpp's order: penalties over the recent tokens (repeat, frequency,
//! presence) → top-k → top-p → min-p → temperature → a draw from a seeded generator. At
//! temperature 0 the choice is greedy (after the penalties).

/// Declares [`SamplingParams`] from one table: each option's name (Ollama's), type, default and
/// help, so that the struct, its defaults and the by-name access of the CLI, the REPL and the
/// server cannot drift apart.
macro_rules! sampling_params {
    ($( $(#[doc = $doc:literal])+ $name:ident: $ty:ty = $default:expr, )*) => {
        /// Sampling parameters. `Default` gives Ollama's defaults.
        #[derive(Debug, Clone, PartialEq)]
        pub struct SamplingParams {
            $( $(#[doc = $doc])+ pub $name: $ty, )*
        }

        impl Default for SamplingParams {
            fn default() -> Self {
                SamplingParams { $( $name: $default, )* }
            }
        }

        impl SamplingParams {
            /// Every option: (name, help).
            pub const OPTIONS: &'static [(&'static str, &'static str)] = &[ $( (stringify!($name), concat!($($doc),+)), )* ];

            /// Set an option by name from its text form (checked by [`SamplingParams::validate`]
            /// only when asked).
            pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
                match name {
                    $( stringify!($name) => self.$name = OptionValue::parse(name, value)?, )*
                    _ => return Err(format!("unknown option {name:?}")),
                }
                Ok(())
            }

            /// An option's value in text form, by name.
            pub fn get(&self, name: &str) -> Option<String> {
                match name {
                    $( stringify!($name) => Some(self.$name.show()), )*
                    _ => None,
                }
            }
        }
    };
}

sampling_params! {
    /// Softmax temperature; 0 is greedy.
    temperature: f32 = 0.8,
    /// Keep the k most likely tokens; 0 keeps all.
    top_k: usize = 40,
    /// Keep the smallest set of tokens whose probability reaches p; 1 keeps all.
    top_p: f32 = 0.9,
    /// Drop tokens less likely than min_p times the most likely one; 0 keeps all.
    min_p: f32 = 0.0,
    /// Divide positive (multiply negative) logits of recently seen tokens; 1 is off.
    repeat_penalty: f32 = 1.1,
    /// How many recent tokens the penalties look at; 0 is off.
    repeat_last_n: usize = 64,
    /// Subtracted from a token's logit once per occurrence in the window.
    frequency_penalty: f32 = 0.0,
    /// Subtracted from a token's logit once if it occurs in the window.
    presence_penalty: f32 = 0.0,
    /// Seed of the random draw: the same seed and inputs give the same tokens; none ("random") draws a fresh seed per generation.
    seed: Option<u64> = None,
}

/// The text form of an option's value.
trait OptionValue: Sized {
    fn parse(name: &str, v: &str) -> Result<Self, String>;
    fn show(&self) -> String;
}

impl OptionValue for f32 {
    fn parse(name: &str, v: &str) -> Result<f32, String> {
        v.trim()
            .parse()
            .map_err(|_| format!("{name} takes a number, not {v:?}"))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl OptionValue for usize {
    fn parse(name: &str, v: &str) -> Result<usize, String> {
        v.trim()
            .parse()
            .map_err(|_| format!("{name} takes a whole number >= 0, not {v:?}"))
    }
    fn show(&self) -> String {
        self.to_string()
    }
}

impl OptionValue for Option<u64> {
    fn parse(name: &str, v: &str) -> Result<Option<u64>, String> {
        match v.trim() {
            "random" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{name} takes a whole number >= 0 or \"random\", not {v:?}")),
        }
    }
    fn show(&self) -> String {
        self.map_or("random".into(), |s| s.to_string())
    }
}

/// A seed for a generation that was given none: different every call (the clock, the process
/// and a counter, mixed; no thread-local state, so it works while a thread exits).
pub(crate) fn fresh_seed() -> u64 {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut r =
        Rng::new(nanos ^ (std::process::id() as u64) << 40 ^ n.wrapping_mul(0xA076_1D64_78BD_642F));
    r.next_u64()
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            ..Default::default()
        }
    }

    /// Every value in its range, or the name of the first that is not.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f32| v.is_finite();
        if !(finite(self.temperature) && self.temperature >= 0.0) {
            return Err(format!("temperature {} must be >= 0", self.temperature));
        }
        if !(finite(self.top_p) && self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} must be in (0, 1]", self.top_p));
        }
        if !(finite(self.min_p) && (0.0..=1.0).contains(&self.min_p)) {
            return Err(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(finite(self.repeat_penalty) && self.repeat_penalty > 0.0) {
            return Err(format!(
                "repeat_penalty {} must be > 0",
                self.repeat_penalty
            ));
        }
        if !finite(self.frequency_penalty) || !finite(self.presence_penalty) {
            return Err("frequency_penalty and presence_penalty must be finite".into());
        }
        Ok(())
    }
}

/// A small deterministic PRNG (splitmix64): fast, and the same on every platform.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A sampler: the parameters and the state of the seeded generator.
pub struct Sampler {
    p: SamplingParams,
    rng: Rng,
    cand: Vec<(u32, f32)>,
    window: Vec<u32>,
}

impl Sampler {
    pub fn new(p: SamplingParams) -> Sampler {
        let rng = Rng::new(p.seed.unwrap_or_else(fresh_seed));
        Sampler {
            p,
            rng,
            cand: Vec::new(),
            window: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.p
    }

    /// Choose the next token given the logits and the tokens so far (for the penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.p;
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
        apply_penalties(
            &mut self.cand,
            window,
            &mut self.window,
            p.repeat_penalty,
            p.frequency_penalty,
            p.presence_penalty,
        );
        if p.temperature <= 0.0 {
            return argmax_cand(&self.cand);
        }
        // Most likely first (ties: lower id first, for determinism). With top_k, only the k
        // best are sorted: the same k, in the same order, as sorting them all.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.cand.len() {
            self.cand.select_nth_unstable_by(p.top_k - 1, order);
            self.cand.truncate(p.top_k);
        }
        self.cand.sort_unstable_by(order);
        // Tokens masked out (-inf, by a constraint) are never candidates.
        let allowed = self.cand.partition_point(|c| c.1 > f32::NEG_INFINITY);
        self.cand.truncate(allowed.max(1));
        let probs = softmax(&self.cand, 1.0);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs.iter().position(|&q| {
                acc += q;
                acc >= p.top_p
            });
            self.cand.truncate(keep.map_or(probs.len(), |k| k + 1));
        }
        if p.min_p > 0.0 {
            let probs = softmax(&self.cand, 1.0);
            let cut = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&q| q >= cut).count().max(1);
            self.cand.truncate(keep);
        }
        let probs = softmax(&self.cand, p.temperature);
        let r = self.rng.uniform();
        let mut acc = 0.0;
        for (c, q) in self.cand.iter().zip(&probs) {
            acc += q;
            if r < acc {
                return c.0;
            }
        }
        self.cand.last().map_or(0, |c| c.0)
    }
}

/// Penalize each distinct token of `window` once (its count for the frequency penalty); `sorted`
/// is scratch space.
fn apply_penalties(
    cand: &mut [(u32, f32)],
    window: &[u32],
    sorted: &mut Vec<u32>,
    repeat: f32,
    freq: f32,
    presence: f32,
) {
    if window.is_empty() || (repeat == 1.0 && freq == 0.0 && presence == 0.0) {
        return;
    }
    sorted.clear();
    sorted.extend_from_slice(window);
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a == b) {
        let (t, n) = (run[0], run.len());
        if let Some(c) = cand.get_mut(t as usize) {
            if c.1 > 0.0 {
                c.1 /= repeat;
            } else {
                c.1 *= repeat;
            }
            c.1 -= n as f32 * freq + presence;
        }
    }
}

/// softmax(logit / t) over candidates, in their order.
fn softmax(cand: &[(u32, f32)], t: f32) -> Vec<f32> {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut e: Vec<f32> = cand.iter().map(|c| ((c.1 - max) / t).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter_mut().for_each(|v| *v /= sum);
    e
}

fn argmax_cand(cand: &[(u32, f32)]) -> u32 {
    let mut best = 0;
    for (i, c) in cand.iter().enumerate() {
        if c.1 > cand[best].1 {
            best = i;
        }
    }
    cand[best].0
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}
