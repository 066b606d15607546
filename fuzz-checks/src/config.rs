//! Hyperparameter generators, the documented domains, the finiteness class's normal ranges, and
//! the `config` check.
//!
//! Every constructor of `sam-core` is fed hyperparameters from [`palette::hyper`] (NaN, ±∞,
//! negative, zero, subnormal, huge, and ordinary values). The check asserts that construction
//! never panics, that it succeeds **exactly** when the values are in the domain each field's
//! documentation states (so neither an invalid value slips through nor a valid one is
//! refused), that a refusal is [`Error::InvalidHyperparameter`], and that the values a
//! validated object computes (schedule values, GSAM's ρ and lr, WSAM's α) are finite.

use sam_core::{
    AdamConfig, BaseRule, Error, GroupOptions, Gsam, GsamConfig, Optimizer, Perturbation,
    Proportional, RhoSchedule, SamConfig, Schedule, ScheduleConfig, ScheduleShape, SgdConfig,
    Timeline, Wsam, WsamConfig,
};

use crate::palette::{self, hyper};
use crate::src::Src;
use crate::variant::{Drawn, WithDrawn};
use crate::{Finding, Policy, Violation};

fn nonneg(x: f64) -> bool {
    x >= 0.0 && x.is_finite()
}

fn unit(x: f64) -> bool {
    (0.0..1.0).contains(&x)
}

/// A base rule before validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseRaw {
    /// `BaseRule::sgd`.
    Sgd(SgdConfig),
    /// `BaseRule::adam`.
    Adam(AdamConfig),
    /// `BaseRule::adamw`.
    AdamW(AdamConfig),
}

impl BaseRaw {
    /// Draws a base rule; `wild` draws every field from the special palette too.
    pub fn generate(s: &mut Src<'_>, wild: bool) -> Self {
        let h = |s: &mut Src<'_>, lo: f64, hi: f64| {
            if wild {
                hyper(s, lo, hi)
            } else {
                s.uniform(lo, hi)
            }
        };
        match s.int(0, 2) {
            0 => {
                let momentum = if s.chance(1, 3) { 0.0 } else { h(s, 0.0, 1.0) };
                let nesterov = s.chance(1, 4);
                let dampening = if (nesterov && !wild) || s.bool() {
                    0.0
                } else {
                    h(s, 0.0, 1.0)
                };
                BaseRaw::Sgd(SgdConfig {
                    lr: h(s, 0.0, 10.0),
                    momentum: if nesterov && momentum == 0.0 && !wild {
                        0.5
                    } else {
                        momentum
                    },
                    dampening,
                    weight_decay: if s.bool() { 0.0 } else { h(s, 0.0, 1.0) },
                    nesterov,
                })
            }
            k => {
                let c = AdamConfig {
                    lr: h(s, 0.0, 10.0),
                    beta1: h(s, 0.0, 0.999_999),
                    beta2: h(s, 0.0, 0.999_999),
                    eps: if wild {
                        hyper(s, 1e-12, 1.0)
                    } else {
                        10f64.powf(s.uniform(-12.0, 10.0))
                    },
                    weight_decay: if s.bool() { 0.0 } else { h(s, 0.0, 1.0) },
                    amsgrad: s.bool(),
                };
                if k == 1 {
                    BaseRaw::Adam(c)
                } else {
                    BaseRaw::AdamW(c)
                }
            }
        }
    }

    /// The documented domain (field docs of `SgdConfig` / `AdamConfig`).
    pub fn in_domain(&self) -> bool {
        match *self {
            BaseRaw::Sgd(c) => {
                nonneg(c.lr)
                    && nonneg(c.weight_decay)
                    && nonneg(c.momentum)
                    && c.dampening.is_finite()
                    && (!c.nesterov || (c.momentum > 0.0 && c.dampening == 0.0))
            }
            BaseRaw::Adam(c) | BaseRaw::AdamW(c) => {
                nonneg(c.lr)
                    && nonneg(c.weight_decay)
                    && unit(c.beta1)
                    && unit(c.beta2)
                    && c.eps > 0.0
                    && c.eps.is_finite()
            }
        }
    }

    /// The normal ranges of the finiteness class (see the crate docs).
    pub fn normal(&self) -> bool {
        let r = |x: f64, lo: f64, hi: f64| (lo..=hi).contains(&x);
        self.in_domain()
            && match *self {
                BaseRaw::Sgd(c) => {
                    r(c.lr, 0.0, 10.0)
                        && r(c.momentum, 0.0, 1.0)
                        && r(c.dampening, 0.0, 1.0)
                        && r(c.weight_decay, 0.0, 1.0)
                }
                BaseRaw::Adam(c) | BaseRaw::AdamW(c) => {
                    r(c.lr, 0.0, 10.0) && r(c.eps, 1e-12, 1e10) && r(c.weight_decay, 0.0, 1.0)
                }
            }
    }

    /// Validates through `sam-core`.
    pub fn build(&self) -> Result<BaseRule, Error> {
        match *self {
            BaseRaw::Sgd(c) => BaseRule::sgd(c),
            BaseRaw::Adam(c) => BaseRule::adam(c),
            BaseRaw::AdamW(c) => BaseRule::adamw(c),
        }
    }
}

