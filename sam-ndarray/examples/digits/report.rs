//! The table, `results.json` and the figures.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::analysis::Sharpness;
use crate::args::Config;
use crate::data::Dataset;
use crate::mlp::{Eval, Mlp};
use crate::plot::{self, COLORS, Curve};
use crate::precision::Precision;
use crate::stats::{mean, median, std};
use crate::train::{Kind, RunOutput};

/// A row of the table: an optimizer in a storage precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arm {
    pub kind: Kind,
    pub precision: Precision,
}

impl Arm {
    /// The rows of a study, precision by precision, optimizers in table order.
    pub fn all(cfg: &Config) -> impl Iterator<Item = Arm> + '_ {
        cfg.precisions.iter().flat_map(|&precision| {
            cfg.optimizers
                .iter()
                .map(move |&kind| Arm { kind, precision })
        })
    }

    /// Whether a study names precisions in its labels (it does unless it only runs `f64`).
    fn shows_precision(cfg: &Config) -> bool {
        cfg.precisions != [Precision::F64]
    }

    /// Display name: the optimizer's, followed by the precision when the study shows it.
    pub fn label(self, cfg: &Config) -> String {
        if Self::shows_precision(cfg) {
            format!("{} {}", self.kind.label(), self.precision.name())
        } else {
            self.kind.label().to_string()
        }
    }

    /// Key in `results.json`: the optimizer's name, with `-precision` when the study shows it.
    fn key(self, cfg: &Config) -> String {
        if Self::shows_precision(cfg) {
            format!("{}-{}", self.kind.name(), self.precision.name())
        } else {
            self.kind.name().to_string()
        }
    }

    /// SGD in the same precision (the paired baseline of the row).
    fn baseline(self) -> Arm {
        Arm {
            kind: Kind::Sgd,
            ..self
        }
    }
}

/// One finished run.
pub struct Run {
    pub arm: Arm,
    pub seed: usize,
    pub out: RunOutput,
    pub final_train: Eval,
    pub final_eval: Eval,
    pub sharpness: Sharpness,
    /// Seed 0 only: loss along the filter-normalised direction (training, evaluation split).
    pub landscape: Option<(Vec<f64>, Vec<f64>)>,
}

/// Every run, and what they ran on.
pub struct Study<'a> {
    pub cfg: &'a Config,
    pub mlp: &'a Mlp,
    pub train: &'a Dataset,
    pub eval: &'a Dataset,
    pub eval_name: &'a str,
    pub flipped: usize,
    pub runs: Vec<Run>,
    pub alphas: Vec<f64>,
}

