//! The built-in base optimizers (SGD, Adam, AdamW) with exactly torch's single-tensor semantics.
//!
//! A base rule is configured once ([`BaseRule::sgd`], [`BaseRule::adam`], [`BaseRule::adamw`],
//! which validate every hyperparameter) and turned, once per step and group, into a
//! [`BaseStep`]: the per-step scalars (bias corrections, `lr·wd`, `1 − dampening`, …) computed on
//! the host. The element functions [`SgdStep::apply`] and [`AdamStep::apply`] are then the single
//! source of truth every backend calls per element (they compute in `f64`).
//!
//! Semantics (conformance `verification/SCHEMA.md` §6, from `torch.optim.SGD` / `Adam` / `AdamW`,
//! single-tensor path):
//!
//! ```text
//! SGD:   g += wd·p;  buf = first ? g : momentum·buf + (1−dampening)·g;
//!        g = nesterov ? g + momentum·buf : buf   (when momentum ≠ 0);   p −= lr·g
//! Adam:  adamw: p ·= 1 − lr·wd   |   adam: g += wd·p
//!        m = lerp(m, g, 1−β1);  v = β2·v + (1−β2)·g²;  v̂ = amsgrad ? (vmax = max(vmax, v)) : v
//!        p −= (lr/(1−β1^t)) · m / (√v̂ / √(1−β2^t) + eps)
//! ```

use crate::error::{Error, invalid, non_negative};

/// Hyperparameters of SGD (torch `SGD`). Validate with [`BaseRule::sgd`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SgdConfig {
    /// Learning rate, `lr ≥ 0` (finite). Default `1e-3` (torch's default).
    pub lr: f64,
    /// Momentum factor, `momentum ≥ 0` (finite). Default `0` (no momentum buffer is kept).
    pub momentum: f64,
    /// Dampening of the momentum, finite. Default `0`. Not applied on the first step (torch).
    pub dampening: f64,
    /// L2 weight decay added to the gradient, `weight_decay ≥ 0` (finite). Default `0`.
    pub weight_decay: f64,
    /// Nesterov momentum; needs `momentum > 0` and `dampening = 0` (as torch). Default `false`.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// Hyperparameters of Adam and AdamW (torch `Adam` / `AdamW`). Validate with [`BaseRule::adam`]
/// or [`BaseRule::adamw`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdamConfig {
    /// Learning rate, `lr ≥ 0` (finite). Default `1e-3`.
    pub lr: f64,
    /// First-moment decay, `0 ≤ beta1 < 1`. Default `0.9`.
    pub beta1: f64,
    /// Second-moment decay, `0 ≤ beta2 < 1`. Default `0.999`.
    pub beta2: f64,
    /// Denominator term, `eps > 0` (finite; torch also accepts 0, which can divide by zero).
    /// Default `1e-8`.
    pub eps: f64,
    /// Weight decay, `≥ 0` (finite): L2 on the gradient for Adam, decoupled `p ·= 1 − lr·wd` for
    /// AdamW. Default `0` (pass `1e-2` for torch's AdamW default).
    pub weight_decay: f64,
    /// AMSGrad: use the running maximum of the second moment. Default `false`.
    pub amsgrad: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        }
    }
}

/// A validated base optimizer: the rule applied with the final (SAM) gradient.
///
/// ```
/// use sam_core::{BaseRule, SgdConfig};
/// let sgd = BaseRule::sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() }).unwrap();
/// assert_eq!(sgd.lr(), 0.1);
/// assert!(BaseRule::sgd(SgdConfig { lr: f64::NAN, ..Default::default() }).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BaseRule(Kind);

#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
enum Kind {
    Sgd(SgdConfig),
    Adam(AdamConfig),
    AdamW(AdamConfig),
}

impl BaseRule {
    /// SGD with torch's semantics; rejects out-of-domain hyperparameters (NaN included).
    pub fn sgd(c: SgdConfig) -> Result<Self, Error> {
        non_negative("lr", c.lr)?;
        non_negative("weight_decay", c.weight_decay)?;
        non_negative("momentum", c.momentum)?;
        if !c.dampening.is_finite() {
            return Err(invalid("dampening", "dampening must be finite"));
        }
        if c.nesterov && !(c.momentum > 0.0 && c.dampening == 0.0) {
            return Err(invalid(
                "nesterov",
                "Nesterov momentum requires momentum > 0 and dampening = 0",
            ));
        }
        Ok(BaseRule(Kind::Sgd(c)))
    }

    /// Adam (L2 weight decay added to the gradient) with torch's semantics.
    pub fn adam(c: AdamConfig) -> Result<Self, Error> {
        Self::check_adam(&c)?;
        Ok(BaseRule(Kind::Adam(c)))
    }