/// Draws a schedule configuration with values around `[lo, hi]`.
pub fn schedule_raw(s: &mut Src<'_>, wild: bool, lo: f64, hi: f64) -> ScheduleConfig {
    let h = |s: &mut Src<'_>| {
        if wild {
            hyper(s, lo, hi)
        } else {
            s.uniform(lo, hi)
        }
    };
    let shape = match s.int(0, 3) {
        0 => ScheduleShape::Constant,
        1 => ScheduleShape::Linear,
        2 => ScheduleShape::Cosine,
        _ => ScheduleShape::Polynomial {
            power: if wild {
                hyper(s, 0.1, 4.0)
            } else {
                s.uniform(0.1, 4.0)
            },
        },
    };
    let warmup_steps = if wild { palette::count(s) } else { s.int(0, 6) };
    let t_max = if wild {
        palette::count(s)
    } else {
        warmup_steps + s.int(1, 12)
    };
    ScheduleConfig {
        shape,
        t_max,
        max_value: h(s),
        min_value: h(s),
        init_value: h(s),
        warmup_steps,
        clamp: s.bool(),
    }
}

/// The documented domain of `Schedule::new`: values within ±`MAX_VALUE`, step counts at most
/// `MAX_STEP`, `t_max > warmup_steps` unless constant, a finite positive polynomial power.
pub fn schedule_in_domain(c: &ScheduleConfig) -> bool {
    let within = |v: f64| v.abs() <= sam_core::MAX_VALUE;
    within(c.max_value)
        && within(c.min_value)
        && within(c.init_value)
        && c.t_max <= sam_core::MAX_STEP
        && c.warmup_steps <= sam_core::MAX_STEP
        && (matches!(c.shape, ScheduleShape::Constant) || c.t_max > c.warmup_steps)
        && match c.shape {
            ScheduleShape::Polynomial { power } => power > 0.0 && power.is_finite(),
            _ => true,
        }
}

/// The documented domain of `Proportional::validate`: finite values with finite differences.
pub fn proportional_in_domain(p: &Proportional) -> bool {
    p.max_lr.is_finite()
        && p.min_lr.is_finite()
        && p.max_value.is_finite()
        && p.min_value.is_finite()
        && (p.max_lr - p.min_lr).is_finite()
        && (p.max_value - p.min_value).is_finite()
}

/// Draws a proportional ρ.
pub fn proportional_raw(s: &mut Src<'_>, wild: bool) -> Proportional {
    let h = |s: &mut Src<'_>, lo: f64, hi: f64| {
        if wild {
            hyper(s, lo, hi)
        } else {
            s.uniform(lo, hi)
        }
    };
    Proportional {
        max_lr: h(s, 0.0, 2.0),
        min_lr: h(s, 0.0, 1.0),
        max_value: h(s, 0.0, 1.0),
        min_value: h(s, 0.0, 0.5),
    }
}

