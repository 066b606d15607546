//! Replays a conformance case through the public `sam-core` API on a backend.

use sam_core::Optimizer as _;
use sam_core::backend::{ParamBuffer, Real};
use sam_core::{
    BaseRule, Group, GroupOptions, Gsam, GsamConfig, Proportional, RhoSchedule, Sam, SamConfig,
    Schedule, ScheduleConfig, ScheduleShape, StepStatus, Timeline, Wasam, Wsam, WsamConfig,
};

use crate::backend::{Element, ReplayBackend};
use crate::case::{BaseHyper, Case, Dtype, GroupSpec, ScheduleSpec, VariantSpec};
use crate::compare::{Mismatch, first_mismatch};
use crate::objective::Problem;

/// What a replay produced, in the layout of `expected` (SCHEMA.md §8), as f64.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Trajectory {
    /// `L(θ_t)` before each step.
    pub loss: Vec<f64>,
    /// `θ_{t+1}` after each step.
    pub params: Vec<Vec<f64>>,
    /// WASAM: the average after the last step.
    pub swa_params: Option<Vec<f64>>,
    /// GSAM: the lr of group 0 used in each step.
    pub lr: Option<Vec<f64>>,
    /// GSAM: the ρ used in each step.
    pub rho: Option<Vec<f64>>,
}

/// A replay failure that is not a numeric mismatch (the case cannot be run).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayError(pub String);

impl core::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReplayError {}

impl<E: core::fmt::Display> From<sam_core::Error<E>> for ReplayError {
    fn from(e: sam_core::Error<E>) -> Self {
        ReplayError(format!("optimizer error: {e}"))
    }
}

impl From<String> for ReplayError {
    fn from(s: String) -> Self {
        ReplayError(s)
    }
}

/// The verdict on one case.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every element within tolerance.
    Pass,
    /// The first element out of tolerance.
    Mismatch(Mismatch),
    /// The case could not be run.
    Error(String),
}

/// Replays `case` on `backend` in the case's dtype and compares with `expected`.
pub fn check_case<K: ReplayBackend>(case: &Case, backend: &K) -> Verdict {
    let run = match case.dtype {
        Dtype::F32 => replay::<f32, K>(case, backend),
        Dtype::F64 => replay::<f64, K>(case, backend),
    };
    match run {
        Ok(traj) => match compare(case, &traj) {
            None => Verdict::Pass,
            Some(m) => Verdict::Mismatch(m),
        },
        Err(e) => Verdict::Error(e.0),
    }
}

/// The first element of `traj` outside the case's tolerance, if any.
pub fn compare(case: &Case, traj: &Trajectory) -> Option<Mismatch> {
    let tol = &case.tolerance;
    let e = &case.expected;
    if let Some(m) = first_mismatch("loss", None, &traj.loss, &e.loss, tol) {
        return Some(m);
    }
    if traj.params.len() != e.params.len() {
        return first_mismatch("params", None, &[], &[0.0], tol);
    }
    for (t, (got, exp)) in traj.params.iter().zip(&e.params).enumerate() {
        if let Some(m) = first_mismatch("params", Some(t), got, exp, tol) {
            return Some(m);
        }
    }
    let extras = [
        ("swa_params", &traj.swa_params, &e.swa_params),
        ("lr", &traj.lr, &e.lr),
        ("rho", &traj.rho, &e.rho),
    ];
    for (name, got, exp) in extras {
        if let Some(exp) = exp {
            let got = got.as_deref().unwrap_or(&[]);
            if let Some(m) = first_mismatch(name, None, got, exp, tol) {
                return Some(m);
            }
        }
    }
    None
}

/// Maps a case's base optimizer onto a validated [`BaseRule`].
pub fn base_rule(b: &BaseHyper) -> Result<BaseRule, ReplayError> {
    Ok(match *b {
        BaseHyper::Sgd(c) => BaseRule::sgd(c)?,
        BaseHyper::Adam(c) => BaseRule::adam(c)?,
        BaseHyper::AdamW(c) => BaseRule::adamw(c)?,
    })
}

/// Group options with the group's resolved ρ and adaptivity (SCHEMA.md §4).
fn group_options(g: &GroupSpec, with_rho: bool) -> Result<GroupOptions, ReplayError> {
    let o = GroupOptions::new(base_rule(&g.base)?);
    Ok(if with_rho {
        o.with_rho(g.rho)?.with_adaptive(g.adaptive)
    } else {
        o
    })
}

/// Where each group's elements sit in θ.
struct Layout {
    /// Per group: `(offset in θ, length)` of each of its params, in the group's order.
    spans: Vec<Vec<(usize, usize)>>,
    n: usize,
}

