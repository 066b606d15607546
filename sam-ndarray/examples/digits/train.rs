//! Training one model with one optimizer through `sam-ndarray` groups.

use std::error::Error;
use std::time::Instant;

use half::{bf16, f16};
use indicatif::ProgressBar;
use ndarray::{Axis, s};
use sam_core::backend::Real;
use sam_core::{BaseRule, Group, Optimizer, Schedule, SgdConfig, StepStatus, Wasam};
use sam_ndarray::NdGroup;

use crate::data::Dataset;
use crate::mlp::{Eval, Mlp, flatten, narrow, widen};
use crate::optimizers::{self, Built};
use crate::precision::Precision;
use crate::rng::Rng;

pub use crate::optimizers::{Hyper, Kind};

/// One epoch's numbers.
#[derive(Debug, Clone, Copy)]
pub struct EpochLog {
    /// Evaluation (test or validation) accuracy and loss at the end of the epoch (WASAM: of
    /// the average once it exists).
    pub eval: Eval,
    /// Mean clean mini-batch loss seen during the epoch.
    pub train_loss: f64,
}

impl RunOutput {
    /// Total seconds in training steps.
    pub fn train_seconds(&self) -> f64 {
        self.epoch_seconds.iter().sum()
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Per epoch.
    pub epochs: Vec<EpochLog>,
    /// Final weights the network computes with (the model copy in the `-mixed` layouts), flat
    /// (WASAM: the running average).
    pub weights: Vec<f64>,
    /// Seconds spent in the training steps of each epoch (no evaluation).
    pub epoch_seconds: Vec<f64>,
    /// Steps attempted.
    pub steps: u64,
    /// Steps the optimizer skipped (NaN/∞ gradient, or an overflow of the loss-scaled
    /// gradient; weights left unchanged).
    pub skipped: u64,
    /// The loss scale at the end (loss-scaled precisions only).
    pub final_loss_scale: Option<f64>,
}

type Groups<W, G> = [Group<NdGroup<W, G>>; 1];
type BoxErr = Box<dyn Error>;

/// Evaluates the live weights.
fn evaluate<W: Real, G: Real>(
    groups: &[Group<NdGroup<W, G>>],
    mlp: &Mlp,
    eval: &Dataset,
) -> Result<(Eval, Vec<f64>), BoxErr> {
    let weights = network_weights(&groups[0].buffer);
    let (e, _) = mlp.forward(&weights, eval.x.view(), &eval.y, false)?;
    Ok((e, flatten(&weights)))
}

/// The weights the network computes with, widened: the model copy if the group keeps one, the
/// weights otherwise.
fn network_weights<W: Real, G: Real>(b: &NdGroup<W, G>) -> Vec<ndarray::ArrayD<f64>> {
    match b.model() {
        Some(m) => widen(m),
        None => widen(b.weights()),
    }
}

/// Evaluates WASAM's average once it holds a snapshot (the live weights before that).
fn evaluate_average<W: Real, G: Real>(
    w: &mut Wasam,
    groups: &mut Groups<W, G>,
    mlp: &Mlp,
    eval: &Dataset,
) -> Result<(Eval, Vec<f64>), BoxErr> {
    if w.counts().first().copied().unwrap_or(0) == 0 {
        return evaluate(groups, mlp, eval);
    }
    let sw = w.swap(groups, 0)?;
    let out = evaluate(sw.groups(), mlp, eval);
    sw.swap_back()?;
    out
}

/// Trains `mlp` on `train` with optimizer `kind` in storage `precision`; `seed` fixes the
/// initialisation and the mini-batch order (the same for every optimizer and precision, so
/// runs with the same seed are paired).
#[allow(clippy::too_many_arguments)]
pub fn train(
    kind: Kind,
    precision: Precision,
    h: &Hyper,
    mlp: &Mlp,
    train: &Dataset,
    eval: &Dataset,
    seed: u64,
    pb: &ProgressBar,
) -> Result<RunOutput, BoxErr> {
    let run = Run::new(h, mlp, train, eval, seed, pb)?;
    match precision {
        Precision::F64 => run.train_in::<f64, f64>(kind, precision),
        Precision::F32 => run.train_in::<f32, f32>(kind, precision),
        Precision::Bf16 => run.train_in::<bf16, bf16>(kind, precision),
        Precision::F16 => run.train_in::<f16, f16>(kind, precision),
        Precision::Bf16Mixed => run.train_in::<f32, bf16>(kind, precision),
        Precision::F16Mixed => run.train_in::<f32, f16>(kind, precision),
    }
}

impl Run<'_> {
    /// [`train`] with the weights and slots stored in `W`, the gradients (and the model copy,
    /// if `precision` keeps one) in `G`.
    fn train_in<W: Real, G: Real>(
        &self,
        kind: Kind,
        precision: Precision,
    ) -> Result<RunOutput, BoxErr> {
        let run = self;
        match optimizers::build(kind, run.h, run.total)? {
            Built::Base(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_live),
            Built::Sam(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_live),
            Built::Gsam(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_live),
            Built::Wsam(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_live),
            Built::Wasam(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_average),
            Built::Interval(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_live),
            Built::LookSam(mut o) => run.fit::<W, G, _>(&mut o, precision, evaluate_live),
        }
    }
}