/// GSAM hyperparameters before validation (schedules as configurations).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GsamRaw {
    /// α.
    pub alpha: f64,
    /// ρ: a schedule configuration or a proportional rule.
    pub rho: Result<ScheduleConfig, Proportional>,
    /// The lr schedule configuration.
    pub lr_schedule: Option<ScheduleConfig>,
    /// The timeline.
    pub timeline: Timeline,
    /// The climb (`adaptive`, `eta`, `eps`; its `rho` is unused: ρ comes from `rho`).
    pub perturbation: Perturbation,
}

impl GsamRaw {
    /// Validates the schedules, then the optimizer.
    pub fn build(&self) -> Result<Gsam, Error> {
        let rho = match self.rho {
            Ok(c) => RhoSchedule::Schedule(Schedule::new(c)?),
            Err(p) => RhoSchedule::Proportional(p),
        };
        let lr_schedule = self.lr_schedule.map(Schedule::new).transpose()?;
        Gsam::new(GsamConfig {
            alpha: self.alpha,
            perturbation: self.perturbation,
            rho_schedule: Some(rho),
            lr_schedule,
            timeline: self.timeline,
        })
    }

    /// The documented domain (schedules included).
    pub fn in_domain(&self) -> bool {
        let p_ok = |p: &Proportional| proportional_in_domain(p);
        nonneg(self.alpha)
            && nonneg(self.perturbation.eta)
            && nonneg(self.perturbation.eps)
            && match &self.rho {
                Ok(c) => schedule_in_domain(c),
                Err(p) => p_ok(p) && self.lr_schedule.is_some(),
            }
            && self.lr_schedule.as_ref().is_none_or(schedule_in_domain)
    }
}

/// A variant's hyperparameters before validation.
#[derive(Debug, Clone, PartialEq)]
pub enum VariantRaw {
    /// SAM / ASAM.
    Sam(SamConfig),
    /// GSAM.
    Gsam(GsamRaw),
    /// WSAM.
    Wsam(WsamConfig),
    /// WASAM with these average starts.
    Wasam(SamConfig, Vec<u64>),
    /// The plain base optimizer.
    Base,
}

fn sam_raw(s: &mut Src<'_>, wild: bool) -> SamConfig {
    let h = |s: &mut Src<'_>, lo: f64, hi: f64| {
        if wild {
            hyper(s, lo, hi)
        } else {
            s.uniform(lo, hi)
        }
    };
    SamConfig {
        perturbation: Perturbation {
            rho: h(s, 0.0, 2.0),
            adaptive: s.bool(),
            eta: if s.bool() { 0.0 } else { h(s, 0.0, 1.0) },
            eps: s.pick(&[1e-12_f64, 0.0, 1e-12, 1e-3]).max(if wild {
                hyper(s, 0.0, 1.0)
            } else {
                0.0
            }),
        },
        check_second_gradient: !s.chance(1, 8),
    }
}

