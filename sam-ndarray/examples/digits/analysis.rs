//! Post-training analyses of a solution: sharpness and a 1-D loss-landscape slice.

use ndarray::ArrayView2;

use crate::mlp::Mlp;
use crate::rng::Rng;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn axpy(w: &[f64], alpha: f64, d: &[f64]) -> Vec<f64> {
    w.iter().zip(d).map(|(w, d)| w + alpha * d).collect()
}

/// The sharpness measures of a solution, on the training loss (mean cross-entropy, without
/// the weight-decay term).
#[derive(Debug, Clone, Copy)]
pub struct Sharpness {
    /// Largest (algebraic) eigenvalue of the Hessian: Lanczos with full reorthogonalisation on
    /// finite-difference Hessian-vector products `Hv ≈ (∇L(w + h·v) − ∇L(w − h·v)) / 2h`,
    /// `‖v‖ = 1`, `h = 1e-5`, with the ReLU pattern frozen at `w`.
    pub lambda_max: f64,
    /// Smallest eigenvalue from the same Lanczos run (negative: not at a strict minimum).
    pub lambda_min: f64,
    /// Lanczos iterations used.
    pub iterations: usize,
    /// Worst loss increase in the L2 ball of radius ρ: `max_{‖δ‖≤ρ} L(w+δ) − L(w)`, by
    /// projected normalised gradient ascent (a lower bound of the true maximum).
    pub ball_increase: f64,
}

/// How hard [`sharpness`] works.
#[derive(Debug, Clone, Copy)]
pub struct SharpnessConfig {
    /// Lanczos iterations (two gradient evaluations each).
    pub lanczos_iters: usize,
    /// Gradient-ascent steps in the ball.
    pub ascent_steps: usize,
    /// The ball's radius.
    pub rho: f64,
    /// Seed of Lanczos' start vector.
    pub seed: u64,
}

/// Step of the central finite difference of the gradient.
pub const HVP_STEP: f64 = 1e-5;

/// The number of eigenvalues below `x` of the symmetric tridiagonal matrix with diagonal `a`
/// and off-diagonal `b` (Sturm sequence).
fn count_below(a: &[f64], b: &[f64], x: f64) -> usize {
    let mut count = 0;
    let mut d = 1.0;
    for i in 0..a.len() {
        let off = if i == 0 { 0.0 } else { b[i - 1] * b[i - 1] };
        d = a[i] - x - if i == 0 { 0.0 } else { off / d };
        if d == 0.0 {
            d = -f64::EPSILON * (a[i].abs() + 1.0);
        }
        if d < 0.0 {
            count += 1;
        }
    }
    count
}

/// The smallest and largest eigenvalues of a symmetric tridiagonal matrix, by bisection.
fn tridiagonal_extremes(a: &[f64], b: &[f64]) -> (f64, f64) {
    let k = a.len();
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for i in 0..k {
        let r = if i > 0 { b[i - 1].abs() } else { 0.0 } + if i + 1 < k { b[i].abs() } else { 0.0 };
        lo = lo.min(a[i] - r);
        hi = hi.max(a[i] + r);
    }
    let bisect = |target: usize| {
        // Smallest x with count_below(x) >= target.
        let (mut l, mut h) = (lo - 1e-12, hi + 1e-12);
        for _ in 0..200 {
            let m = 0.5 * (l + h);
            if count_below(a, b, m) >= target {
                h = m;
            } else {
                l = m;
            }
        }
        0.5 * (l + h)
    };
    (bisect(1), bisect(k))
}

