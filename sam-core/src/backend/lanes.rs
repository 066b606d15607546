//! The element math of a reduction block, written once over the lanes it runs on.
//!
//! A block's [`LANES`] accumulator lanes are independent sequential sums (see
//! [`kernel`](super::kernel)). [`Accumulators`] holds every quantity of a reduction for a set of
//! lanes of type `V` and [`Accumulators::push`] applies one element per lane. The same code runs
//! on one lane (`V = f64`, the reference's element-by-element order), on all lanes in portable
//! code (`V = [f64; LANES]`), and on a backend's SIMD registers (a backend type implementing
//! [`LaneMath`] and [`Lanes`]). Each operation is one IEEE operation per lane, rounded to
//! nearest, with no fusion, so every `V` gives the same bits.

use super::kernel::LANES;
use crate::buffer::{ReduceSpec, Weighting};

/// Lane-wise arithmetic on `f64` lanes. Every method is one correctly rounded IEEE operation
/// per lane (no fused multiply-add).
pub trait LaneMath: Copy {
    /// Every lane `x`.
    fn splat(x: f64) -> Self;
    /// `self + o`.
    fn add(self, o: Self) -> Self;
    /// `self · o`.
    fn mul(self, o: Self) -> Self;
    /// `|self|` (clears the sign bit, NaN included).
    fn abs(self) -> Self;
    /// `if x > self { x } else { self }`: a running maximum `self` that ignores a NaN `x`
    /// (x86's `maxpd(x, self)`).
    fn max_with(self, x: Self) -> Self;
}

/// [`LaneMath`] over exactly [`LANES`] lanes, convertible to and from an array (lane `l` is
/// element `l`).
pub trait Lanes: LaneMath {
    /// The lanes from an array.
    fn from_array(x: [f64; LANES]) -> Self;
    /// The lanes as an array.
    fn to_array(self) -> [f64; LANES];
}

impl LaneMath for f64 {
    #[inline(always)]
    fn splat(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    fn abs(self) -> Self {
        libm::fabs(self)
    }
    #[inline(always)]
    fn max_with(self, x: Self) -> Self {
        if x > self { x } else { self }
    }
}

impl LaneMath for [f64; LANES] {
    #[inline(always)]
    fn splat(x: f64) -> Self {
        [x; LANES]
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        core::array::from_fn(|l| self[l].add(o[l]))
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        core::array::from_fn(|l| self[l].mul(o[l]))
    }
    #[inline(always)]
    fn abs(self) -> Self {
        self.map(<f64 as LaneMath>::abs)
    }
    #[inline(always)]
    fn max_with(self, x: Self) -> Self {
        core::array::from_fn(|l| self[l].max_with(x[l]))
    }
}

impl Lanes for [f64; LANES] {
    #[inline(always)]
    fn from_array(x: [f64; LANES]) -> Self {
        x
    }
    #[inline(always)]
    fn to_array(self) -> [f64; LANES] {
        self
    }
}

/// Every quantity of a reduction for lanes `V`: sums of squares, the dot product, the maxima of
/// magnitudes and the finiteness probe (`probe += v·0`, `±0` while every value is finite, NaN
/// from the first NaN or ±∞ on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulators<V> {
    /// `Σ (s_p·T⊙g)²`.
    pub perturb_sq: V,
    /// `Σ (s_g·g)²`.
    pub grad_sq: V,
    /// `Σ (s_s·stash)²`.
    pub stash_sq: V,
    /// `Σ (s_g·g)·(s_s·stash)`.
    pub dot: V,
    /// `max |T⊙g|`.
    pub perturb_max: V,
    /// `max |g|`.
    pub grad_max: V,
    /// `max |stash|`.
    pub stash_max: V,
    /// The finiteness probe.
    pub probe: V,
}

impl<V: LaneMath> Accumulators<V> {
    /// Every quantity zero (the start of a block).
    #[inline(always)]
    pub fn new() -> Self {
        let z = V::splat(0.0);
        Accumulators {
            perturb_sq: z,
            grad_sq: z,
            stash_sq: z,
            dot: z,
            perturb_max: z,
            grad_max: z,
            stash_max: z,
            probe: z,
        }
    }