impl VariantRaw {
    /// Draws a variant and its hyperparameters.
    pub fn generate(s: &mut Src<'_>, wild: bool) -> Self {
        let h = |s: &mut Src<'_>, lo: f64, hi: f64| {
            if wild {
                hyper(s, lo, hi)
            } else {
                s.uniform(lo, hi)
            }
        };
        match s.int(0, 4) {
            0 => VariantRaw::Sam(sam_raw(s, wild)),
            1 => {
                let lr_schedule = if s.bool() {
                    Some(schedule_raw(s, wild, -0.5, 2.0))
                } else {
                    None
                };
                let rho = if lr_schedule.is_some() && s.chance(1, 3) {
                    Err(proportional_raw(s, wild))
                } else {
                    Ok(schedule_raw(s, wild, 0.0, 1.0))
                };
                // Draws in the order of the stored inputs' decoding.
                let alpha = h(s, 0.0, 2.0);
                let timeline = if s.bool() {
                    Timeline::Upstream
                } else {
                    Timeline::Synced
                };
                let adaptive = s.chance(1, 3);
                let eta = if s.bool() { 0.0 } else { h(s, 0.0, 1.0) };
                let eps = s.pick(&[1e-12_f64, 0.0, 1e-12, 1e-6]).max(if wild {
                    hyper(s, 0.0, 1.0)
                } else {
                    0.0
                });
                // Formerly GSAM's `check_second_gradient` (always on now); still drawn so that
                // stored inputs decode as before.
                let _ = s.bool();
                VariantRaw::Gsam(GsamRaw {
                    alpha,
                    rho,
                    lr_schedule,
                    timeline,
                    perturbation: Perturbation {
                        rho: 0.0,
                        adaptive,
                        eta,
                        eps,
                    },
                })
            }
            2 => {
                // Draws in the order of the stored inputs' decoding.
                let rho = h(s, 0.0, 2.0);
                let gamma = h(s, 0.0, 0.99);
                let adaptive = s.chance(1, 3);
                let eta = if s.bool() { 0.0 } else { h(s, 0.0, 1.0) };
                let decouple = s.bool();
                let max_norm = if s.bool() {
                    None
                } else {
                    Some(h(s, 1e-3, 100.0))
                };
                let eps = s.pick(&[1e-12_f64, 0.0, 1e-12]).max(if wild {
                    hyper(s, 0.0, 1.0)
                } else {
                    0.0
                });
                VariantRaw::Wsam(WsamConfig {
                    perturbation: Perturbation {
                        rho,
                        adaptive,
                        eta,
                        eps,
                    },
                    gamma,
                    decouple,
                    max_norm,
                    check_second_gradient: !s.chance(1, 8),
                })
            }
            3 => {
                let cfg = sam_raw(s, wild);
                let n = if wild { s.usize(0, 6) } else { s.usize(1, 4) };
                let starts = (0..n)
                    .map(|_| if wild { palette::count(s) } else { s.int(0, 4) })
                    .collect();
                VariantRaw::Wasam(cfg, starts)
            }
            _ => VariantRaw::Base,
        }
    }

    /// The documented domain.
    pub fn in_domain(&self) -> bool {
        let climb_ok = |p: &Perturbation| nonneg(p.rho) && nonneg(p.eta) && nonneg(p.eps);
        let sam_ok = |c: &SamConfig| climb_ok(&c.perturbation);
        match self {
            VariantRaw::Sam(c) => sam_ok(c),
            VariantRaw::Gsam(g) => g.in_domain(),
            VariantRaw::Wsam(c) => {
                climb_ok(&c.perturbation)
                    && unit(c.gamma)
                    && c.max_norm.is_none_or(|m| m > 0.0 && m.is_finite())
            }
            VariantRaw::Wasam(c, starts) => {
                sam_ok(c) && (1..=sam_core::backend::MAX_AVERAGES).contains(&starts.len())
            }
            VariantRaw::Base => true,
        }
    }

    /// The normal ranges of the finiteness class (see the crate docs). Values the step uses at
    /// run time (GSAM's lr) are checked by the step check.
    pub fn normal(&self) -> bool {
        let r = |x: f64, lo: f64, hi: f64| (lo..=hi).contains(&x);
        let sched = |c: &ScheduleConfig| {
            r(c.max_value, -10.0, 10.0)
                && r(c.min_value, -10.0, 10.0)
                && r(c.init_value, -10.0, 10.0)
        };
        self.in_domain()
            && match self {
                VariantRaw::Gsam(g) => {
                    r(g.alpha, 0.0, 10.0) && g.lr_schedule.as_ref().is_none_or(sched)
                }
                VariantRaw::Wsam(c) => r(c.gamma, 0.0, 0.99),
                _ => true,
            }
    }
}

/// A wrapper around the drawn variant: LookSAM with the variant's climb, or SAM every `k` steps
/// of the variant (the efficiency variants of `sam-core`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Wrap {
    /// The variant as drawn.
    None,
    /// `Interval::new(variant, k)` (SAM, GSAM, WSAM, WASAM).
    Interval(u64),
    /// `LookSam` with the variant's perturbation (SAM, WSAM, WASAM), refresh interval `k` and
    /// weight `alpha`.
    LookSam {
        /// The refresh interval.
        k: u64,
        /// The weight of the stored direction.
        alpha: f64,
    },
}