    /// AdamW (decoupled weight decay `p ·= 1 − lr·wd` before the moments) with torch's semantics.
    pub fn adamw(c: AdamConfig) -> Result<Self, Error> {
        Self::check_adam(&c)?;
        Ok(BaseRule(Kind::AdamW(c)))
    }

    fn check_adam(c: &AdamConfig) -> Result<(), Error> {
        non_negative("lr", c.lr)?;
        non_negative("weight_decay", c.weight_decay)?;
        if !(c.beta1 >= 0.0 && c.beta1 < 1.0) {
            return Err(invalid("beta1", "beta1 must be in [0, 1)"));
        }
        if !(c.beta2 >= 0.0 && c.beta2 < 1.0) {
            return Err(invalid("beta2", "beta2 must be in [0, 1)"));
        }
        if !(c.eps > 0.0 && c.eps.is_finite()) {
            // torch accepts 0, but then a zero (or underflowed) second moment divides by zero
            // and turns finite input into NaN: we require eps > 0.
            return Err(invalid("eps", "eps must be finite and > 0"));
        }
        Ok(())
    }

    /// The configured learning rate.
    pub fn lr(&self) -> f64 {
        match self.0 {
            Kind::Sgd(c) => c.lr,
            Kind::Adam(c) | Kind::AdamW(c) => c.lr,
        }
    }

    /// The same rule with learning rate `lr` (validated as at construction).
    pub fn with_lr(&self, lr: f64) -> Result<Self, Error> {
        non_negative("lr", lr)?;
        let mut kind = self.0;
        match &mut kind {
            Kind::Sgd(c) => c.lr = lr,
            Kind::Adam(c) | Kind::AdamW(c) => c.lr = lr,
        }
        Ok(BaseRule(kind))
    }

    /// The SGD configuration, if this is SGD.
    pub fn as_sgd(&self) -> Option<&SgdConfig> {
        match &self.0 {
            Kind::Sgd(c) => Some(c),
            _ => None,
        }
    }

    /// The Adam/AdamW configuration and whether the decay is decoupled (AdamW), if this is Adam.
    pub fn as_adam(&self) -> Option<(&AdamConfig, bool)> {
        match &self.0 {
            Kind::Adam(c) => Some((c, false)),
            Kind::AdamW(c) => Some((c, true)),
            Kind::Sgd(_) => None,
        }
    }

    /// How many per-element state slots the rule keeps (SGD: 1 with momentum, else 0;
    /// Adam: 2, or 3 with AMSGrad).
    pub fn state_slots(&self) -> u8 {
        match &self.0 {
            Kind::Sgd(c) => u8::from(c.momentum != 0.0),
            Kind::Adam(c) | Kind::AdamW(c) => 2 + u8::from(c.amsgrad),
        }
    }

    /// The per-step scalars for base step number `step` (1-based: the first step is 1), with
    /// learning rate `lr` (normally [`lr`](Self::lr); a schedule may override it).
    pub fn step_coefficients(&self, step: u64, lr: f64) -> BaseStep {
        match &self.0 {
            Kind::Sgd(c) => BaseStep::Sgd(SgdStep {
                neg_lr: -lr,
                weight_decay: c.weight_decay,
                momentum: c.momentum,
                one_minus_dampening: 1.0 - c.dampening,
                nesterov: c.nesterov,
                first: step <= 1,
            }),
            Kind::Adam(c) | Kind::AdamW(c) => {
                let decoupled = matches!(self.0, Kind::AdamW(_));
                // Python float arithmetic, as torch's single-tensor Adam does on the host.
                let t = step.max(1) as f64;
                let bc1 = 1.0 - libm::pow(c.beta1, t);
                let bc2 = 1.0 - libm::pow(c.beta2, t);
                BaseStep::Adam(AdamStep {
                    decay: if decoupled {
                        1.0 - lr * c.weight_decay
                    } else {
                        1.0
                    },
                    l2: if decoupled { 0.0 } else { c.weight_decay },
                    one_minus_beta1: 1.0 - c.beta1,
                    beta2: c.beta2,
                    one_minus_beta2: 1.0 - c.beta2,
                    bc2_sqrt: libm::sqrt(bc2),
                    neg_step_size: -(lr / bc1),
                    eps: c.eps,
                    amsgrad: c.amsgrad,
                })
            }
        }
    }
}

/// What the restore-and-step pass does with the final gradient: a built-in rule, or nothing
/// (bring-your-own base optimizer: the combined gradient is written back to the gradient storage).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseStep {
    /// No base step: write the combined gradient into the gradient storage and leave the
    /// weights restored (the framework applies its own optimizer).
    External,
    /// SGD with these per-step scalars.
    Sgd(SgdStep),
    /// Adam/AdamW with these per-step scalars.
    Adam(AdamStep),
}

