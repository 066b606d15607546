//! Training the CNN with one optimizer of sam-core through `SamCandle`.

use std::error::Error;
use std::time::Instant;

use indicatif::ProgressBar;
use sam_candle::{SamCandle, VarBuffer};
use sam_core::{
    BaseOptimizer, BaseRule, Group, Gsam, LookSam, Optimizer, Sam, Schedule, SgdConfig, StepStatus,
    Wasam, Wsam,
};

use crate::model::{Cnn, Split};
use crate::optimizers::{self, Built};
use crate::rng::Rng;

pub type BoxErr = Box<dyn Error>;

pub use crate::optimizers::{Hyper, Kind};

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// Test accuracy (in [0, 1]) after each epoch (WASAM: of the average once it exists).
    pub test_acc: Vec<f64>,
    /// Full pass over the training split at the final weights (WASAM: the average).
    pub final_train_loss: f64,
    /// Wall time of every step (forward and backward passes included, no evaluation).
    pub step_seconds: Vec<f64>,
    /// Steps the optimizer skipped (non-finite gradient).
    pub skipped: u64,
}

/// Where an optimizer is evaluated: the live weights, or WASAM's average.
pub trait EvalWeights: Optimizer + Sized {
    fn at_eval_weights<R>(
        sam: &mut SamCandle<Self>,
        f: impl FnOnce() -> Result<R, BoxErr>,
    ) -> Result<R, BoxErr> {
        let _ = sam;
        f()
    }
}

impl EvalWeights for BaseOptimizer {}
impl EvalWeights for Sam {}
impl EvalWeights for Gsam {}
impl EvalWeights for Wsam {}
impl EvalWeights for sam_core::Interval<Sam> {}
impl EvalWeights for LookSam {}

impl EvalWeights for Wasam {
    fn at_eval_weights<R>(
        sam: &mut SamCandle<Self>,
        f: impl FnOnce() -> Result<R, BoxErr>,
    ) -> Result<R, BoxErr> {
        let (opt, groups) = sam.parts_mut();
        if opt.counts().first().copied().unwrap_or(0) == 0 {
            return f();
        }
        let swapped = opt.swap(groups, 0)?;
        let out = f();
        swapped.swap_back()?;
        out
    }
}

/// Trains a fresh network on `train` with optimizer `kind`; `seed` fixes the initialisation
/// and the mini-batch order, the same for every optimizer (runs of one seed are paired).
pub fn train(
    kind: Kind,
    h: &Hyper,
    classes: usize,
    train: &Split,
    test: &Split,
    seed: u64,
    pb: &ProgressBar,
) -> Result<RunOutput, BoxErr> {
    let total = optimizers::total_steps(h, train.len);
    let run = Run {
        h,
        classes,
        train,
        test,
        seed,
        pb,
        lr_schedule: optimizers::lr_schedule(h, total)?,
    };
    match optimizers::build(kind, h, total)? {
        Built::Base(o) => run.fit(o),
        Built::Sam(o) => run.fit(o),
        Built::Gsam(o) => run.fit(o),
        Built::Wsam(o) => run.fit(o),
        Built::Wasam(o) => run.fit(o),
        Built::Interval(o) => run.fit(o),
        Built::LookSam(o) => run.fit(o),
    }
}

struct Run<'a> {
    h: &'a Hyper,
    classes: usize,
    train: &'a Split,
    test: &'a Split,
    seed: u64,
    pb: &'a ProgressBar,
    lr_schedule: Schedule,
}

