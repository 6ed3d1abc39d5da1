//! llama.cpp as the reference engine (tests and benchmarks only: the library never calls
//! `llama_*`).

#![allow(dead_code)]

use std::ffi::CString;
use std::path::Path;

use llama_cpp_sys_2 as sys;

pub struct Reference {
    model: *mut sys::llama_model,
    ctx: *mut sys::llama_context,
    pub n_vocab: usize,
    n_batch: usize,
    pub n_past: usize,
}

unsafe extern "C" fn quiet(
    _l: sys::ggml_log_level,
    _t: *const std::ffi::c_char,
    _u: *mut std::ffi::c_void,
) {
}

impl Reference {
    /// Load `path` with llama.cpp: mmap, CPU, F16 KV cache, flash attention, micro-batches of
    /// `n_batch`, `n_threads` threads.
    pub fn load(path: &Path, n_ctx: usize, n_batch: usize, n_threads: usize) -> Reference {
        Self::load_opts(path, n_ctx, n_batch, n_threads, true)
    }

    pub fn load_opts(
        path: &Path,
        n_ctx: usize,
        n_batch: usize,
        n_threads: usize,
        repack: bool,
    ) -> Reference {
        Self::load_seqs(path, n_ctx, n_batch, n_threads, 1, repack, "f16")
    }

    /// As `load`, with K and V cached as `kv` ("f16", "q8_0", "q4_0": llama.cpp's -ctk/-ctv).
    pub fn load_kv(
        path: &Path,
        n_ctx: usize,
        n_batch: usize,
        n_threads: usize,
        kv: &str,
    ) -> Reference {
        Self::load_seqs(path, n_ctx, n_batch, n_threads, 1, true, kv)
    }

    /// As `load_kv`, with `n_seq` sequences of `n_ctx` positions each (as llama-server's
    /// parallel slots: see `eval_seq` and `decode_seqs`), repacked weights or not.
    pub fn load_seqs(
        path: &Path,
        n_ctx: usize,
        n_batch: usize,
        n_threads: usize,
        n_seq: usize,
        repack: bool,
        kv: &str,
    ) -> Reference {
        let kv = match kv {
            "f16" => sys::GGML_TYPE_F16,
            "q8_0" => sys::GGML_TYPE_Q8_0,
            "q4_0" => sys::GGML_TYPE_Q4_0,
            t => panic!("no KV cache type {t}"),
        };
        let model = load_model(path, |mp| mp.use_extra_bufts = repack);
        // SAFETY: test-only FFI with valid arguments; pointers checked for null.
        unsafe {
            let mut cp = sys::llama_context_default_params();
            cp.n_ctx = (n_ctx * n_seq) as u32;
            cp.n_seq_max = n_seq as u32;
            cp.kv_unified = false;
            cp.n_batch = n_batch as u32;
            cp.n_ubatch = n_batch as u32;
            cp.n_threads = n_threads as i32;
            cp.n_threads_batch = n_threads as i32;
            cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_ENABLED;
            cp.type_k = kv;
            cp.type_v = kv;
            cp.no_perf = true;
            let ctx = sys::llama_init_from_model(model, cp);
            assert!(!ctx.is_null(), "llama.cpp failed to make a context");
            let vocab = sys::llama_model_get_vocab(model);
            let n_vocab = sys::llama_vocab_n_tokens(vocab) as usize;
            Reference {
                model,
                ctx,
                n_vocab,
                n_batch,
                n_past: 0,
            }
        }
    }

    /// Only the vocabulary of `path` (for tokenizer comparisons).
    pub fn vocab_only(path: &Path) -> Reference {
        let model = load_model(path, |mp| mp.vocab_only = true);
        // SAFETY: valid model pointer.
        unsafe {
            let n_vocab = sys::llama_vocab_n_tokens(sys::llama_model_get_vocab(model)) as usize;
            Reference {
                model,
                ctx: std::ptr::null_mut(),
                n_vocab,
                n_batch: 1,
                n_past: 0,
            }
        }
    }

    /// Evaluate tokens after what is already in the cache; returns the last token's logits.
    pub fn eval(&mut self, tokens: &[u32]) -> Vec<f32> {
        let mut toks: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        for chunk in toks.chunks_mut(self.n_batch) {
            // SAFETY: the batch points into `chunk`, alive for the call.
            let rc = unsafe {
                sys::llama_decode(
                    self.ctx,
                    sys::llama_batch_get_one(chunk.as_mut_ptr(), chunk.len() as i32),
                )
            };
            assert_eq!(rc, 0, "llama_decode failed");
        }
        self.n_past += tokens.len();
        // SAFETY: the last decode produced logits for its last token (n_vocab floats).
        unsafe {
            std::slice::from_raw_parts(sys::llama_get_logits_ith(self.ctx, -1), self.n_vocab)
                .to_vec()
        }
    }

