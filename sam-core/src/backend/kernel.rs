//! The element functions every backend calls, and the canonical reduction order.
//!
//! These are the single definition of the per-element math: the reference backend is a loop
//! around them, the ndarray backend a `Zip` around them, and the CUDA kernels mirror them line by
//! line. All arithmetic is in `f64`; values are widened on load and rounded once on store.
//!
//! # Canonical reduction order
//!
//! A group's elements are numbered `0..len` (flat, whatever the tensor layout). They are cut
//! into blocks of [`BLOCK`] elements; inside a block, element `j` goes to lane `j % LANES` and
//! each lane accumulates sequentially ([`BlockReducer`]); the lanes are combined in a fixed tree.
//! Block results are combined by [`pairwise`]: the sum over blocks `lo..hi` is the sum over
//! `lo..mid` plus the sum over `mid..hi`, `mid = lo + (hi − lo)/2`. A parallel backend can
//! evaluate the two halves on different threads and get the same bits, with no allocation.
//! Groups are combined in order, left to right.
//!
//! # Overflow- and underflow-safe norms
//!
//! Squares are accumulated in `f64`. For `f32` storage this can neither overflow nor underflow.
//! For `f64` storage the core checks the result: if a sum overflowed, or the largest magnitude is
//! so small that its square would be subnormal, the pass is repeated with each quantity scaled
//! by a power of two ([`scale_for`]), which is exact, and the norm is unscaled afterwards.

pub use super::lanes::{Accumulators, LaneMath, Lanes};
use crate::base::{BaseStep, add};
use crate::buffer::{GradMix, PerturbSpec, PostMix, ReduceSpec, Reduction, UpdateSpec, Weighting};

/// Elements per reduction block.
pub const BLOCK: usize = 4096;
/// Accumulator lanes inside a block.
pub const LANES: usize = 8;

/// The number of blocks of a group of `len` elements.
#[inline]
pub fn block_count(len: usize) -> usize {
    len.div_ceil(BLOCK)
}

/// Accumulates one block in the canonical lane order.
///
/// Push the block's elements in order with their lane `j % LANES` (`j` counted from the block's
/// first element), then [`finish`](Self::finish). The element math is
/// [`Accumulators::push`]; a backend that keeps the lanes in SIMD registers accumulates into an
/// [`Accumulators`] of its own lane type and converts with [`from_lanes`](Self::from_lanes) and
/// [`lanes`](Self::lanes) (for elements pushed one at a time, and to finish).
///
/// Finiteness is tracked per lane as an `f64` probe, `probe += v·0` for every value checked:
/// the probe stays `±0` while every value is finite and becomes NaN at the first NaN or ±∞.
/// That is exactly the flag [`Reduction::finite`] promises, and unlike a `bool &=` it
/// vectorises with the sums.
#[derive(Debug, Clone)]
pub struct BlockReducer {
    spec: ReduceSpec,
    // One array per quantity (lanes side by side).
    acc: Accumulators<[f64; LANES]>,
}

impl BlockReducer {
    /// A reducer for one block.
    #[inline]
    pub fn new(spec: &ReduceSpec) -> Self {
        Self::from_lanes(spec, Accumulators::new())
    }

    /// A reducer for one block whose lanes already hold `acc` (each quantity lane `l` in
    /// element `l`).
    #[inline(always)]
    pub fn from_lanes(spec: &ReduceSpec, acc: Accumulators<[f64; LANES]>) -> Self {
        BlockReducer { spec: *spec, acc }
    }

    /// The lanes accumulated so far.
    #[inline(always)]
    pub fn lanes(&self) -> Accumulators<[f64; LANES]> {
        self.acc
    }

    /// Accumulates the element with weight `w`, gradient `g` and stash `s` (pass `0.0` for
    /// operands the spec does not read) into `lane`.
    #[inline(always)]
    pub fn push(&mut self, lane: usize, w: f64, g: f64, s: f64) {
        let l = lane % LANES;
        let mut one = self.acc.map(|v| v[l]);
        one.push(&self.spec, w, g, s);
        self.acc.perturb_sq[l] = one.perturb_sq;
        self.acc.grad_sq[l] = one.grad_sq;
        self.acc.stash_sq[l] = one.stash_sq;
        self.acc.dot[l] = one.dot;
        self.acc.perturb_max[l] = one.perturb_max;
        self.acc.grad_max[l] = one.grad_max;
        self.acc.stash_max[l] = one.stash_max;
        self.acc.probe[l] = one.probe;
    }

