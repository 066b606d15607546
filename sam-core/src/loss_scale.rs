//! Dynamic loss scaling: [`LossScaler`], the state machine that picks the loss scale of
//! mixed-precision training.

use crate::error::Error;

/// The hyperparameters of a [`LossScaler`]; the defaults are `torch.amp.GradScaler`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LossScalerConfig {
    /// The first scale (`2^16`), rounded to `f32`; finite and positive.
    pub init_scale: f64,
    /// The factor applied after `growth_interval` clean steps in a row (`2`); above 1, finite.
    pub growth_factor: f64,
    /// The factor applied after a step that overflowed (`0.5`); in `(0, 1)`.
    pub backoff_factor: f64,
    /// Clean steps in a row before the scale grows (`2000`); at least 1.
    pub growth_interval: u32,
}

impl Default for LossScalerConfig {
    fn default() -> Self {
        LossScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The checkpoint of a [`LossScaler`]: its scale and its count of clean steps in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LossScalerState {
    /// The current scale.
    pub scale: f32,
    /// Clean steps since the last change of the scale (below the growth interval).
    pub growth_tracker: u32,
}

/// The dynamic loss scale `S` of mixed-precision training, with the semantics of PyTorch's
/// `torch.amp.GradScaler`.
///
/// The optimizer itself only unscales ([`Optimizer::set_grad_scale`](crate::Optimizer::set_grad_scale))
/// and skips a step whose gradients overflowed. Choosing `S` is this separate, pure state
/// machine, which a training loop (or a framework adapter) drives:
///
/// ```
/// use sam_core::{LossScaler, LossScalerConfig, StepStatus};
/// let mut scaler = LossScaler::new(LossScalerConfig { growth_interval: 2, ..Default::default() })?;
/// assert_eq!(scaler.scale(), 65536.0);
/// scaler.update(StepStatus::Applied.is_skipped());
/// scaler.update(false); // a second clean step in a row: the scale grows
/// assert_eq!(scaler.scale(), 131072.0);
/// scaler.update(true); // an overflow: the scale backs off, the count restarts
/// assert_eq!(scaler.scale(), 65536.0);
/// # Ok::<(), sam_core::Error>(())
/// ```
///
/// Semantics (`aten/src/ATen/native/cpu/AmpGradScalerKernels.cpp`, `_amp_update_scale_cpu_`,
/// and `torch/amp/grad_scaler.py`): the scale is an `f32`; after a step whose gradients held
/// NaN/∞ it becomes `f32(S·backoff_factor)` and the count of clean steps restarts at 0;
/// otherwise the count grows by one, and when it reaches `growth_interval` the scale becomes
/// `f32(S·growth_factor)` (kept only if finite) and the count restarts. The products are
/// formed in `f64`, as the C++ does (`float · double`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaler {
    config: LossScalerConfig,
    state: LossScalerState,
}

fn invalid(name: &'static str, message: &'static str) -> Error {
    Error::InvalidHyperparameter { name, message }
}

impl LossScaler {
    /// A scaler at `init_scale`; the configuration is checked.
    pub fn new(config: LossScalerConfig) -> Result<Self, Error> {
        let scale = config.init_scale as f32;
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(invalid("init_scale", "must be positive and finite in f32"));
        }
        if !(config.growth_factor > 1.0 && config.growth_factor.is_finite()) {
            return Err(invalid("growth_factor", "must be finite and above 1"));
        }
        if !(config.backoff_factor > 0.0 && config.backoff_factor < 1.0) {
            return Err(invalid("backoff_factor", "must lie in (0, 1)"));
        }
        if config.growth_interval == 0 {
            return Err(invalid("growth_interval", "must be at least 1"));
        }
        Ok(LossScaler {
            config,
            state: LossScalerState {
                scale,
                growth_tracker: 0,
            },
        })
    }

    /// The scale to multiply the next step's loss by (and to pass to
    /// [`Optimizer::set_grad_scale`](crate::Optimizer::set_grad_scale)).
    pub fn scale(&self) -> f64 {
        f64::from(self.state.scale)
    }

    /// The configuration.
    pub fn config(&self) -> &LossScalerConfig {
        &self.config
    }

    /// Moves on after a step: `found_inf` is whether its gradients held NaN/∞ (the step was
    /// skipped: [`StepStatus::is_skipped`](crate::StepStatus::is_skipped), or
    /// [`Error::NonFiniteGradient`] from a two-call step).
    pub fn update(&mut self, found_inf: bool) {
        let s = &mut self.state;
        if found_inf {
            s.scale = (f64::from(s.scale) * self.config.backoff_factor) as f32;
            s.growth_tracker = 0;
            return;
        }
        let successful = s.growth_tracker + 1;
        if successful == self.config.growth_interval {
            let grown = (f64::from(s.scale) * self.config.growth_factor) as f32;
            if grown.is_finite() {
                s.scale = grown;
            }
            s.growth_tracker = 0;
        } else {
            s.growth_tracker = successful;
        }
    }

    /// The checkpoint state.
    pub fn state(&self) -> LossScalerState {
        self.state
    }

    /// Resumes from a checkpoint: the scale finite and non-negative (repeated backoff can reach
    /// 0), the count below the growth interval; nothing changes on error.
    pub fn load_state(&mut self, state: LossScalerState) -> Result<(), Error> {
        if !(state.scale >= 0.0 && state.scale.is_finite())
            || state.growth_tracker >= self.config.growth_interval
        {
            return Err(Error::InvalidState {
                message: "a loss scale must be finite and non-negative, its count below the \
                          growth interval",
            });
        }
        self.state = state;
        Ok(())
    }
}