impl BaseStep {
    /// Number of per-element state slots the step reads and writes.
    pub fn state_slots(&self) -> usize {
        match self {
            BaseStep::External => 0,
            BaseStep::Sgd(s) => usize::from(s.momentum != 0.0),
            BaseStep::Adam(a) => 2 + usize::from(a.amsgrad),
        }
    }
}

/// Per-step scalars of SGD (computed once per step and group on the host).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// `−lr`.
    pub neg_lr: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Momentum factor; `0` means no momentum buffer.
    pub momentum: f64,
    /// `1 − dampening`.
    pub one_minus_dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// First step: the momentum buffer is initialised to the gradient (no dampening).
    pub first: bool,
}

impl SgdStep {
    /// One element: parameter `p`, final gradient `d`, momentum buffer `buf` (ignored without
    /// momentum); returns the new parameter and the new buffer.
    #[inline(always)]
    pub fn apply(&self, p: f64, d: f64, buf: f64) -> (f64, f64) {
        let mut d = d;
        if self.weight_decay != 0.0 {
            d += self.weight_decay * p;
        }
        let mut b = buf;
        if self.momentum != 0.0 {
            b = if self.first {
                d
            } else {
                b * self.momentum + self.one_minus_dampening * d
            };
            d = if self.nesterov {
                d + self.momentum * b
            } else {
                b
            };
        }
        (add(p, self.neg_lr * d), b)
    }
}

/// Per-step scalars of Adam/AdamW (computed once per step and group on the host).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// Decoupled decay factor `1 − lr·wd` (AdamW), `1` for Adam.
    pub decay: f64,
    /// L2 weight decay added to the gradient (Adam), `0` for AdamW.
    pub l2: f64,
    /// `1 − β1`, the weight of torch's `lerp_`.
    pub one_minus_beta1: f64,
    /// `β2`.
    pub beta2: f64,
    /// `1 − β2`.
    pub one_minus_beta2: f64,
    /// `√(1 − β2^t)`.
    pub bc2_sqrt: f64,
    /// `−lr / (1 − β1^t)`.
    pub neg_step_size: f64,
    /// `eps`.
    pub eps: f64,
    /// AMSGrad: keep and use `vmax`.
    pub amsgrad: bool,
}

impl AdamStep {
    /// One element: parameter `p`, final gradient `d`, state `[m, v, vmax]` (updated in place);
    /// returns the new parameter.
    #[inline(always)]
    pub fn apply(&self, p: f64, d: f64, state: &mut [f64; 3]) -> f64 {
        let mut p = p;
        let mut d = d;
        if self.decay != 1.0 {
            p *= self.decay;
        }
        if self.l2 != 0.0 {
            d += self.l2 * p;
        }
        let [m, v, vmax] = state;
        *m = lerp(*m, d, self.one_minus_beta1);
        *v = *v * self.beta2 + self.one_minus_beta2 * d * d;
        let vhat = if self.amsgrad {
            if *v > *vmax || vmax.is_nan() {
                *vmax = *v;
            }
            *vmax
        } else {
            *v
        };
        let denom = libm::sqrt(vhat) / self.bc2_sqrt + self.eps;
        add(p, self.neg_step_size * *m / denom)
    }
}

/// `p + delta`, except that a zero `delta` leaves `p` bit-identical (so `-0.0` stays `-0.0`
/// and a step with `lr = 0`, or with a zero update, is exactly the identity).
#[inline(always)]
pub fn add(p: f64, delta: f64) -> f64 {
    if delta == 0.0 { p } else { p + delta }
}

