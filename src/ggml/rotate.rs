//! The attention rotation of quantized KV caches (llama.cpp's): runs of a power-of-two number of
//! values through the orthonormal fast Walsh–Hadamard transform, as a custom op. It computes
//! exactly what ggml's own transform (`mul_mat` hinted `SRC0_IS_HADAMARD`) does — scale by
//! 1/√n, then butterflies of width 1, 2, 4, … — but the same way on every step, where ggml's
//! falls back to a matrix product on its reference paths (which phi4's decode steps may ask
//! for).

use std::ffi::{c_int, c_void};

use llama_cpp_sys_2 as sys;

use super::{Graph, Tensor, Type};

/// One row through the transform: `dst = H·src` with H the orthonormal Walsh–Hadamard matrix of
/// order `src.len()` (a power of two), in ggml's order of operations.
pub fn fwht_row(src: &[f32], dst: &mut [f32]) {
    let n = src.len();
    assert!(n.is_power_of_two() && dst.len() == n);
    let scale = 1.0 / (n as f32).sqrt();
    dst.iter_mut().zip(src).for_each(|(d, s)| *d = s * scale);
    let mut len = 1;
    while len < n {
        for i in (0..n).step_by(2 * len) {
            for j in i..i + len {
                let (u, v) = (dst[j], dst[j + len]);
                dst[j] = u + v;
                dst[j + len] = u - v;
            }
        }
        len *= 2;
    }
}

/// The custom op: every row of `dst->src[0]` (f32 [n, rows], contiguous) into `dst`'s, rows
/// split over the threads.
unsafe extern "C" fn fwht_op(dst: *mut sys::ggml_tensor, ith: c_int, nth: c_int, _: *mut c_void) {
    // SAFETY: ggml calls this with the node `Graph::hadamard` made: dst and its one source
    // f32 [n, rows] with contiguous rows (checked there), allocated; each thread writes only
    // its own rows of dst and reads only src.
    unsafe {
        let src = (*dst).src[0];
        let (n, rows) = ((*dst).ne[0] as usize, (*dst).ne[1] as usize);
        let per = rows.div_ceil(nth.max(1) as usize);
        let first = (ith as usize * per).min(rows);
        for r in first..(first + per).min(rows) {
            let s = (*src).data.byte_add(r * (*src).nb[1]) as *const f32;
            let d = (*dst).data.byte_add(r * (*dst).nb[1]) as *mut f32;
            fwht_row(
                std::slice::from_raw_parts(s, n),
                std::slice::from_raw_parts_mut(d, n),
            );
        }
    }
}

impl<'ctx> Graph<'ctx> {
    /// Every run of `n` values of `x` (f32; `n` a power of two dividing its rows) through the
    /// orthonormal Walsh–Hadamard transform ([`fwht_row`]): contiguous, shaped as `x`.
    pub fn hadamard(&mut self, x: Tensor<'ctx>, n: usize) -> Tensor<'ctx> {
        let ne = x.ne();
        assert!(
            n.is_power_of_two()
                && x.ty() == Type::F32
                && x.nb()[0] == 4
                && (ne[0] as usize).is_multiple_of(n)
        );
        let rows = x.n_elements() / n as i64;
        let flat = match x.is_contiguous() {
            true => self.reshape_2d(x, n as i64, rows),
            false => self.cont_2d(x, n as i64, rows),
        };
        let r = self.custom(Type::F32, [n as i64, rows], &[flat], fwht_op, 0);
        self.reshape_4d(r, ne)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orthonormal Walsh–Hadamard matrix by Sylvester's doubling, row-major.
    fn matrix(n: usize) -> Vec<f64> {
        let mut h = vec![1f64];
        let mut m = 1;
        while m < n {
            let mut g = vec![0f64; 4 * m * m];
            for i in 0..m {
                for j in 0..m {
                    let x = h[i * m + j];
                    g[i * 2 * m + j] = x;
                    g[i * 2 * m + j + m] = x;
                    g[(i + m) * 2 * m + j] = x;
                    g[(i + m) * 2 * m + j + m] = -x;
                }
            }
            h = g;
            m *= 2;
        }
        h.iter().map(|x| x / (n as f64).sqrt()).collect()
    }

    #[test]
    fn transform_is_the_matrix_product() {
        for n in [1, 2, 64, 128, 256] {
            let h = matrix(n);
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 9.0)
                .collect();
            let mut y = vec![0f32; n];
            fwht_row(&x, &mut y);
            for (i, &yi) in y.iter().enumerate() {
                let want: f64 = (0..n).map(|j| h[i * n + j] * x[j] as f64).sum();
                assert!(
                    (yi as f64 - want).abs() < 1e-4,
                    "n {n}, row {i}: {yi} vs {want}"
                );
            }
            // Orthonormal and symmetric: twice is the identity.
            let mut z = vec![0f32; n];
            fwht_row(&y, &mut z);
            x.iter()
                .zip(&z)
                .for_each(|(a, b)| assert!((a - b).abs() < 1e-4));
        }
    }
}
