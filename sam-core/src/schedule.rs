//! Schedules for ρ and the learning rate: pure functions of the step index.
//!
//! Semantics follow juntang-zhuang/GSAM `scheduler.py` (`SchedulerBase.step`), with no clamping
//! by default (conformance `verification/SCHEMA.md` §7.4). With `W = warmup_steps`, `T = t_max`:
//!
//! ```text
//! k <  W : init + (max − init)·k / W
//! k == W : max
//! k >  W : linear      max + (min − max)·(k − W)/(T − W)
//!          cosine      min + (max − min)·(cos(π·(k − W)/(T − W)) + 1)/2
//!          polynomial  min + (max − min)·(1 − (k − W)/(T − W))^power
//! ```
//!
//! Past `T` the upstream formulas keep going (linear goes below `min`, cosine comes back up);
//! `clamp: true` holds the value at `S(T)` instead.
//!
//! ```
//! use sam_core::{Schedule, ScheduleConfig, ScheduleShape};
//! let s = Schedule::new(ScheduleConfig {
//!     shape: ScheduleShape::Linear, t_max: 10, max_value: 1.0, min_value: 0.0,
//!     init_value: 0.0, warmup_steps: 2, clamp: false,
//! })?;
//! assert_eq!([s.value(0), s.value(1), s.value(2), s.value(6)], [0.0, 0.5, 1.0, 0.5]);
//! # Ok::<(), sam_core::Error>(())
//! ```

use crate::error::{Error, invalid};

/// Largest step count a schedule accepts (`2^53`, exact in `f64`).
pub const MAX_STEP: u64 = 1 << 53;

/// Largest magnitude of a schedule value (so that every `S(k)` is finite, even far past `t_max`).
pub const MAX_VALUE: f64 = 1e280;

/// The shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ScheduleShape {
    /// Always `max_value` (warm-up still applies).
    Constant,
    /// Linear decay from `max_value` at `W` to `min_value` at `T`.
    Linear,
    /// Cosine decay from `max_value` at `W` to `min_value` at `T`.
    Cosine,
    /// Polynomial decay with this power (> 0; 1 is linear).
    Polynomial {
        /// The exponent.
        power: f64,
    },
}

/// Parameters of a [`Schedule`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ScheduleConfig {
    /// The shape after warm-up.
    pub shape: ScheduleShape,
    /// `T`: the step at which the decay reaches `min_value`; `T > warmup_steps` unless constant.
    pub t_max: u64,
    /// The value at the end of warm-up (finite).
    pub max_value: f64,
    /// The value at `T` (finite). Upstream default `0`.
    pub min_value: f64,
    /// The value at step 0 of the warm-up (finite). Upstream default `0`.
    pub init_value: f64,
    /// `W`: number of warm-up steps. Upstream default `0`.
    pub warmup_steps: u64,
    /// Hold the value at `S(T)` for `k > T` (upstream does not).
    pub clamp: bool,
}

/// A validated schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Schedule(ScheduleConfig);

impl Schedule {
    /// Validates a schedule: values within ±[`MAX_VALUE`], `t_max > warmup_steps` for decaying
    /// shapes, step counts at most [`MAX_STEP`], polynomial power finite and > 0. Then `value(k)`
    /// is finite for every `k`.
    pub fn new(c: ScheduleConfig) -> Result<Self, Error> {
        if !(c.max_value.is_finite() && c.min_value.is_finite() && c.init_value.is_finite()) {
            return Err(invalid(
                "schedule",
                "max_value, min_value and init_value must be finite",
            ));
        }
        if !matches!(c.shape, ScheduleShape::Constant) && c.t_max <= c.warmup_steps {
            return Err(invalid("t_max", "t_max must be greater than warmup_steps"));
        }
        // Step counts beyond 2^53 are not exact in f64 (t_max − warmup_steps could round to 0).
        if c.t_max > MAX_STEP || c.warmup_steps > MAX_STEP {
            return Err(invalid(
                "t_max",
                "t_max and warmup_steps must be at most 2^53",
            ));
        }
        // With every value within ±MAX_VALUE, S(k) is finite for every k up to u64::MAX.
        let within = |v: f64| v.abs() <= MAX_VALUE;
        if !(within(c.max_value) && within(c.min_value) && within(c.init_value)) {
            return Err(invalid("schedule", "schedule values must be within ±1e280"));
        }
        if let ScheduleShape::Polynomial { power } = c.shape {
            if !(power > 0.0 && power.is_finite()) {
                return Err(invalid(
                    "power",
                    "the polynomial power must be finite and > 0",
                ));
            }
        }
        Ok(Schedule(c))
    }