    /// Accumulates one element per lane: weight `w`, stored gradient `g` (multiplied by
    /// [`ReduceSpec::unscale`] before use; finiteness is that of the stored value), stash `s`
    /// (operands the spec does not read may hold anything).
    #[inline(always)]
    pub fn push(&mut self, spec: &ReduceSpec, w: V, g: V, s: V) {
        let zero = V::splat(0.0);
        let mut probe = g.mul(zero);
        let g = g.mul(V::splat(spec.unscale));
        if let Some(weighting) = spec.perturb {
            let x = match weighting {
                Weighting::Plain => g,
                Weighting::Adaptive { eta } => {
                    // Finiteness is a property of the operands: a product that overflows for
                    // finite w and g is an overflow of the norm, reported as such by the core.
                    probe = probe.add(w.mul(zero));
                    w.abs().add(V::splat(eta)).mul(g)
                }
            };
            self.perturb_sq = add_square(self.perturb_sq, x, spec.scale_perturb);
            self.perturb_max = self.perturb_max.max_with(x.abs());
        }
        if spec.grad {
            self.grad_sq = add_square(self.grad_sq, g, spec.scale_grad);
            self.grad_max = self.grad_max.max_with(g.abs());
        }
        if spec.reads_stash() {
            probe = probe.add(s.mul(zero));
            if spec.stash {
                self.stash_sq = add_square(self.stash_sq, s, spec.scale_stash);
                self.stash_max = self.stash_max.max_with(s.abs());
            }
            if spec.dot {
                let a = g.mul(V::splat(spec.scale_grad));
                self.dot = self.dot.add(a.mul(s.mul(V::splat(spec.scale_stash))));
            }
        }
        self.probe = self.probe.add(probe);
    }

    /// Applies `f` to every quantity.
    #[inline(always)]
    pub fn map<U>(self, mut f: impl FnMut(V) -> U) -> Accumulators<U> {
        Accumulators {
            perturb_sq: f(self.perturb_sq),
            grad_sq: f(self.grad_sq),
            stash_sq: f(self.stash_sq),
            dot: f(self.dot),
            perturb_max: f(self.perturb_max),
            grad_max: f(self.grad_max),
            stash_max: f(self.stash_max),
            probe: f(self.probe),
        }
    }
}

impl<V: LaneMath> Default for Accumulators<V> {
    fn default() -> Self {
        Self::new()
    }
}

/// `acc + (x·scale)²`.
#[inline(always)]
fn add_square<V: LaneMath>(acc: V, x: V, scale: f64) -> V {
    let xs = x.mul(V::splat(scale));
    acc.add(xs.mul(xs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_with_ignores_nan_and_keeps_the_running_value() {
        assert_eq!(1.0.max_with(f64::NAN), 1.0);
        assert_eq!(1.0.max_with(2.0), 2.0);
        assert_eq!(2.0.max_with(1.0), 2.0);
        assert!(f64::NAN.max_with(1.0).is_nan());
    }

    #[test]
    fn array_lanes_equal_one_lane_at_a_time() {
        let spec = ReduceSpec {
            perturb: Some(Weighting::Adaptive { eta: 0.01 }),
            grad: true,
            stash: true,
            dot: true,
            scale_perturb: 0.5,
            scale_grad: 2.0,
            scale_stash: 1.0,
            unscale: 0.25,
        };
        let w: [f64; LANES] = [1.0, -2.0, 3.5, f64::NAN, 0.0, -0.0, 1e300, 7.0];
        let g: [f64; LANES] = [0.5, 1.0, -1.0, 2.0, f64::INFINITY, 3.0, 1e10, -4.0];
        let s: [f64; LANES] = [3.0, -0.25, 9.0, 1.0, 1.0, f64::NEG_INFINITY, 2.0, 0.125];
        let mut all = Accumulators::<[f64; LANES]>::new();
        all.push(&spec, w, g, s);
        all.push(&spec, g, s, w);
        for l in 0..LANES {
            let mut one = Accumulators::<f64>::new();
            one.push(&spec, w[l], g[l], s[l]);
            one.push(&spec, g[l], s[l], w[l]);
            let lane = all.map(|v| v[l]);
            let bits = |a: Accumulators<f64>| a.map(f64::to_bits);
            assert_eq!(bits(lane), bits(one), "lane {l}");
        }
    }
}
