//! The memory-traffic model of one optimizer step, per parameter, for every variant and base
//! rule: the passes the core asks the backend for (counted by a wrapper around `NdGroup`) and
//! the bytes each pass reads and writes by its specification.
//!
//! Per element, in units of the storage type (4 B for `f32`):
//! - reduce: the gradient, plus the weights (adaptive weighting) and the stash (when read);
//! - perturb: reads `w`, `g`; writes the backup, `w`, and the stash when it stashes;
//! - restore: reads the backup, writes `w`;
//! - update: reads the backup (or `w`), `g`, the stash when the final gradient or the
//!   post-correction reads it, and every base-rule state slot; writes `w`, every state slot,
//!   `g` for an external base step, and every average it folds (read and written);
//! - fold averages: reads `w`, reads and writes each average; swap: reads and writes both.
//!
//! This is the traffic of an ideal streaming backend; `cargo bench -p sam-ndarray --bench
//! sam_step` measures how close the ndarray backend comes.
//!
//! Run: `cargo run --release -p sam-ndarray --example traffic`

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{
    AverageFold, BaseStep, GradMix, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, SlotSpec,
    UpdateSpec,
};
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Group, Gsam, GsamConfig, Optimizer, Perturbation,
    RhoSchedule, Sam, SamConfig, Schedule, SgdConfig, Wasam, Wsam, WsamConfig,
};
use sam_ndarray::{NdError, NdGroup};

/// An `NdGroup` that counts the elements its passes move (in storage units per element).
struct Counting {
    inner: NdGroup<f32>,
    slots: SlotSpec,
    units: f64,
    passes: Vec<&'static str>,
}

impl Counting {
    fn add(&mut self, pass: &'static str, units: u32) {
        self.units += f64::from(units);
        self.passes.push(pass);
    }
}

impl ParamBuffer for Counting {
    type Scalar = f32;
    type Error = NdError;

    fn len(&self) -> usize {
        self.inner.len()
    }
    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), NdError> {
        self.slots = *spec;
        self.inner.prepare(spec)
    }
    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, NdError> {
        let units = 1 + u32::from(spec.reads_weights()) + u32::from(spec.reads_stash());
        self.add("reduce", units);
        self.inner.reduce(spec)
    }
    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), NdError> {
        self.add("perturb", 4 + u32::from(spec.stash));
        self.inner.perturb(spec)
    }
    fn restore(&mut self) -> Result<(), NdError> {
        self.add("restore", 2);
        self.inner.restore()
    }
    fn update(&mut self, spec: &UpdateSpec) -> Result<(), NdError> {
        let reads_stash = matches!(spec.grad, GradMix::Mix { .. }) || spec.post.is_some();
        let state = match spec.base {
            BaseStep::External => 0,
            _ => 2 * u32::from(self.slots.state),
        };
        let external = u32::from(matches!(spec.base, BaseStep::External));
        let averages = 2 * spec.average.weights.iter().flatten().count() as u32;
        self.add(
            "update",
            3 + u32::from(reads_stash) + state + external + averages,
        );
        self.inner.update(spec)
    }
    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), NdError> {
        self.add("fold", 1 + 2 * fold.weights.iter().flatten().count() as u32);
        self.inner.fold_averages(fold)
    }
    fn swap_average(&mut self, k: u8) -> Result<(), NdError> {
        self.add("swap", 4);
        self.inner.swap_average(k)
    }
}

fn group(base: BaseRule) -> Result<Vec<Group<Counting>>, Box<dyn std::error::Error>> {
    let n = 1000;
    let w = ArrayD::from_shape_vec(IxDyn(&[n]), (0..n).map(|i| i as f32 * 1e-3).collect())?;
    let g = w.mapv(|x| 0.5 - x);
    let inner = NdGroup::with_grads(vec![w], vec![g])?;
    let buffer = Counting {
        inner,
        slots: SlotSpec::default(),
        units: 0.0,
        passes: Vec::new(),
    };
    Ok(vec![Group::new(buffer, base)])
}

/// The units and passes of the third step (the first ones may differ: averages not started).
fn measure<O: Optimizer>(
    mut opt: O,
    base: BaseRule,
) -> Result<(f64, String), Box<dyn std::error::Error>> {
    let mut groups = group(base)?;
    for _ in 0..3 {
        groups[0].buffer.units = 0.0;
        groups[0].buffer.passes.clear();
        opt.step(&mut groups, |_| Ok::<_, sam_core::Error<NdError>>(0.0))?;
    }
    let b = &groups[0].buffer;
    Ok((b.units, b.passes.join(" + ")))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.01,
        momentum: 0.9,
        ..Default::default()
    })?;
    let adamw = BaseRule::adamw(AdamConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    })?;
    let gsam = GsamConfig {
        alpha: 0.4,
        ..GsamConfig::new(RhoSchedule::Schedule(Schedule::constant(0.05)?))
    };
    println!("| variant | base rule | passes (per group) | B / f32 parameter |");
    println!("|---|---|---|---|");
    for (rule, base) in [("SGD momentum", sgd), ("AdamW", adamw)] {
        let rows: Vec<(&str, (f64, String))> = vec![
            ("plain (no SAM)", measure(BaseOptimizer::new(), base)?),
            ("SAM", measure(Sam::new(SamConfig::default())?, base)?),
            (
                "ASAM",
                measure(Sam::new(Perturbation::asam(0.5, 0.01).into())?, base)?,
            ),
            ("GSAM", measure(Gsam::new(gsam)?, base)?),
            ("WSAM", measure(Wsam::new(WsamConfig::default())?, base)?),
            (
                "WSAM (coupled)",
                measure(
                    Wsam::new(WsamConfig {
                        decouple: false,
                        ..Default::default()
                    })?,
                    base,
                )?,
            ),
            (
                "WASAM (1 average)",
                measure(Wasam::new(SamConfig::default(), &[0])?, base)?,
            ),
        ];
        for (name, (units, passes)) in rows {
            println!("| {name} | {rule} | {passes} | {} |", 4.0 * units);
        }
    }
    Ok(())
}