impl Run<'_> {
    /// The training loop, the same for every optimizer of the family.
    fn fit<O: EvalWeights>(&self, opt: O) -> Result<RunOutput, BoxErr> {
        let (h, train) = (self.h, self.train);
        let model = Cnn::new(self.classes, &mut Rng::new("init", self.seed))?;
        let mut order_rng = Rng::new("batches", self.seed);
        let base = BaseRule::sgd(SgdConfig {
            lr: h.lr,
            momentum: h.momentum,
            weight_decay: h.weight_decay,
            ..Default::default()
        })?;
        let groups = vec![Group::new(VarBuffer::<f32>::new(model.params())?, base)];
        let mut sam = SamCandle::new(opt, groups);
        if sam.optimizer().lr_schedule().is_none() {
            sam.optimizer_mut()
                .set_lr_schedule(Some(self.lr_schedule))?;
        }

        let n = train.len;
        let batch = h.batch.clamp(1, n.max(1));
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut test_acc = Vec::with_capacity(h.epochs);
        let mut step_seconds = Vec::new();
        let mut skipped = 0;
        for _ in 0..h.epochs {
            order_rng.shuffle(&mut order);
            for idx in order.chunks(batch) {
                let (xb, yb) = train.batch(idx)?;
                let start = Instant::now();
                let report = sam.step(|| model.loss(&xb, &yb))?;
                step_seconds.push(start.elapsed().as_secs_f64());
                if report.status != StepStatus::Applied {
                    skipped += 1;
                }
            }
            let (acc, _) = O::at_eval_weights(&mut sam, || Ok(model.evaluate(self.test)?))?;
            test_acc.push(acc);
            self.pb.set_message(format!("test acc {:.2}%", 100.0 * acc));
            self.pb.inc(1);
        }
        let (_, final_train_loss) = O::at_eval_weights(&mut sam, || Ok(model.evaluate(train)?))?;
        Ok(RunOutput {
            test_acc,
            final_train_loss,
            step_seconds,
            skipped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data;

    /// A fixed synthetic split: two classes told apart by which half of the image is lit.
    fn toy(n: usize) -> Split {
        let mut rng = Rng::new("toy", 0);
        let mut x = Vec::with_capacity(n * 64);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % 2;
            for p in 0..64 {
                let lit = (p % 8 < 4) == (c == 0);
                x.push(if lit { 0.8 } else { 0.1 } + 0.1 * rng.uniform());
            }
            y.push(c);
        }
        let d = data::Dataset {
            x: ndarray::Array2::from_shape_vec((n, 64), x).expect("64 columns"),
            y,
            classes: 2,
            source: "toy".into(),
            known_range: None,
        };
        Split::new(&d).expect("split")
    }

    fn hyper(epochs: usize) -> Hyper {
        Hyper {
            epochs,
            batch: 16,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            rho: 0.05,
            asam_rho: 0.5,
            asam_eta: 0.01,
            gsam_rho_min: 0.02,
            gsam_alpha: 0.4,
            wsam_gamma: 0.9,
            sam_interval: 2,
            looksam_k: 5,
            looksam_alpha: 0.3,
            swa_start: 0.5,
        }
    }

    #[test]
    fn every_optimizer_lowers_the_loss_and_learns_a_toy_task() {
        let s = toy(64);
        let untrained = Cnn::new(2, &mut Rng::new("init", 0))
            .and_then(|m| m.evaluate(&s))
            .expect("evaluate");
        for kind in Kind::ALL {
            let out = train(kind, &hyper(8), 2, &s, &s, 0, &ProgressBar::hidden()).expect("train");
            assert_eq!(out.test_acc.len(), 8);
            assert_eq!(out.step_seconds.len(), 8 * 4);
            assert_eq!(out.skipped, 0);
            assert!(
                out.final_train_loss < 0.5 * untrained.1,
                "{kind:?}: loss {} -> {}",
                untrained.1,
                out.final_train_loss
            );
            assert!(
                out.test_acc.last().copied().unwrap_or(0.0) > 0.9,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn a_seed_gives_the_same_run() {
        let s = toy(32);
        let run =
            || train(Kind::Sam, &hyper(2), 2, &s, &s, 3, &ProgressBar::hidden()).expect("train");
        let (a, b) = (run(), run());
        assert_eq!(a.test_acc, b.test_acc);
        assert_eq!(a.final_train_loss.to_bits(), b.final_train_loss.to_bits());
    }

    #[test]
    fn the_network_has_the_documented_shape() {
        let m = Cnn::new(10, &mut Rng::new("init", 0)).expect("model");
        // conv1 8·9 + 8, conv2 16·8·9 + 16, fc 64·10 + 10.
        assert_eq!(m.num_params(), 80 + 1168 + 650);
        let x = Tensor::zeros(
            (3, 1, 8, 8),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .expect("x");
        assert_eq!(m.forward(&x).expect("forward").dims(), &[3, 10]);
    }

    use candle_core::Tensor;
}
