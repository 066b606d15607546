//! Parameter groups: a buffer and its hyperparameters.

use crate::base::BaseRule;
use crate::error::{Error, non_negative};

/// One parameter group: the storage of its parameters and its hyperparameters.
///
/// A step takes a slice of groups; the perturbation norm is global across them (as upstream).
/// The optimizer keeps no reference to groups between calls: its own state is a few host
/// scalars, and all per-element state lives in the buffers. The same groups (same number, same
/// lengths, same order) must be passed to every step.
#[derive(Debug, Clone)]
pub struct Group<B> {
    /// The storage.
    pub buffer: B,
    /// The hyperparameters.
    pub options: GroupOptions,
}

impl<B> Group<B> {
    /// A group with base rule `base` and the optimizer's default ρ and adaptivity.
    pub fn new(buffer: B, base: BaseRule) -> Self {
        Group {
            buffer,
            options: GroupOptions::new(base),
        }
    }

    /// A group with explicit options.
    pub fn with_options(buffer: B, options: GroupOptions) -> Self {
        Group { buffer, options }
    }
}

/// Per-group hyperparameters: the base rule and optional overrides of the variant's ρ and
/// adaptivity (`None` inherits the optimizer's value, like a torch param-group dict).
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GroupOptions {
    base: BaseRule,
    rho: Option<f64>,
    adaptive: Option<bool>,
}

impl GroupOptions {
    /// Options with this base rule and no overrides.
    pub fn new(base: BaseRule) -> Self {
        GroupOptions {
            base,
            rho: None,
            adaptive: None,
        }
    }

    /// Overrides ρ for this group; `rho ≥ 0` and finite.
    pub fn with_rho(mut self, rho: f64) -> Result<Self, Error> {
        self.rho = Some(non_negative("rho", rho)?);
        Ok(self)
    }

    /// Overrides adaptivity (ASAM) for this group.
    pub fn with_adaptive(mut self, adaptive: bool) -> Self {
        self.adaptive = Some(adaptive);
        self
    }

    /// Replaces the base rule (already validated).
    pub fn with_base(mut self, base: BaseRule) -> Self {
        self.base = base;
        self
    }

    /// Sets the base rule's learning rate (between steps: a running optimizer reads it at the
    /// next step). `lr ≥ 0` and finite; nothing changes on error.
    ///
    /// ```
    /// use sam_core::{BaseRule, GroupOptions, SgdConfig};
    /// let mut o = GroupOptions::new(BaseRule::sgd(SgdConfig { lr: 0.1, ..Default::default() })?);
    /// o.set_lr(0.05)?;
    /// assert_eq!(o.base().lr(), 0.05);
    /// assert!(o.set_lr(f64::NAN).is_err());
    /// # Ok::<(), sam_core::Error>(())
    /// ```
    pub fn set_lr(&mut self, lr: f64) -> Result<(), Error> {
        self.base = self.base.with_lr(lr)?;
        Ok(())
    }

    /// The base rule.
    pub fn base(&self) -> &BaseRule {
        &self.base
    }

    /// The ρ override, if any.
    pub fn rho(&self) -> Option<f64> {
        self.rho
    }

    /// The adaptivity override, if any.
    pub fn adaptive(&self) -> Option<bool> {
        self.adaptive
    }
}