impl Wrap {
    /// Draws a wrapper for `variant` ([`Wrap::None`] where it does not apply).
    pub fn generate(s: &mut Src<'_>, wild: bool, variant: &VariantRaw) -> Self {
        let k = |s: &mut Src<'_>| if wild { palette::count(s) } else { s.int(1, 4) };
        let w = match s.int(0, 2) {
            0 => Wrap::None,
            1 => Wrap::Interval(k(s)),
            _ => Wrap::LookSam {
                k: k(s),
                alpha: if wild {
                    hyper(s, 0.0, 10.0)
                } else {
                    s.pick(&[0.0, 0.3, 0.7, 1.0, 3.5])
                },
            },
        };
        match (w, variant) {
            (Wrap::Interval(_), VariantRaw::Base) => Wrap::None,
            (Wrap::LookSam { .. }, VariantRaw::Gsam(_) | VariantRaw::Base) => Wrap::None,
            _ => w,
        }
    }

    /// The normal ranges of the finiteness class: LookSAM's `α ∈ [0, 10]`.
    pub fn normal(&self) -> bool {
        match *self {
            Wrap::LookSam { alpha, .. } => (0.0..=10.0).contains(&alpha),
            _ => true,
        }
    }
}

/// Group options before validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupRaw {
    /// The base rule.
    pub base: BaseRaw,
    /// A ρ override.
    pub rho: Option<f64>,
    /// An adaptivity override.
    pub adaptive: Option<bool>,
}

impl GroupRaw {
    /// Draws group options; `overrides` is the chance (out of 8) of each override.
    pub fn generate(s: &mut Src<'_>, wild: bool, overrides: u8) -> Self {
        let base = BaseRaw::generate(s, wild);
        let rho = s.chance(overrides, 8).then(|| {
            if wild {
                hyper(s, 0.0, 2.0)
            } else {
                s.uniform(0.0, 2.0)
            }
        });
        let adaptive = s.chance(overrides, 8).then(|| s.bool());
        GroupRaw {
            base,
            rho,
            adaptive,
        }
    }

    /// Validates.
    pub fn build(&self) -> Result<GroupOptions, Error> {
        let mut o = GroupOptions::new(self.base.build()?);
        if let Some(r) = self.rho {
            o = o.with_rho(r)?;
        }
        if let Some(a) = self.adaptive {
            o = o.with_adaptive(a);
        }
        Ok(o)
    }

    /// The documented domain.
    pub fn in_domain(&self) -> bool {
        self.base.in_domain() && self.rho.is_none_or(nonneg)
    }
}

/// Step indices worth evaluating a schedule at.
fn probe_steps(c: &ScheduleConfig) -> [u64; 12] {
    let (w, t) = (c.warmup_steps, c.t_max);
    [
        0,
        1,
        w.saturating_sub(1),
        w,
        w.saturating_add(1),
        t.saturating_sub(1),
        t,
        t.saturating_add(1),
        t.saturating_mul(2),
        t.saturating_add(t / 2),
        1 << 40,
        u64::MAX,
    ]
}

fn check_construction(
    what: &'static str,
    result: Result<(), Error>,
    in_domain: bool,
    detail: &dyn core::fmt::Debug,
) -> Result<(), Violation> {
    match (result, in_domain) {
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => Err(Violation::new(
            None,
            format!("{what}: accepted a configuration outside its documented domain: {detail:?}"),
        )),
        (Err(Error::InvalidHyperparameter { name, message }), false) => {
            if name.is_empty() || message.is_empty() {
                return Err(Violation::new(
                    None,
                    format!("{what}: an error without name or message for {detail:?}"),
                ));
            }
            Ok(())
        }
        (Err(e), _) => Err(Violation::new(
            None,
            format!(
                "{what}: refused a configuration inside its documented domain, or refused with the wrong error ({e}): {detail:?}"
            ),
        )),
    }
}

/// A validated schedule's value must be finite for every step index.
fn check_schedule_values(what: &'static str, sched: &Schedule) -> Result<(), Violation> {
    for k in probe_steps(sched.config()) {
        let v = sched.value(k);
        if !v.is_finite() {
            return Err(Violation::new(
                Some(Finding::ScheduleNotFinite),
                format!(
                    "{what}: validated schedule {:?} gives {v} at step {k}",
                    sched.config()
                ),
            ));
        }
    }
    Ok(())
}