    /// Accumulates [`LANES`] consecutive elements, element `l` into lane `l`: exactly
    /// `push(l, w[l], g[l], s[l])` for every `l`.
    #[inline(always)]
    pub fn push_lanes(&mut self, w: &[f64; LANES], g: &[f64; LANES], s: &[f64; LANES]) {
        self.acc.push(&self.spec, *w, *g, *s);
    }

    /// The block's result: lanes combined as `((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))`.
    #[inline]
    pub fn finish(self) -> Reduction {
        let lane = |l: usize| {
            let a = self.acc.map(|v| v[l]);
            Reduction {
                perturb_sq: a.perturb_sq,
                grad_sq: a.grad_sq,
                stash_sq: a.stash_sq,
                dot: a.dot,
                perturb_max: a.perturb_max,
                grad_max: a.grad_max,
                stash_max: a.stash_max,
                finite: a.probe == 0.0,
            }
        };
        let a = lane(0).combine(lane(1)).combine(lane(2).combine(lane(3)));
        let b = lane(4).combine(lane(5)).combine(lane(6).combine(lane(7)));
        a.combine(b)
    }
}

/// Combines the results of blocks `lo..hi` in the canonical pairwise tree. `block(i)` computes
/// block `i`. An empty range gives [`Reduction::ZERO`].
pub fn pairwise<F: FnMut(usize) -> Reduction>(lo: usize, hi: usize, block: &mut F) -> Reduction {
    match hi.saturating_sub(lo) {
        0 => Reduction::ZERO,
        1 => block(lo),
        n => {
            let mid = lo + n / 2;
            let left = pairwise(lo, mid, block);
            left.combine(pairwise(mid, hi, block))
        }
    }
}

/// The canonical reduction of a flat group: `fetch(i)` returns `(w, g, stash)` of element `i`.
pub fn reduce_flat<F: FnMut(usize) -> (f64, f64, f64)>(
    len: usize,
    spec: &ReduceSpec,
    mut fetch: F,
) -> Reduction {
    pairwise(0, block_count(len), &mut |b| {
        reduce_block(b, len, spec, &mut fetch)
    })
}

/// Block `b` of a flat group of `len` elements (see [`reduce_flat`]).
pub fn reduce_block<F: FnMut(usize) -> (f64, f64, f64)>(
    b: usize,
    len: usize,
    spec: &ReduceSpec,
    fetch: &mut F,
) -> Reduction {
    let start = b * BLOCK;
    let end = (start + BLOCK).min(len);
    let mut r = BlockReducer::new(spec);
    for (j, i) in (start..end).enumerate() {
        let (w, g, s) = fetch(i);
        r.push(j, w, g, s);
    }
    r.finish()
}

/// The power-of-two scale that brings `max_abs` into `[½, 1)` (exact to apply), or `1` for zero
/// or non-finite input.
pub fn scale_for(max_abs: f64) -> f64 {
    if !(max_abs > 0.0 && max_abs.is_finite()) {
        return 1.0;
    }
    // Find e with 2^e > max_abs >= 2^(e-1), by repeated exact scaling (no std needed).
    let mut scale = 1.0_f64;
    let mut m = max_abs;
    while m >= 1.0 {
        m *= 0.5;
        scale *= 0.5;
    }
    while m < 0.5 {
        // For subnormal inputs the scale grows beyond f64::MAX's reciprocal; cap it.
        if scale >= 1.0e300 {
            break;
        }
        m *= 2.0;
        scale *= 2.0;
    }
    scale
}

/// Whether a sum of squares with this maximum needs the scaled second pass (only reachable for
/// `f64` storage): the sum overflowed, or the squares of the largest values are below the
/// normal range.
pub fn needs_rescale(sum_sq: f64, max_abs: f64) -> bool {
    const TINY: f64 = 1.0e-140; // squares of values below this lose precision (subnormal range)
    (!sum_sq.is_finite() && max_abs.is_finite()) || (max_abs > 0.0 && max_abs < TINY)
}

/// One element of the perturb pass: returns the perturbed weight `w + T·(((T·g)·s)·c)`
/// (bit-identical `w` when the perturbation is zero), for the stored gradient `g` (unscaled
/// here, see [`stashed`]).
///
/// `T = 1` (plain) or `|w| + η` (adaptive). With `c = ρ/(n_s + ε·s)` and the scaled norm
/// `n_s ≥ |s·T·g|`, the factor `((T·g)·s)·c` is at most ρ in magnitude: nothing overflows.
#[inline(always)]
pub fn perturb(spec: &PerturbSpec, w: f64, g: f64) -> f64 {
    let g = stashed(spec, g);
    let e = match spec.weighting {
        Weighting::Plain => (g * spec.scale) * spec.coeff,
        Weighting::Adaptive { eta } => {
            let t = libm::fabs(w) + eta;
            t * (((t * g) * spec.scale) * spec.coeff)
        }
    };
    add(w, e)
}