/// Computes [`Sharpness`] at `w` on `(x, y)`.
pub fn sharpness(
    mlp: &Mlp,
    w: &[f64],
    x: ArrayView2<'_, f64>,
    y: &[usize],
    c: &SharpnessConfig,
) -> Result<Sharpness, String> {
    let SharpnessConfig {
        lanczos_iters,
        ascent_steps,
        rho,
        seed,
    } = *c;
    // The ReLU pattern at w, frozen: the Hessian of the linear piece w lies in (what autograd
    // computes). Without it, units crossing a kink within ±h add O(1) spikes that do not vanish
    // as h → 0.
    let mask = mlp.relu_mask(w, x)?;
    let hvp = |v: &[f64]| -> Result<Vec<f64>, String> {
        let (_, gp) = mlp.loss_grad_flat(&axpy(w, HVP_STEP, v), x, y, Some(&mask))?;
        let (_, gm) = mlp.loss_grad_flat(&axpy(w, -HVP_STEP, v), x, y, Some(&mask))?;
        Ok(gp
            .iter()
            .zip(&gm)
            .map(|(a, b)| (a - b) / (2.0 * HVP_STEP))
            .collect())
    };

    // Lanczos with full reorthogonalisation.
    let mut rng = Rng::new("lanczos", seed);
    let mut q: Vec<f64> = (0..w.len()).map(|_| rng.normal()).collect();
    let nq = norm(&q);
    q.iter_mut().for_each(|e| *e /= nq);
    let (mut basis, mut alpha, mut beta): (Vec<Vec<f64>>, Vec<f64>, Vec<f64>) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..lanczos_iters.min(w.len()).max(1) {
        let mut r = hvp(&q)?;
        let a = dot(&q, &r);
        alpha.push(a);
        basis.push(q);
        for _ in 0..2 {
            for v in &basis {
                let c = dot(v, &r);
                r.iter_mut().zip(v).for_each(|(ri, vi)| *ri -= c * vi);
            }
        }
        let b = norm(&r);
        if !(b > 1e-10 && b.is_finite()) {
            break;
        }
        beta.push(b);
        q = r.iter().map(|e| e / b).collect();
    }
    if !alpha.iter().all(|a| a.is_finite()) {
        return Err("the Hessian-vector products at the final weights are not finite (did the training diverge? try a lower --lr, --weight-decay or rho)".into());
    }
    let (lambda_min, lambda_max) = tridiagonal_extremes(&alpha, &beta);
    let iterations = alpha.len();

    // Projected gradient ascent in the ρ-ball: start with SAM's step, then steps of ρ/4 along
    // the normalised gradient, projected back onto the ball; keep the highest loss seen.
    let (l0, g0) = mlp.loss_grad_flat(w, x, y, None)?;
    let mut delta = vec![0.0; w.len()];
    let mut best = 0.0_f64;
    let mut g = g0;
    for step in 0..ascent_steps {
        let ng = norm(&g);
        if ng == 0.0 || !ng.is_finite() {
            break;
        }
        let eta = if step == 0 { rho } else { rho / 4.0 };
        for (d, gi) in delta.iter_mut().zip(&g) {
            *d += eta * gi / ng;
        }
        let nd = norm(&delta);
        if nd > rho {
            delta.iter_mut().for_each(|d| *d *= rho / nd);
        }
        let (l, gn) = mlp.loss_grad_flat(&axpy(w, 1.0, &delta), x, y, None)?;
        best = best.max(l - l0);
        g = gn;
    }
    Ok(Sharpness {
        lambda_max,
        lambda_min,
        iterations,
        ball_increase: best,
    })
}

/// A filter-normalised random direction (Li et al. 2018, "Visualizing the Loss Landscape of
/// Neural Nets"): Gaussian, then each filter (row of a weight matrix: one unit's incoming
/// weights) rescaled to the norm of the same filter of `w`; bias entries zero (their `ignore
/// biasbn` setting).
pub fn filter_normalised_direction(mlp: &Mlp, w: &[f64], seed: u64) -> Vec<f64> {
    let mut rng = Rng::new("landscape-direction", seed);
    let mut d: Vec<f64> = (0..w.len()).map(|_| rng.normal()).collect();
    let mut at = 0;
    for shape in mlp.shapes() {
        let len: usize = shape.iter().product();
        if shape.len() == 2 {
            let cols = shape[1];
            for r in 0..shape[0] {
                let range = at + r * cols..at + (r + 1) * cols;
                let nw = norm(&w[range.clone()]);
                let nd = norm(&d[range.clone()]);
                let k = if nd > 0.0 { nw / nd } else { 0.0 };
                d[range].iter_mut().for_each(|e| *e *= k);
            }
        } else {
            d[at..at + len].iter_mut().for_each(|e| *e = 0.0);
        }
        at += len;
    }
    d
}

/// Loss along `w + α·d` for each α.
pub fn slice(
    mlp: &Mlp,
    w: &[f64],
    d: &[f64],
    alphas: &[f64],
    x: ArrayView2<'_, f64>,
    y: &[usize],
) -> Result<Vec<f64>, String> {
    alphas
        .iter()
        .map(|&a| Ok(mlp.eval_flat(&axpy(w, a, d), x, y)?.loss))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tridiagonal_extremes_of_a_known_matrix() {
        // tridiag(1, 2, 1) of size 3: eigenvalues 2 − √2, 2, 2 + √2.
        let (lo, hi) = tridiagonal_extremes(&[2.0, 2.0, 2.0], &[1.0, 1.0]);
        assert!((lo - (2.0 - 2f64.sqrt())).abs() < 1e-10, "{lo}");
        assert!((hi - (2.0 + 2f64.sqrt())).abs() < 1e-10, "{hi}");
        let (lo, hi) = tridiagonal_extremes(&[-3.0], &[]);
        assert!((lo + 3.0).abs() < 1e-10 && (hi + 3.0).abs() < 1e-10);
    }

    #[test]
    fn filter_normalised_direction_matches_row_norms_and_skips_biases() {
        use crate::mlp::{Activation, flatten};
        let mlp = Mlp {
            inputs: 3,
            hidden: 4,
            classes: 2,
            activation: Activation::Relu,
        };
        let w = flatten(&mlp.init(&mut Rng::new("test", 4)));
        let d = filter_normalised_direction(&mlp, &w, 0);
        for r in 0..4 {
            let (a, b) = (norm(&w[r * 3..r * 3 + 3]), norm(&d[r * 3..r * 3 + 3]));
            assert!((a - b).abs() < 1e-12);
        }
        assert!(d[12..16].iter().all(|&e| e == 0.0), "b1");
        assert!(d[24..26].iter().all(|&e| e == 0.0), "b2");
    }
}