/// The `config` check: see the module docs.
pub fn check(data: &[u8], policy: &Policy) {
    let mut s = Src::new(data);
    let wild = !s.chance(1, 4);
    if let Err(v) = run(&mut s, wild) {
        policy.report(v);
    }
}

fn run(s: &mut Src<'_>, wild: bool) -> Result<(), Violation> {
    // Base rules and group options.
    for _ in 0..3 {
        let g = GroupRaw::generate(s, wild, 4);
        check_construction(
            "BaseRule",
            g.base.build().map(|_| ()),
            g.base.in_domain(),
            &g.base,
        )?;
        check_construction("GroupOptions", g.build().map(|_| ()), g.in_domain(), &g)?;
        if let Ok(o) = g.build() {
            let b = o.base();
            if b.lr()
                != match g.base {
                    BaseRaw::Sgd(c) => c.lr,
                    BaseRaw::Adam(c) | BaseRaw::AdamW(c) => c.lr,
                }
            {
                return Err(Violation::new(
                    None,
                    "BaseRule::lr differs from the configured lr".into(),
                ));
            }
            let _ = b.step_coefficients(s.u64(), b.lr());
        }
    }
    // Schedules and proportional rules on their own.
    let c = schedule_raw(s, wild, -1.0, 1.0);
    check_construction(
        "Schedule",
        Schedule::new(c).map(|_| ()),
        schedule_in_domain(&c),
        &c,
    )?;
    if let Ok(sched) = Schedule::new(c) {
        check_schedule_values("Schedule", &sched)?;
    }
    let p = proportional_raw(s, wild);
    let p_ok = proportional_in_domain(&p);
    check_construction("Proportional", p.validate(), p_ok, &p)?;
    if let Ok(sched) = Schedule::constant(hyper(s, 0.0, 1.0)) {
        check_schedule_values("Schedule::constant", &sched)?;
    }
    // Every variant.
    let v = VariantRaw::generate(s, wild);
    let built = v.build_into(Computed(&v));
    check_construction(
        "variant",
        built.as_ref().map(|_| ()).map_err(Clone::clone),
        v.in_domain(),
        &v,
    )?;
    built.unwrap_or(Ok(()))
}

/// Checks the values a validated variant computes (schedules, GSAM's ρ and lr, WSAM's α,
/// WASAM's counts).
struct Computed<'a>(&'a VariantRaw);

impl WithDrawn for Computed<'_> {
    type Out = Result<(), Violation>;

    fn run<O: Drawn>(self, opt: O) -> Self::Out {
        let v = self.0;
        if let Some(g) = opt.gsam() {
            let cfg = *g.config();
            if let Some(RhoSchedule::Schedule(sch)) = &cfg.rho_schedule {
                check_schedule_values("GSAM rho schedule", sch)?;
            }
            if let Some(sch) = &cfg.lr_schedule {
                check_schedule_values("GSAM lr schedule", sch)?;
            }
            let steps: Vec<u64> = cfg
                .lr_schedule
                .map_or([0; 12], |l| probe_steps(l.config()))
                .to_vec();
            for t in steps {
                let lr = g.lr_at(t, 0.1);
                if !lr.is_finite() {
                    return Err(Violation::new(
                        Some(Finding::ScheduleNotFinite),
                        format!("GSAM lr_at({t}) = {lr} for {v:?}"),
                    ));
                }
                let _ = g.rho_at(t);
            }
        }
        let alpha = opt.wsam().map_or(0.0, Wsam::alpha);
        if !(alpha.is_finite() && alpha >= 0.0) {
            return Err(Violation::new(
                None,
                format!("WSAM alpha {alpha} for {v:?}"),
            ));
        }
        if opt
            .wasam()
            .is_some_and(|w| w.counts().len() != w.swa_starts().len())
        {
            return Err(Violation::new(
                None,
                "WASAM counts and starts differ in length".into(),
            ));
        }
        Ok(())
    }
}