/// [`evaluate`] with the optimizer's signature of [`Run::fit`].
fn evaluate_live<W: Real, G: Real, O>(
    _: &mut O,
    groups: &mut Groups<W, G>,
    mlp: &Mlp,
    eval: &Dataset,
) -> Result<(Eval, Vec<f64>), BoxErr> {
    evaluate(groups, mlp, eval)
}

/// One training run's fixed inputs.
struct Run<'a> {
    h: &'a Hyper,
    mlp: &'a Mlp,
    train: &'a Dataset,
    eval: &'a Dataset,
    seed: u64,
    pb: &'a ProgressBar,
    /// Steps in the run.
    total: u64,
    /// Cosine decay of the lr to 0 over the run, the same for every optimizer.
    lr_schedule: Schedule,
}

impl<'a> Run<'a> {
    fn new(
        h: &'a Hyper,
        mlp: &'a Mlp,
        train: &'a Dataset,
        eval: &'a Dataset,
        seed: u64,
        pb: &'a ProgressBar,
    ) -> Result<Self, BoxErr> {
        let total = optimizers::total_steps(h, train.len());
        let lr_schedule = optimizers::lr_schedule(h, total)?;
        Ok(Run {
            h,
            mlp,
            train,
            eval,
            seed,
            pb,
            total,
            lr_schedule,
        })
    }

    /// The training loop, the same for every optimizer of the family.
    fn fit<W: Real, G: Real, O: Optimizer>(
        &self,
        opt: &mut O,
        precision: Precision,
        evaluate: impl Fn(&mut O, &mut Groups<W, G>, &Mlp, &Dataset) -> Result<(Eval, Vec<f64>), BoxErr>,
    ) -> Result<RunOutput, BoxErr> {
        let (h, mlp, train) = (self.h, self.mlp, self.train);
        let mut init_rng = Rng::new("init", self.seed);
        let mut order_rng = Rng::new("batches", self.seed);
        let n = train.len();
        let batch = h.batch.clamp(1, n);
        let per_epoch = n.div_ceil(batch);
        let mut buffer = NdGroup::<W, G>::mixed(narrow(&mlp.init(&mut init_rng)))?;
        if precision.master_weights() {
            buffer = buffer.with_model_copy()?;
        }
        let mut groups: Groups<W, G> = [Group::new(
            buffer,
            BaseRule::sgd(SgdConfig {
                lr: h.lr,
                momentum: h.momentum,
                weight_decay: h.weight_decay,
                ..Default::default()
            })?,
        )];
        if opt.lr_schedule().is_none() {
            opt.set_lr_schedule(Some(self.lr_schedule))?;
        }
        let mut scaler = precision.loss_scaler()?;

        let mut logs = Vec::with_capacity(h.epochs);
        let mut order: Vec<usize> = (0..n).collect();
        let (mut t, mut skipped) = (0u64, 0u64);
        let mut epoch_seconds = Vec::with_capacity(h.epochs);
        let mut last_weights = flatten(&network_weights(&groups[0].buffer));
        for _epoch in 0..h.epochs {
            let start = Instant::now();
            order_rng.shuffle(&mut order);
            let xs = train.x.select(Axis(0), &order);
            let ys: Vec<usize> = order.iter().map(|&i| train.y[i]).collect();
            let mut loss_sum = 0.0;
            for b in 0..per_epoch {
                let (lo, hi) = (b * batch, ((b + 1) * batch).min(n));
                let xb = xs.slice(s![lo..hi, ..]);
                let yb = &ys[lo..hi];
                let scale = scaler.as_ref().map_or(1.0, |s| s.scale());
                if scaler.is_some() {
                    opt.set_grad_scale(scale)?;
                }
                let report = opt.step(&mut groups, |gs| -> Result<f64, BoxErr> {
                    let w = network_weights(&gs[0].buffer);
                    Ok(mlp.backward_into(&w, xb, yb, scale, &mut gs[0].buffer.grads_mut())?)
                })?;
                if let Some(s) = &mut scaler {
                    s.update(report.status.is_skipped());
                }
                if report.status != StepStatus::Applied {
                    skipped += 1;
                }
                loss_sum += report.loss * (hi - lo) as f64;
                t += 1;
            }
            epoch_seconds.push(start.elapsed().as_secs_f64());
            let (e, weights) = evaluate(opt, &mut groups, mlp, self.eval)?;
            last_weights = weights;
            logs.push(EpochLog {
                eval: e,
                train_loss: loss_sum / n as f64,
            });
            self.pb
                .set_message(format!("acc {:.2}%", 100.0 * e.accuracy()));
            self.pb.inc(1);
        }
        Ok(RunOutput {
            epochs: logs,
            weights: last_weights,
            epoch_seconds,
            steps: t,
            skipped,
            final_loss_scale: scaler.map(|s| s.scale()),
        })
    }
}