impl Layout {
    fn new(case: &Case) -> Self {
        let offsets = case.offsets();
        let spans = case
            .groups
            .iter()
            .map(|g| {
                g.params
                    .iter()
                    .map(|&p| (offsets[p], case.params[p].init.len()))
                    .collect()
            })
            .collect();
        Layout {
            spans,
            n: case.n_elements(),
        }
    }

    fn gather_group<T: Copy>(&self, gi: usize, theta: &[T]) -> Vec<T> {
        self.spans[gi]
            .iter()
            .flat_map(|&(o, l)| theta[o..o + l].iter().copied())
            .collect()
    }

    fn scatter_group<T: Copy>(&self, gi: usize, flat: &[T], theta: &mut [T]) {
        let mut at = 0;
        for &(o, l) in &self.spans[gi] {
            theta[o..o + l].copy_from_slice(&flat[at..at + l]);
            at += l;
        }
    }
}

/// Reads θ out of the groups.
fn read_theta<T: Element, K: ReplayBackend>(
    backend: &K,
    layout: &Layout,
    groups: &[Group<K::Buf<T>>],
    scratch: &mut Vec<T>,
    theta: &mut [T],
) -> Result<(), ReplayError> {
    for (gi, g) in groups.iter().enumerate() {
        scratch.resize(g.buffer.len(), T::default());
        backend.read_weights(&g.buffer, scratch)?;
        layout.scatter_group(gi, scratch, theta);
    }
    Ok(())
}

fn to_f64<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// Replays `case` in element type `T` on `backend`.
pub fn replay<T, K>(case: &Case, backend: &K) -> Result<Trajectory, ReplayError>
where
    T: Element,
    K: ReplayBackend,
{
    let problem = Problem::<T>::new(&case.objective);
    let layout = Layout::new(case);
    let theta0: Vec<T> = case
        .params
        .iter()
        .flat_map(|p| p.init.iter().map(|&x| <T as Real>::from_f64(x)))
        .collect();
    let with_rho = !matches!(case.variant, VariantSpec::Gsam { .. });
    let mut groups = Vec::with_capacity(case.groups.len());
    for (gi, g) in case.groups.iter().enumerate() {
        let lens: Vec<usize> = layout.spans[gi].iter().map(|&(_, l)| l).collect();
        let buf = backend.make(layout.gather_group(gi, &theta0), &lens)?;
        groups.push(Group::with_options(buf, group_options(g, with_rho)?));
    }
    let mut theta = theta0.clone();
    let mut grad = vec![T::default(); layout.n];
    let mut scratch = Vec::new();
    // The objective as the optimizer's closure: read θ, compute L and ∇L, write ∇L.
    let mut eval = |groups: &mut [Group<K::Buf<T>>]| -> Result<T, ReplayError> {
        read_theta(backend, &layout, groups, &mut scratch, &mut theta)?;
        let loss = problem.loss_grad(&theta, &mut grad);
        for (gi, g) in groups.iter_mut().enumerate() {
            let flat = layout.gather_group(gi, &grad);
            backend.write_grad(&mut g.buffer, &flat)?;
        }
        Ok(loss)
    };
    let mut traj = Trajectory::default();
    let mut out = vec![T::default(); layout.n];
    let mut record =
        |traj: &mut Trajectory, groups: &[Group<K::Buf<T>>]| -> Result<(), ReplayError> {
            let mut s = Vec::new();
            read_theta(backend, &layout, groups, &mut s, &mut out)?;
            traj.params.push(to_f64(&out));
            Ok(())
        };
    match &case.variant {
        VariantSpec::Sam => {
            let mut opt = Sam::new(SamConfig::default())?;
            for _ in 0..case.steps {
                let r = opt.step(&mut groups, &mut eval)?;
                applied(r.status)?;
                traj.loss.push(Real::to_f64(r.loss));
                record(&mut traj, &groups)?;
            }
        }
        VariantSpec::Wasam { swa_start } => {
            let mut opt = Wasam::new(SamConfig::default(), &[*swa_start])?;
            for _ in 0..case.steps {
                let r = opt.step(&mut groups, &mut eval)?;
                applied(r.status)?;
                traj.loss.push(Real::to_f64(r.loss));
                record(&mut traj, &groups)?;
            }
            let mut avg = vec![T::default(); layout.n];
            let mut s = Vec::new();
            for (gi, g) in groups.iter().enumerate() {
                s.resize(g.buffer.len(), T::default());
                backend.read_average(&g.buffer, 0, &mut s)?;
                layout.scatter_group(gi, &s, &mut avg);
            }
            traj.swa_params = Some(to_f64(&avg));
        }
        VariantSpec::Wsam {
            gamma,
            decouple,
            max_norm,
            sam_eps,
        } => {
            let cfg = WsamConfig {
                perturbation: sam_core::Perturbation {
                    eps: *sam_eps,
                    ..Default::default()
                },
                gamma: *gamma,
                decouple: *decouple,
                max_norm: *max_norm,
                ..Default::default()
            };
            let mut opt = Wsam::new(cfg)?;
            for _ in 0..case.steps {
                let r = opt.step(&mut groups, &mut eval)?;
                applied(r.status)?;
                traj.loss.push(Real::to_f64(r.loss));
                record(&mut traj, &groups)?;
            }
        }
        VariantSpec::Gsam {
            alpha,
            adaptive,
            perturb_eps,
            rho_schedule,
            lr_schedule,
        } => {
            let rho = match rho_schedule {
                ScheduleSpec::Proportion {
                    max_lr,
                    min_lr,
                    max_value,
                    min_value,
                } => RhoSchedule::Proportional(Proportional {
                    max_lr: *max_lr,
                    min_lr: *min_lr,
                    max_value: *max_value,
                    min_value: *min_value,
                }),
                other => RhoSchedule::Schedule(schedule(other)?),
            };
            let lr_schedule = lr_schedule.as_ref().map(schedule).transpose()?;
            let cfg = GsamConfig {
                perturbation: sam_core::Perturbation {
                    adaptive: *adaptive,
                    eta: 0.0,
                    eps: *perturb_eps,
                    ..Default::default()
                },
                alpha: *alpha,
                rho_schedule: Some(rho),
                lr_schedule,
                timeline: Timeline::Upstream,
            };
            let mut opt = Gsam::new(cfg)?;
            let lr0 = case.groups.first().map_or(0.0, |g| g.base.lr());
            let (mut lrs, mut rhos) = (Vec::new(), Vec::new());
            for t in 0..case.steps as u64 {
                lrs.push(opt.lr_at(t, lr0));
                rhos.push(opt.rho_at(t));
                let r = opt.step(&mut groups, &mut eval)?;
                applied(r.status)?;
                traj.loss.push(Real::to_f64(r.loss));
                record(&mut traj, &groups)?;
            }
            traj.lr = Some(lrs);
            traj.rho = Some(rhos);
        }
    }
    Ok(traj)
}