    /// A constant schedule (no warm-up).
    pub fn constant(value: f64) -> Result<Self, Error> {
        Self::new(ScheduleConfig {
            shape: ScheduleShape::Constant,
            t_max: 0,
            max_value: value,
            min_value: value,
            init_value: value,
            warmup_steps: 0,
            clamp: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ScheduleConfig {
        &self.0
    }

    /// `S(k)`, in f64 with upstream's operation order.
    pub fn value(&self, k: u64) -> f64 {
        let c = &self.0;
        let k = if c.clamp && !matches!(c.shape, ScheduleShape::Constant) {
            k.min(c.t_max)
        } else {
            k
        };
        let (w, t) = (c.warmup_steps as f64, c.t_max as f64);
        let kf = k as f64;
        if k < c.warmup_steps {
            return c.init_value + (c.max_value - c.init_value) * kf / w;
        }
        if k == c.warmup_steps {
            return c.max_value;
        }
        match c.shape {
            ScheduleShape::Constant => c.max_value,
            ScheduleShape::Linear => c.max_value + (c.min_value - c.max_value) * (kf - w) / (t - w),
            ScheduleShape::Cosine => {
                let phase = (kf - w) / (t - w) * core::f64::consts::PI;
                c.min_value + (c.max_value - c.min_value) * (libm::cos(phase) + 1.0) / 2.0
            }
            ScheduleShape::Polynomial { power } => {
                // Past t_max the base would turn negative (NaN for fractional powers): hold at 0.
                let frac = 1.0 - (kf - w) / (t - w);
                let frac = if frac > 0.0 { frac } else { 0.0 };
                c.min_value + (c.max_value - c.min_value) * libm::pow(frac, power)
            }
        }
    }
}

/// ρ proportional to the learning rate (upstream `ProportionScheduler`):
/// `P(lr) = min_value + (max_value − min_value)·(lr − min_lr)/(max_lr − min_lr)` if
/// `max_lr > min_lr`, else `max_value`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Proportional {
    /// The lr at which ρ is `max_value`.
    pub max_lr: f64,
    /// The lr at which ρ is `min_value`.
    pub min_lr: f64,
    /// ρ at `max_lr`.
    pub max_value: f64,
    /// ρ at `min_lr`.
    pub min_value: f64,
}

impl Proportional {
    /// Validates: every field finite.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.max_lr.is_finite()
            && self.min_lr.is_finite()
            && self.max_value.is_finite()
            && self.min_value.is_finite()
            && (self.max_lr - self.min_lr).is_finite()
            && (self.max_value - self.min_value).is_finite())
        {
            return Err(invalid(
                "proportional",
                "max_lr, min_lr, max_value and min_value (and their differences) must be finite",
            ));
        }
        Ok(())
    }

    /// `P(lr)`.
    pub fn value(&self, lr: f64) -> f64 {
        if self.max_lr > self.min_lr {
            self.min_value
                + (self.max_value - self.min_value) * (lr - self.min_lr)
                    / (self.max_lr - self.min_lr)
        } else {
            self.max_value
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(shape: ScheduleShape, t_max: u64, warm: u64, clamp: bool) -> Schedule {
        Schedule::new(ScheduleConfig {
            shape,
            t_max,
            max_value: 1.0,
            min_value: 0.2,
            init_value: 0.1,
            warmup_steps: warm,
            clamp,
        })
        .unwrap()
    }

    // Expected sequences worked out by hand from the formulas in the module docs (upstream
    // scheduler.py), with values chosen so that most are exact in binary.
    #[test]
    fn linear_with_warmup_exact_sequence() {
        let s = sched(ScheduleShape::Linear, 6, 2, false);
        let v: [f64; 8] = core::array::from_fn(|k| s.value(k as u64));
        // k=0: init 0.1; k=1: 0.1 + 0.9*1/2 = 0.55; k=2 (== W): max 1.0;
        // k=3..6: 1 + (0.2-1)*(k-2)/4 = 0.8, 0.6, 0.4, 0.2; k=7 (> T, no clamp): 0.0
        let want = [0.1, 0.55, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{v:?}");
        }
        let c = sched(ScheduleShape::Linear, 6, 2, true);
        assert_eq!(c.value(7), c.value(6));
        assert_eq!(c.value(1000), c.value(6));
    }

    #[test]
    fn cosine_exact_points_and_rebound() {
        let s = sched(ScheduleShape::Cosine, 4, 0, false);
        // k=0 == W: max; k=2: phase π/2 → min + (max-min)/2 = 0.6; k=4: min; k=6: phase 3π/2 → 0.6 again
        assert_eq!(s.value(0), 1.0);
        assert!((s.value(2) - 0.6).abs() < 1e-15);
        assert!((s.value(4) - 0.2).abs() < 1e-15);
        assert!((s.value(6) - 0.6).abs() < 1e-15);
        let c = sched(ScheduleShape::Cosine, 4, 0, true);
        assert!((c.value(6) - 0.2).abs() < 1e-15);
    }

    #[test]
    fn polynomial_and_constant() {
        let s = sched(ScheduleShape::Polynomial { power: 2.0 }, 4, 0, false);
        // k=2: 0.2 + 0.8*(1-0.5)^2 = 0.4
        assert!((s.value(2) - 0.4).abs() < 1e-15);
        let c = Schedule::constant(0.3).unwrap();
        assert_eq!([c.value(0), c.value(5)], [0.3, 0.3]);
    }

    #[test]
    fn proportional() {
        let p = Proportional {
            max_lr: 1.0,
            min_lr: 0.0,
            max_value: 0.1,
            min_value: 0.01,
        };
        assert!((p.value(0.5) - 0.055).abs() < 1e-15);
        let flat = Proportional {
            max_lr: 0.0,
            min_lr: 0.0,
            ..p
        };
        assert_eq!(flat.value(0.7), 0.1);
    }

    #[test]
    fn invalid() {
        let base = ScheduleConfig {
            shape: ScheduleShape::Linear,
            t_max: 3,
            max_value: 1.0,
            min_value: 0.0,
            init_value: 0.0,
            warmup_steps: 3,
            clamp: false,
        };
        assert!(Schedule::new(base).is_err());
        assert!(
            Schedule::new(ScheduleConfig {
                t_max: 4,
                max_value: f64::NAN,
                ..base
            })
            .is_err()
        );
        assert!(
            Schedule::new(ScheduleConfig {
                t_max: 4,
                shape: ScheduleShape::Polynomial { power: 0.0 },
                ..base
            })
            .is_err()
        );
        assert!(
            Proportional {
                max_lr: f64::NAN,
                min_lr: 0.0,
                max_value: 1.0,
                min_value: 0.0
            }
            .validate()
            .is_err()
        );
    }
}
