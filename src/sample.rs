//! Sampling: picking the next token from the logits.

/// Picks tokens: greedy at temperature 0, otherwise from softmax(logits / temperature).
pub struct Sampler {
    temperature: f32,
    rng: u64,
    probs: Vec<f32>,
}

impl Sampler {
    pub fn new(temperature: f32, seed: u64) -> Sampler {
        Sampler { temperature, rng: seed ^ 0x9E37_79B9_7F4A_7C15, probs: Vec::new() }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits[argmax(logits) as usize];
        self.probs.clear();
        self.probs.extend(logits.iter().map(|&l| ((l - max) / self.temperature).exp()));
        let total: f32 = self.probs.iter().sum();
        let mut r = self.uniform() * total;
        for (i, &p) in self.probs.iter().enumerate() {
            r -= p;
            if r <= 0.0 {
                return i as u32;
            }
        }
        argmax(logits)
    }

    fn uniform(&mut self) -> f32 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
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