/// Three significant digits, scientific below 1e-3.
fn sig(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    if x != 0.0 && x.abs() < 1e-3 {
        return format!("{x:.2e}");
    }
    let digits = (2 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
    format!("{x:.digits$}")
}

/// Per-row summary.
pub struct Summary {
    pub arm: Arm,
    pub acc: Vec<f64>,
    /// Paired (same seed) difference to SGD in the same precision, in accuracy points, if SGD
    /// ran.
    pub delta: Option<Vec<f64>>,
    pub train_loss: Vec<f64>,
    pub train_acc: Vec<f64>,
    pub lambda: Vec<f64>,
    pub ball: Vec<f64>,
    pub sec_per_epoch: f64,
    pub cost: Option<f64>,
}

impl Study<'_> {
    fn of(&self, arm: Arm) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.arm == arm)
    }

    /// Summaries in table order.
    pub fn summaries(&self) -> Vec<Summary> {
        // Median epoch time over every epoch of every seed.
        let spe = |a: Arm| {
            let all: Vec<f64> = self
                .of(a)
                .flat_map(|r| r.out.epoch_seconds.iter().copied())
                .collect();
            median(&all)
        };
        Arm::all(self.cfg)
            .map(|kind| {
                let sgd_acc: Vec<f64> = self
                    .of(kind.baseline())
                    .map(|r| 100.0 * r.final_eval.accuracy())
                    .collect();
                let sgd_spe = (!sgd_acc.is_empty()).then(|| spe(kind.baseline()));
                let acc: Vec<f64> = self
                    .of(kind)
                    .map(|r| 100.0 * r.final_eval.accuracy())
                    .collect();
                let delta = (!sgd_acc.is_empty())
                    .then(|| acc.iter().zip(&sgd_acc).map(|(a, b)| a - b).collect());
                let s = spe(kind);
                Summary {
                    arm: kind,
                    delta,
                    train_loss: self.of(kind).map(|r| r.final_train.loss).collect(),
                    train_acc: self
                        .of(kind)
                        .map(|r| 100.0 * r.final_train.accuracy())
                        .collect(),
                    lambda: self.of(kind).map(|r| r.sharpness.lambda_max).collect(),
                    ball: self.of(kind).map(|r| r.sharpness.ball_increase).collect(),
                    sec_per_epoch: s,
                    cost: sgd_spe.map(|b| s / b),
                    acc,
                }
            })
            .collect()
    }

    /// The results table (Markdown), with its legend.
    pub fn table(&self) -> String {
        let n = self.cfg.seeds;
        let mut t = String::new();
        let rho = self.cfg.sharpness_rho;
        let _ = writeln!(
            t,
            "| optimizer | {} acc % (mean ± std) | Δ vs SGD, pts (paired ± s.e.) | final train loss | train acc % | λ_max (± std) | ρ-ball Δloss (ρ={rho}) | ms/epoch | cost ×SGD |",
            self.eval_name
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|");
        for s in self.summaries() {
            let delta = match &s.delta {
                Some(_) if s.arm.kind == Kind::Sgd => "—".to_string(),
                Some(d) if d.len() > 1 => {
                    format!("{:+.2} ± {:.2}", mean(d), std(d) / (d.len() as f64).sqrt())
                }
                Some(d) => format!("{:+.2}", mean(d)),
                None => "n/a (no SGD run)".into(),
            };
            let _ = writeln!(
                t,
                "| {} | {:.2} ± {:.2} | {} | {} | {:.2} | {} ± {} | {} | {:.2} | {} |",
                s.arm.label(self.cfg),
                mean(&s.acc),
                std(&s.acc),
                delta,
                sig(mean(&s.train_loss)),
                mean(&s.train_acc),
                sig(mean(&s.lambda)),
                sig(std(&s.lambda)),
                sig(mean(&s.ball)),
                1e3 * s.sec_per_epoch,
                s.cost.map_or("n/a".into(), |c| format!("{c:.2}")),
            );
        }
        let wasam = if self.cfg.optimizers.contains(&Kind::Wasam) {
            " WASAM's numbers are those of its averaged weights."
        } else {
            ""
        };
        let precision = if Arm::shows_precision(self.cfg) {
            " Each row names its storage precision (f64 … f16: weights, gradients and optimizer state in that type; -mixed: f32 \
             master weights and optimizer state, 16-bit model copy and gradients; forward and backward in f64 from the weights the \
             network uses, the model copy where there is one; f16 gradients loss-scaled); Δ and cost are against SGD in the same \
             precision."
        } else {
            ""
        };
        let _ = writeln!(
            t,
            "\n{n} seed{} per optimizer ({}). {} accuracy at the last epoch. Train loss and accuracy: full pass over the \
             training split at the final weights, on the labels trained on{}. λ_max: largest Hessian eigenvalue of the training loss \
             ({} Lanczos iterations on finite-difference Hessian-vector products). ρ-ball Δloss: max of L(w+δ) − L(w) over ‖δ‖₂ ≤ {rho} \
             (projected gradient ascent, {} steps). ms/epoch: median over epochs and seeds of the wall time of an epoch's training steps (no \
             evaluation), one thread; cost ×SGD: its ratio to SGD's.{wasam}{precision}",
            if n == 1 { "" } else { "s" },
            if n == 1 {
                "one seed: no spread; rerun with --seeds N to see the noise".to_string()
            } else {
                format!(
                    "seed s: same initialisation and mini-batch order for every optimizer, so Δ is paired by seed; \
                     s.e. = std of the differences / √{n}"
                )
            },
            capitalise(self.eval_name),
            if self.flipped > 0 { " (noisy)" } else { "" },
            self.cfg.lanczos_iters,
            self.cfg.ascent_steps,
        );
        t
    }

    /// Writes every number to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let h = &self.cfg.hyper;
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|r| {
                json!({
                    "optimizer": r.arm.kind.name(),
                    "precision": r.arm.precision.name(),
                    "seed": r.seed,
                    "eval_accuracy": r.final_eval.accuracy(),
                    "eval_loss": r.final_eval.loss,
                    "train_loss": r.final_train.loss,
                    "train_accuracy": r.final_train.accuracy(),
                    "lambda_max": r.sharpness.lambda_max,
                    "lambda_min": r.sharpness.lambda_min,
                    "lanczos_iterations": r.sharpness.iterations,
                    "rho_ball_loss_increase": r.sharpness.ball_increase,
                    "train_seconds": r.out.train_seconds(),
                    "seconds_per_epoch_median": median(&r.out.epoch_seconds),
                    "steps": r.out.steps,
                    "skipped_steps": r.out.skipped,
                    "final_loss_scale": r.out.final_loss_scale,
                    "per_epoch": {
                        "eval_accuracy": r.out.epochs.iter().map(|e| e.eval.accuracy()).collect::<Vec<_>>(),
                        "eval_loss": r.out.epochs.iter().map(|e| e.eval.loss).collect::<Vec<_>>(),
                        "train_batch_loss": r.out.epochs.iter().map(|e| e.train_loss).collect::<Vec<_>>(),
                        "seconds": r.out.epoch_seconds,
                    },
                })
            })
            .collect();
        let summary: Vec<Value> = self
            .summaries()
            .iter()
            .map(|s| {
                json!({
                    "optimizer": s.arm.kind.name(),
                    "precision": s.arm.precision.name(),
                    "eval_accuracy_pct_mean": mean(&s.acc),
                    "eval_accuracy_pct_std": std(&s.acc),
                    "delta_vs_sgd_pts_mean": s.delta.as_ref().map(|d| mean(d)),
                    "delta_vs_sgd_pts_se": s.delta.as_ref().map(|d| std(d) / (d.len() as f64).sqrt()),
                    "train_loss_mean": mean(&s.train_loss),
                    "train_accuracy_pct_mean": mean(&s.train_acc),
                    "lambda_max_mean": mean(&s.lambda),
                    "lambda_max_std": std(&s.lambda),
                    "rho_ball_loss_increase_mean": mean(&s.ball),
                    "seconds_per_epoch_median": s.sec_per_epoch,
                    "cost_vs_sgd": s.cost,
                })
            })
            .collect();
        let landscape: serde_json::Map<String, Value> = self
            .runs
            .iter()
            .filter_map(|r| {
                r.landscape.as_ref().map(|(tr, ev)| {
                    (
                        r.arm.key(self.cfg),
                        json!({"train_loss": tr, "eval_loss": ev}),
                    )
                })
            })
            .collect();
        let doc = json!({
            "demo": "cargo run --release -p sam-ndarray --example digits",
            "data": {
                "source": self.train.source,
                "train_samples": self.train.len(),
                "eval_samples": self.eval.len(),
                "eval_split": self.eval_name,
                "features": self.mlp.inputs,
                "classes": self.mlp.classes,
                "label_noise": self.cfg.label_noise,
                "labels_flipped": self.flipped,
                "test_fraction": self.cfg.test_fraction,
                "subset": self.cfg.subset,
            },
            "model": {
                "layers": [self.mlp.inputs, self.mlp.hidden, self.mlp.classes],
                "activation": self.mlp.activation.name(),
                "parameters": self.mlp.num_params(),
                "storage": self.cfg.precisions.iter().map(|p| p.name()).collect::<Vec<_>>(),
                "compute": "f64 forward and backward from the weights the network uses (the 16-bit model copy in the -mixed layouts, which keep f32 master weights and optimizer state); gradients rounded to their storage type; f16 gradients loss-scaled (GradScaler defaults)",
            },
            "training": {
                "seeds": self.cfg.seeds,
                "quick": self.cfg.quick,
                "epochs": h.epochs,
                "batch_size": h.batch,
                "lr": h.lr,
                "lr_schedule": "cosine to 0 over all steps",
                "momentum": h.momentum,
                "weight_decay": h.weight_decay,
                "sam_rho": h.rho,
                "asam_rho": h.asam_rho,
                "asam_eta": h.asam_eta,
                "gsam_rho_max": h.rho,
                "gsam_rho_min": h.gsam_rho_min,
                "gsam_alpha": h.gsam_alpha,
                "wsam_rho": h.rho,
                "wsam_gamma": h.wsam_gamma,
                "wasam_rho": h.rho,
                "wasam_swa_start_fraction": h.swa_start,
                "sam_every_k_interval": h.sam_interval,
                "looksam_rho": h.rho,
                "looksam_k": h.looksam_k,
                "looksam_alpha": h.looksam_alpha,
            },
            "sharpness": {
                "lambda_max": format!(
                    "largest (algebraic) eigenvalue of the Hessian of the mean training cross-entropy (no weight decay) at \
                     the final weights: {} Lanczos iterations with full reorthogonalisation on Hessian-vector products \
                     (grad L(w+h v) - grad L(w-h v))/(2h), h = {}, ||v|| = 1 (lambda_min: the smallest, same run)",
                    self.cfg.lanczos_iters, crate::analysis::HVP_STEP
                ),
                "rho_ball_loss_increase": format!(
                    "max over ||d||_2 <= {} of L(w+d) - L(w) on the training loss, by {} steps of projected normalised \
                     gradient ascent (first step = SAM's, then rho/4 steps); a lower bound of the true maximum",
                    self.cfg.sharpness_rho, self.cfg.ascent_steps
                ),
            },
            "runs": runs,
            "summary": summary,
            "landscape": {
                "description": "loss along w + alpha*d for the seed-0 solution of each optimizer, d a filter-normalised \
                                Gaussian direction (Li et al. 2018; the same Gaussian draw for every optimizer, rescaled \
                                per row of each weight matrix to that row's norm, zero on biases)",
                "alphas": self.alphas,
                "curves": landscape,
            },
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| format!("cannot encode results.json: {e}"))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The optimizer's colour, lightened towards white for each later precision of the study.
    fn color(&self, arm: Arm) -> plotters::style::RGBColor {
        let i = Kind::ALL.iter().position(|&k| k == arm.kind).unwrap_or(0);
        let p = self
            .cfg
            .precisions
            .iter()
            .position(|&p| p == arm.precision)
            .unwrap_or(0);
        let c = COLORS[i % COLORS.len()];
        let t = 0.55 * p as f64 / self.cfg.precisions.len().max(1) as f64;
        let mix = |v: u8| (f64::from(v) + t * (255.0 - f64::from(v))).round() as u8;
        plotters::style::RGBColor(mix(c.0), mix(c.1), mix(c.2))
    }

    fn setting(&self) -> String {
        let noise = if self.cfg.label_noise > 0.0 {
            format!(", {:.0}% label noise", 100.0 * self.cfg.label_noise)
        } else {
            String::new()
        };
        let name = if self.cfg.data.is_some() {
            "your data"
        } else {
            "digits"
        };
        format!(
            "{name}, {}-{}-{} MLP{noise}",
            self.mlp.inputs, self.mlp.hidden, self.mlp.classes
        )
    }

    /// `accuracy.svg`: mean evaluation accuracy per epoch.
    pub fn plot_accuracy(&self, path: &Path) -> Result<(), String> {
        let epochs = self.cfg.hyper.epochs;
        let series: Vec<(Arm, Vec<(f64, f64)>)> = Arm::all(self.cfg)
            .map(|k| {
                let pts = (0..epochs)
                    .map(|e| {
                        let v: Vec<f64> = self
                            .of(k)
                            .filter_map(|r| r.out.epochs.get(e))
                            .map(|l| 100.0 * l.eval.accuracy())
                            .collect();
                        ((e + 1) as f64, mean(&v))
                    })
                    .collect();
                (k, pts)
            })
            .collect();
        let curves = self.curves(&series);
        let seeds = if self.cfg.seeds == 1 {
            "1 seed".to_string()
        } else {
            format!("mean of {} seeds", self.cfg.seeds)
        };
        let title = format!(
            "{} accuracy per epoch ({}; {seeds})",
            capitalise(self.eval_name),
            self.setting()
        );
        plot::accuracy(
            path,
            &title,
            &format!("{} accuracy (%)", self.eval_name),
            &curves,
        )
    }

    /// `landscape.svg`: the seed-0 loss slices.
    pub fn plot_landscape(&self, path: &Path) -> Result<(), String> {
        let pick = |which: usize| -> Vec<(Arm, Vec<(f64, f64)>)> {
            self.runs
                .iter()
                .filter_map(|r| {
                    let (tr, ev) = r.landscape.as_ref()?;
                    let ys = if which == 0 { tr } else { ev };
                    Some((
                        r.arm,
                        self.alphas
                            .iter()
                            .copied()
                            .zip(ys.iter().copied())
                            .collect(),
                    ))
                })
                .collect()
        };
        let (tr, ev) = (pick(0), pick(1));
        let (ct, ce) = (self.curves(&tr), self.curves(&ev));
        let title = format!(
            "Loss along a filter-normalised random direction, seed-0 solutions ({})",
            self.setting()
        );
        let train_name = if self.flipped > 0 {
            "training loss (noisy labels)"
        } else {
            "training loss"
        };
        let eval_name = format!("{} loss", self.eval_name);
        plot::landscape(path, &title, [(train_name, &ct), (&eval_name, &ce)])
    }

    fn curves<'s>(&self, series: &'s [(Arm, Vec<(f64, f64)>)]) -> Vec<Curve<'s>> {
        series
            .iter()
            .map(|(a, pts)| Curve {
                label: a.label(self.cfg),
                color: self.color(*a),
                points: pts,
            })
            .collect()
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
