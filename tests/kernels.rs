//! phi4's quantized matrix kernels against ggml's, and every CPU variant's vector path against
//! its scalar path: every weight type, odd shapes, tails of row groups, 1..=17 tokens and more;
//! and each token of a step bit for bit its own one-token step.
//!
//! The weights are random blocks: every bit pattern of a block is one a file may hold, but for
//! its f16 scales, kept finite and small. (ggml's quantizers would make blocks of the values
//! a model has, but their set-up for the grid types alone takes over a minute under an emulator.)
//!
//! ggml's product (its vec_dot over the same Q8_K or Q8_0 activations: the same integers, summed
//! in another order) is the independent reference. The tolerance is relative to the size of the
//! terms summed (Σ|w·x| over a row), 2e-6: float rounding of a few thousand terms, far below
//! the smallest difference a wrong sub-block, scale or bit would make (a weight's share,
//! ≥ 1/k of that sum).

mod common;

use phi4::gguf::{dequantize, quantize, TensorType};
use phi4::matmul::{kernel_variants, Kernels, PackedMatrix, Product, KERNEL_TYPES};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    /// `rows` rows of `k` weights of `ty` as random blocks, and the weights they code.
    fn matrix(&mut self, ty: TensorType, rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let size = ty.type_size() as usize;
        let mut bytes: Vec<u8> = (0..ty.row_size(k as u64) as usize * rows)
            .map(|_| (self.f() * 128.0 + 128.0) as u8)
            .collect();
        for block in bytes.chunks_mut(size) {
            for &at in f16_scales(ty) {
                // f16 bits of 2^-9 × (1 + m/1024), m random.
                let d = 0x1800 | ((self.f().abs() * 1023.0) as u16);
                block[at..at + 2].copy_from_slice(&d.to_le_bytes());
            }
        }
        let w = dequantize(ty, &bytes, k).unwrap();
        (bytes, w)
    }
}

/// Where a block keeps its f16 scales (d, and dmin where it has one; ggml's block structs).
fn f16_scales(ty: TensorType) -> &'static [usize] {
    match ty {
        TensorType::Q2_K => &[80, 82],
        TensorType::Q3_K => &[108],
        TensorType::Q6_K => &[208],
        TensorType::Q4_K | TensorType::Q5_K => &[0, 2],
        _ => &[0],
    }
}

/// Σ_k |w[r][k]·x[t][k]| for every (t, r): the scale each result is compared at.
fn magnitudes(w: &[f32], x: &[f32], rows: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * rows];
    for t in 0..m {
        for r in 0..rows {
            out[t * rows + r] = (0..k).map(|i| (w[r * k + i] * x[t * k + i]).abs()).sum();
        }
    }
    out
}

fn assert_close(what: &str, got: &[f32], want: &[f32], mag: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(mag).enumerate() {
        assert!(
            (g - w).abs() <= 2e-6 * s.max(1e-3),
            "{what}: element {i}: {g} vs {w} (terms {s})"
        );
    }
}

#[test]
fn phi4_kernels_agree_with_ggml_on_every_type_and_shape() {
    let mut rng = Rng(7);
    // Every register-block split of up to 17 tokens and one of 33; under an emulator (set by
    // ports/qemu-test, tens of times slower) up to 9, then 16, 17 and 33: still every kernel
    // (1, 2, 3, 4, 8 tokens), the 4 + rest splits and the unpacked grid path.
    let token_counts: Vec<usize> = if common::runner().is_some() {
        (1..=9).chain([16, 17, 33]).collect()
    } else {
        (1..=17).chain([33]).collect()
    };
    for ty in KERNEL_TYPES {
        for (rows, k) in [(8, 256), (13, 512), (64, 1280), (3, 256)] {
            let (bytes, w) = rng.matrix(ty, rows, k);
            let mut ggml = Product::new(ty, rows, k, &bytes, Kernels::Ggml, 2).unwrap();
            let mut ours = Product::new(ty, rows, k, &bytes, Kernels::Phi4, 2).unwrap();
            let packed = PackedMatrix::pack(ty, rows, k, &bytes).unwrap();
            // A step of m tokens takes the first m of these; each token's one-token results.
            let most = *token_counts.iter().max().unwrap();
            let tokens = rng.vec(most * k);
            let alone: Vec<Vec<Vec<f32>>> = kernel_variants()
                .iter()
                .map(|&v| {
                    (0..most)
                        .map(|t| packed.mul(&tokens[t * k..][..k], 1, 2, v, false))
                        .collect()
                })
                .collect();
            for &m in &token_counts {
                let x = &tokens[..m * k];
                let mag = magnitudes(&w, x, rows, k, m);
                let want = ggml.run(x, m);
                let what = format!("{ty:?} [{k}, {rows}] × {m}");
                for (&v, alone) in kernel_variants().iter().zip(&alone) {
                    for scalar in [true, false] {
                        let got = packed.mul(x, m, 2, v, scalar);
                        assert_close(&format!("{what} {v} scalar={scalar}"), &got, &want, &mag);
                        // A token's results do not depend on the step it is in: the same bits
                        // as its own one-token step (what batched streams and drafts rely on).
                        if scalar {
                            continue;
                        }
                        for (t, one) in alone[..m].iter().enumerate() {
                            let row = &got[t * rows..][..rows];
                            assert!(
                                row.iter().zip(one).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{what} {v}: token {t} of {m} differs from its one-token step"
                            );
                        }
                    }
                }
                assert_close(&format!("{what} graph"), &ours.run(x, m), &want, &mag);
            }
        }
    }
}

#[test]
fn wrong_shapes_are_refused() {
    let bytes = quantize(TensorType::Q4_K, &vec![0.5; 256 * 8], 256).unwrap();
    assert!(PackedMatrix::pack(TensorType::Q4_K, 8, 256, &bytes[1..]).is_err());
    assert!(PackedMatrix::pack(TensorType::Q8_0, 8, 256, &bytes).is_err());
    assert!(Product::new(TensorType::Q4_K, 9, 256, &bytes, Kernels::Phi4, 1).is_err());
}