/// torch's `lerp` (CPU kernel): `a + w·(b − a)` for `|w| < ½`, else `b − (b − a)·(1 − w)`.
#[inline(always)]
pub fn lerp(a: f64, b: f64, w: f64) -> f64 {
    if libm::fabs(w) < 0.5 {
        a + w * (b - a)
    } else {
        b - (b - a) * (1.0 - w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values in these tests were worked out by hand from torch's update formulas
    // (`verification/SCHEMA.md` §6) with exactly representable inputs, so every intermediate is exact in f64;
    // each is written next to the assertion. The conformance cases (produced by torch itself)
    // check the same code end to end.

    #[test]
    fn sgd_plain() {
        let s = BaseRule::sgd(SgdConfig {
            lr: 0.5,
            ..Default::default()
        })
        .unwrap();
        let BaseStep::Sgd(k) = s.step_coefficients(1, 0.5) else {
            panic!()
        };
        // p - lr*g = 1 - 0.5*0.25 = 0.875
        assert_eq!(k.apply(1.0, 0.25, 0.0).0, 0.875);
    }

    #[test]
    fn sgd_momentum_first_step_no_dampening_then_dampened() {
        let c = SgdConfig {
            lr: 0.5,
            momentum: 0.5,
            dampening: 0.5,
            ..Default::default()
        };
        let s = BaseRule::sgd(c).unwrap();
        let BaseStep::Sgd(k1) = s.step_coefficients(1, 0.5) else {
            panic!()
        };
        // step 1: buf = g = 2 (no dampening); p = 1 - 0.5*2 = 0
        assert_eq!(k1.apply(1.0, 2.0, 123.0), (0.0, 2.0));
        let BaseStep::Sgd(k2) = s.step_coefficients(2, 0.5) else {
            panic!()
        };
        // step 2: buf = 0.5*2 + 0.5*4 = 3; p = 0 - 0.5*3 = -1.5
        assert_eq!(k2.apply(0.0, 4.0, 2.0), (-1.5, 3.0));
    }

    #[test]
    fn sgd_nesterov_weight_decay() {
        let c = SgdConfig {
            lr: 0.25,
            momentum: 0.5,
            weight_decay: 0.5,
            nesterov: true,
            ..Default::default()
        };
        let s = BaseRule::sgd(c).unwrap();
        let BaseStep::Sgd(k) = s.step_coefficients(2, 0.25) else {
            panic!()
        };
        // g = 1 + 0.5*2 = 2; buf = 0.5*4 + 1*2 = 4; g = 2 + 0.5*4 = 4; p = 2 - 0.25*4 = 1
        assert_eq!(k.apply(2.0, 1.0, 4.0), (1.0, 4.0));
    }

    #[test]
    fn adam_first_step_is_sign_step() {
        let a = BaseRule::adam(AdamConfig {
            lr: 0.5,
            eps: 1e-300,
            ..Default::default()
        })
        .unwrap();
        let BaseStep::Adam(k) = a.step_coefficients(1, 0.5) else {
            panic!()
        };
        let mut st = [0.0; 3];
        // m = 0.1*g, v = 0.001*g^2; bias-corrected m/sqrt(v) = sign(g) (up to rounding), so
        // p = 1 - 0.5*1 = 0.5 within a few ulps.
        let p = k.apply(1.0, 4.0, &mut st);
        assert!((p - 0.5).abs() < 1e-15, "{p}");
        // lerp weight 1 - 0.9 = 0.09999999999999998 in f64 (as in Python); m = 0 + w*(4 - 0)
        assert_eq!(st[0], 0.3999999999999999);
    }

    #[test]
    fn adamw_decays_before_moments_and_amsgrad_keeps_max() {
        let c = AdamConfig {
            lr: 0.5,
            weight_decay: 0.5,
            amsgrad: true,
            ..Default::default()
        };
        let BaseStep::Adam(k) = BaseRule::adamw(c).unwrap().step_coefficients(3, 0.5) else {
            panic!()
        };
        assert_eq!(k.decay, 0.75); // 1 - 0.5*0.5
        assert_eq!(k.l2, 0.0);
        let mut st = [0.0, 1.0, 5.0];
        k.apply(1.0, 0.0, &mut st);
        assert_eq!(st[1], 0.999); // v = 0.999*1 + 0.001*0
        assert_eq!(st[2], 5.0); // vmax keeps the larger value
    }

    #[test]
    fn torch_lerp_branches() {
        assert_eq!(lerp(1.0, 3.0, 0.25), 1.5);
        assert_eq!(lerp(1.0, 3.0, 0.75), 2.5);
    }

    #[test]
    fn rejects_bad_hyperparameters() {
        let bad = [
            SgdConfig {
                lr: -1.0,
                ..Default::default()
            },
            SgdConfig {
                lr: f64::NAN,
                ..Default::default()
            },
            SgdConfig {
                momentum: f64::INFINITY,
                ..Default::default()
            },
            SgdConfig {
                weight_decay: -0.1,
                ..Default::default()
            },
            SgdConfig {
                nesterov: true,
                ..Default::default()
            },
            SgdConfig {
                nesterov: true,
                momentum: 0.9,
                dampening: 0.1,
                ..Default::default()
            },
            SgdConfig {
                dampening: f64::NAN,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(BaseRule::sgd(c).is_err(), "{c:?}");
        }
        let bad = [
            AdamConfig {
                beta1: 1.0,
                ..Default::default()
            },
            AdamConfig {
                beta2: f64::NAN,
                ..Default::default()
            },
            AdamConfig {
                eps: -1.0,
                ..Default::default()
            },
            AdamConfig {
                eps: 0.0,
                ..Default::default()
            },
            AdamConfig {
                lr: f64::INFINITY,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(
                BaseRule::adam(c).is_err() && BaseRule::adamw(c).is_err(),
                "{c:?}"
            );
        }
    }
}