/// A linear or cosine schedule of a case (step counts must be whole, non-negative numbers).
fn schedule(s: &ScheduleSpec) -> Result<Schedule, ReplayError> {
    let (shape, t_max, max_value, min_value, init_value, warmup_steps) = match *s {
        ScheduleSpec::Linear {
            t_max,
            max_value,
            min_value,
            init_value,
            warmup_steps,
        } => (
            ScheduleShape::Linear,
            t_max,
            max_value,
            min_value,
            init_value,
            warmup_steps,
        ),
        ScheduleSpec::Cosine {
            t_max,
            max_value,
            min_value,
            init_value,
            warmup_steps,
        } => (
            ScheduleShape::Cosine,
            t_max,
            max_value,
            min_value,
            init_value,
            warmup_steps,
        ),
        ScheduleSpec::Proportion { .. } => {
            return Err(ReplayError(
                "a proportion schedule can only drive rho".into(),
            ));
        }
    };
    let count = |name: &str, x: f64| -> Result<u64, ReplayError> {
        if x >= 0.0 && x.fract() == 0.0 && x < 9.0e15 {
            Ok(x as u64)
        } else {
            Err(ReplayError(format!(
                "schedule {name} must be a whole number >= 0, got {x}"
            )))
        }
    };
    let cfg = ScheduleConfig {
        shape,
        t_max: count("t_max", t_max)?,
        max_value,
        min_value,
        init_value,
        warmup_steps: count("warmup_steps", warmup_steps)?,
        clamp: false,
    };
    Ok(Schedule::new(cfg)?)
}

fn applied(s: StepStatus) -> Result<(), ReplayError> {
    match s {
        StepStatus::Applied => Ok(()),
        StepStatus::Skipped(r) => Err(ReplayError(format!("the optimizer skipped a step: {r:?}"))),
    }
}

/// The case-file name of a variant.
pub fn variant_name(v: &VariantSpec) -> &'static str {
    match v {
        VariantSpec::Sam => "sam",
        VariantSpec::Wasam { .. } => "wasam",
        VariantSpec::Wsam { .. } => "wsam",
        VariantSpec::Gsam { .. } => "gsam",
    }
}