/// A stored gradient value as the math uses it: `g · unscale` (see [`ReduceSpec::unscale`]).
#[inline(always)]
pub fn unscale(g: f64, unscale: f64) -> f64 {
    g * unscale
}

/// The value the perturb pass writes to the stash for the stored gradient `g`: the unscaled
/// gradient (the one every later pass sees).
#[inline(always)]
pub fn stashed(spec: &PerturbSpec, g: f64) -> f64 {
    unscale(g, spec.unscale)
}

/// The final gradient `d` of [`GradMix`].
#[inline(always)]
pub fn mix(grad: &GradMix, g: f64, stash: f64) -> f64 {
    match *grad {
        GradMix::Current => g,
        GradMix::Mix { a, b } => a * g + b * stash,
    }
}

/// The linear combination `a·g + b·stash` of a [`PostMix`].
#[inline(always)]
pub fn combine(m: &PostMix, g: f64, stash: f64) -> f64 {
    m.a * g + m.b * stash
}

/// The output of [`update`] for one element.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Updated {
    /// The new weight.
    pub w: f64,
    /// The final gradient `d` (written to the gradient storage for [`BaseStep::External`]).
    pub d: f64,
    /// The new stash: [`UpdateSpec::restash`]'s combination, or the stash unchanged.
    pub stash: f64,
}

/// One element of the restore-and-step pass.
///
/// `w` is the current (perturbed) weight, `backup` the saved one, `g` the stored current
/// gradient (multiplied by [`UpdateSpec::unscale`] before use),
/// `stash` the stashed clean gradient, `state` the base rule's slots (`[buf, _, _]` for SGD,
/// `[m, v, vmax]` for Adam), updated in place. Operands the spec does not use may be anything
/// (pass `0.0`). Average folding uses the *stored* (rounded) new weight: see [`fold`].
#[inline(always)]
pub fn update(
    spec: &UpdateSpec,
    w: f64,
    backup: f64,
    g: f64,
    stash: f64,
    state: &mut [f64; 3],
) -> Updated {
    let g = unscale(g, spec.unscale);
    let p = if spec.restore { backup } else { w };
    let d = mix(&spec.grad, g, stash);
    let mut p = match &spec.base {
        BaseStep::External => p,
        BaseStep::Sgd(k) => {
            let (p, buf) = k.apply(p, d, state[0]);
            state[0] = buf;
            p
        }
        BaseStep::Adam(k) => k.apply(p, d, state),
    };
    if let Some(post) = &spec.post {
        p = add(p, combine(post, g, stash));
    }
    let stash = match &spec.restash {
        Some(m) => combine(m, g, stash),
        None => stash,
    };
    Updated { w: p, d, stash }
}

/// One element of an average fold: `avg + (w − avg)·weight`.
#[inline(always)]
pub fn fold(avg: f64, w: f64, weight: f64) -> f64 {
    avg + (w - avg) * weight
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_brings_into_half_one() {
        for x in [
            1e-300,
            3e-200,
            1e-140,
            0.3,
            1.0,
            7.0,
            1e200,
            f64::MAX,
            5e-324,
        ] {
            let s = scale_for(x);
            let y = x * s;
            assert!((0.5..1.0).contains(&y) || x < 1e-290, "{x} {s} {y}");
        }
        assert_eq!(scale_for(0.0), 1.0);
        assert_eq!(scale_for(f64::NAN), 1.0);
    }

    #[test]
    fn pairwise_is_a_fixed_tree() {
        let mut seen = [false; 5];
        let r = pairwise(0, 5, &mut |i| {
            seen[i] = true;
            Reduction {
                grad_sq: i as f64,
                ..Reduction::ZERO
            }
        });
        assert_eq!(r.grad_sq, 10.0);
        assert!(seen.iter().all(|&s| s));
        assert_eq!(pairwise(3, 3, &mut |_| unreachable!()), Reduction::ZERO);
    }

    #[test]
    fn nonfinite_detected() {
        let spec = ReduceSpec {
            grad: true,
            ..ReduceSpec::FINITE_ONLY
        };
        let v = [1.0, f64::NAN, 2.0];
        assert!(!reduce_flat(3, &spec, |i| (0.0, v[i], 0.0)).finite);
        let v = [1.0, 2.0, 2.0];
        let r = reduce_flat(3, &spec, |i| (0.0, v[i], 0.0));
        assert!(r.finite);
        assert_eq!(r.grad_sq, 9.0);
        assert_eq!(r.grad_max, 2.0);
    }
}