    /// Evaluate `tokens` of sequence `seq` at positions `n_past..`; returns the last one's logits.
    pub fn eval_seq(&mut self, seq: i32, tokens: &[u32], n_past: usize) -> Vec<f32> {
        let items: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (seq, t, n_past + i))
            .collect();
        let mut last = Vec::new();
        for chunk in items.chunks(self.n_batch) {
            last = self.decode_seqs(chunk).pop().unwrap();
        }
        last
    }

    /// One llama_decode of `(sequence, token, position)` items, logits for each; the way
    /// llama-server advances its parallel slots by a token each.
    pub fn decode_seqs(&mut self, items: &[(i32, u32, usize)]) -> Vec<Vec<f32>> {
        // SAFETY: the batch is made for items.len() tokens of one sequence each and filled
        // within that; freed after the decode; logits read for the rows that asked for them.
        unsafe {
            let b = sys::llama_batch_init(items.len() as i32, 0, 1);
            for (i, &(seq, tok, pos)) in items.iter().enumerate() {
                *b.token.add(i) = tok as i32;
                *b.pos.add(i) = pos as i32;
                *b.n_seq_id.add(i) = 1;
                **b.seq_id.add(i) = seq;
                *b.logits.add(i) = 1;
            }
            let mut batch = b;
            batch.n_tokens = items.len() as i32;
            let rc = sys::llama_decode(self.ctx, batch);
            let out = (0..items.len())
                .map(|i| {
                    std::slice::from_raw_parts(
                        sys::llama_get_logits_ith(self.ctx, i as i32),
                        self.n_vocab,
                    )
                    .to_vec()
                })
                .collect();
            sys::llama_batch_free(b);
            assert_eq!(rc, 0, "llama_decode failed");
            out
        }
    }

    /// Forget the cache.
    pub fn clear(&mut self) {
        // SAFETY: valid context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ctx), true) };
        self.n_past = 0;
    }

    /// Token ids of `text` (no special tokens parsed unless `special`, no BOS).
    pub fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        // SAFETY: buffers sized from llama_tokenize's own answer.
        unsafe {
            let vocab = sys::llama_model_get_vocab(self.model);
            let mut out = vec![0i32; text.len() + 8];
            let mut n = sys::llama_tokenize(
                vocab,
                text.as_ptr().cast(),
                text.len() as i32,
                out.as_mut_ptr(),
                out.len() as i32,
                false,
                special,
            );
            if n < 0 {
                out.resize((-n) as usize, 0);
                n = sys::llama_tokenize(
                    vocab,
                    text.as_ptr().cast(),
                    text.len() as i32,
                    out.as_mut_ptr(),
                    out.len() as i32,
                    false,
                    special,
                );
            }
            assert!(n >= 0);
            out.truncate(n as usize);
            out.into_iter().map(|t| t as u32).collect()
        }
    }
}

/// llama.cpp's embedding of `tokens` with mean pooling (not normalised): the whole text in one
/// micro-batch, `n_threads` threads, the repacked layouts as `repack` says.
pub fn embed_mean(path: &Path, tokens: &[u32], n_threads: usize, repack: bool) -> Vec<f32> {
    let model = load_model(path, |mp| mp.use_extra_bufts = repack);
    let mut toks: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    // SAFETY: test-only FFI with valid arguments; pointers checked for null; the embedding
    // read is n_embd floats of sequence 0, which the decode made; both freed here.
    unsafe {
        let mut cp = sys::llama_context_default_params();
        let n = tokens.len().next_multiple_of(256) as u32;
        (cp.n_ctx, cp.n_batch, cp.n_ubatch) = (n, n, n);
        cp.n_threads = n_threads as i32;
        cp.n_threads_batch = n_threads as i32;
        cp.flash_attn_type = sys::LLAMA_FLASH_ATTN_TYPE_ENABLED;
        cp.embeddings = true;
        cp.pooling_type = sys::LLAMA_POOLING_TYPE_MEAN;
        cp.no_perf = true;
        let ctx = sys::llama_init_from_model(model, cp);
        assert!(!ctx.is_null(), "llama.cpp failed to make a context");
        let batch = sys::llama_batch_get_one(toks.as_mut_ptr(), toks.len() as i32);
        assert_eq!(sys::llama_decode(ctx, batch), 0, "llama_decode failed");
        let n_embd = sys::llama_model_n_embd(model) as usize;
        let p = sys::llama_get_embeddings_seq(ctx, 0);
        assert!(!p.is_null(), "no pooled embedding");
        let v = std::slice::from_raw_parts(p, n_embd).to_vec();
        sys::llama_free(ctx);
        sys::llama_model_free(model);
        v
    }
}

/// Load a model with llama.cpp's default parameters as adjusted by `adjust`.
fn load_model(
    path: &Path,
    adjust: impl FnOnce(&mut sys::llama_model_params),
) -> *mut sys::llama_model {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: test-only FFI with valid arguments; the result is checked for null.
    unsafe {
        sys::llama_log_set(Some(quiet), std::ptr::null_mut());
        sys::llama_backend_init();
        let mut mp = sys::llama_model_default_params();
        adjust(&mut mp);
        let model = sys::llama_model_load_from_file(c.as_ptr(), mp);
        assert!(
            !model.is_null(),
            "llama.cpp failed to load {}",
            path.display()
        );
        model
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        // SAFETY: created in load, freed once.
        unsafe {
            if !self.ctx.is_null() {
                sys::llama_free(self.ctx);
            }
            sys::llama_model_free(self.model);
        }
    }
}

/// The two largest logits' gap: a step whose gap is below the tie tolerance may pick either.
pub fn top2_gap(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &l in logits {
        if l > a {
            b = a;
            a = l;
        } else if l > b {
            b = l;
        }
    }
    a - b
}
