//! The table, `results.json` and the accuracy figure.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::args::Config;
use crate::plot::{self, COLORS, Curve};
use crate::stats::{mean, median, std};
use crate::train::{Kind, RunOutput};

/// One finished run.
pub struct Run {
    pub kind: Kind,
    pub seed: usize,
    pub out: RunOutput,
}

/// Final test accuracy of a run, in percent.
fn final_acc(r: &Run) -> f64 {
    100.0 * r.out.test_acc.last().copied().unwrap_or(f64::NAN)
}

/// Per-optimizer summary.
pub struct Summary {
    pub kind: Kind,
    /// Final test accuracy (%) per seed.
    pub acc: Vec<f64>,
    /// Paired (same seed) difference to SGD, in points, if SGD ran.
    pub delta: Option<Vec<f64>>,
    pub train_loss: Vec<f64>,
    /// Median over every step of every seed.
    pub ms_per_step: f64,
    pub cost: Option<f64>,
}

/// Every run and its configuration.
pub struct Study<'a> {
    pub cfg: &'a Config,
    pub runs: Vec<Run>,
    /// Header lines (data, model, training), also written to `results.json`.
    pub setup: Vec<String>,
}

/// The mean step time of each epoch of a run, in seconds.
pub fn epoch_means(out: &crate::train::RunOutput) -> Vec<f64> {
    let per_epoch = (out.step_seconds.len() / out.test_acc.len().max(1)).max(1);
    out.step_seconds.chunks(per_epoch).map(mean).collect()
}

impl Study<'_> {
    fn of(&self, kind: Kind) -> impl Iterator<Item = &Run> {
        self.runs.iter().filter(move |r| r.kind == kind)
    }

    fn ms_per_step(&self, kind: Kind) -> f64 {
        let all: Vec<f64> = self.of(kind).flat_map(|r| epoch_means(&r.out)).collect();
        1e3 * median(&all)
    }

    /// Summaries in table order.
    pub fn summaries(&self) -> Vec<Summary> {
        let sgd: Vec<f64> = self.of(Kind::Sgd).map(final_acc).collect();
        let sgd_ms = (!sgd.is_empty()).then(|| self.ms_per_step(Kind::Sgd));
        self.cfg
            .optimizers
            .iter()
            .map(|&kind| {
                let acc: Vec<f64> = self.of(kind).map(final_acc).collect();
                let delta =
                    (!sgd.is_empty()).then(|| acc.iter().zip(&sgd).map(|(a, b)| a - b).collect());
                let ms = self.ms_per_step(kind);
                Summary {
                    kind,
                    delta,
                    train_loss: self.of(kind).map(|r| r.out.final_train_loss).collect(),
                    ms_per_step: ms,
                    cost: sgd_ms.map(|b| ms / b),
                    acc,
                }
            })
            .collect()
    }

    /// The results table (Markdown), with its legend.
    pub fn table(&self) -> String {
        let n = self.cfg.seeds;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| optimizer | test acc % (mean ± std) | Δ vs SGD, pts (paired, mean ± std) | final train loss | ms/step | cost × SGD |"
        );
        let _ = writeln!(t, "|---|---|---|---|---|---|");
        for s in self.summaries() {
            let delta = match &s.delta {
                Some(_) if s.kind == Kind::Sgd => "—".to_string(),
                Some(d) => format!("{:+.2} ± {:.2}", mean(d), std(d)),
                None => "n/a (no SGD run)".into(),
            };
            let _ = writeln!(
                t,
                "| {} | {:.2} ± {:.2} | {} | {:.4} | {:.2} | {} |",
                s.kind.label(),
                mean(&s.acc),
                std(&s.acc),
                delta,
                mean(&s.train_loss),
                s.ms_per_step,
                s.cost.map_or("n/a".into(), |c| format!("{c:.2}")),
            );
        }
        let wasam = if self.cfg.optimizers.contains(&Kind::Wasam) {
            " WASAM's numbers are those of its averaged weights."
        } else {
            ""
        };
        let _ = writeln!(
            t,
            "\n{n} seed{} per optimizer; seed s gives every optimizer the same initialisation and \
             mini-batch order, so Δ is the mean ± std of the per-seed differences. Test accuracy at \
             the last epoch. Final train loss: mean cross-entropy of a full pass over the training \
             split at the final weights{}. ms/step: the mean wall time of an epoch's training steps \
             (forward, backward(s) and the optimizer's passes; no evaluation), median over epochs and \
             seeds (a mean within the epoch, since SAM every k and LookSAM alternate steps of one and \
             two gradients); cost × SGD: its ratio to SGD's.{wasam}",
            if n == 1 { "" } else { "s" },
            if self.cfg.label_noise > 0.0 {
                ", on the noisy labels trained on"
            } else {
                ""
            },
        );
        t
    }

    /// Writes every run's numbers to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let h = &self.cfg.hyper;
        let runs: Vec<Value> = self
            .runs
            .iter()
            .map(|r| {
                json!({
                    "optimizer": r.kind.name(),
                    "seed": r.seed,
                    "test_accuracy_per_epoch": r.out.test_acc,
                    "final_train_loss": r.out.final_train_loss,
                    "ms_per_step": 1e3 * median(&epoch_means(&r.out)),
                    "steps": r.out.step_seconds.len(),
                    "skipped_steps": r.out.skipped,
                })
            })
            .collect();
        let summary: Vec<Value> = self
            .summaries()
            .iter()
            .map(|s| {
                json!({
                    "optimizer": s.kind.name(),
                    "test_accuracy_pct_mean": mean(&s.acc),
                    "test_accuracy_pct_std": std(&s.acc),
                    "delta_vs_sgd_pts_mean": s.delta.as_deref().map(mean),
                    "delta_vs_sgd_pts_std": s.delta.as_deref().map(std),
                    "final_train_loss_mean": mean(&s.train_loss),
                    "ms_per_step": s.ms_per_step,
                    "cost_vs_sgd": s.cost,
                })
            })
            .collect();
        let doc = json!({
            "setup": self.setup,
            "config": {
                "label_noise": self.cfg.label_noise,
                "seeds": self.cfg.seeds,
                "epochs": h.epochs,
                "batch": h.batch,
                "lr": h.lr,
                "lr_schedule": "cosine to 0 over the run",
                "momentum": h.momentum,
                "weight_decay": h.weight_decay,
                "rho": h.rho,
                "asam_rho": h.asam_rho,
                "asam_eta": h.asam_eta,
                "gsam_rho_min": h.gsam_rho_min,
                "gsam_alpha": h.gsam_alpha,
                "wsam_gamma": h.wsam_gamma,
                "swa_start": h.swa_start,
                "sam_interval": h.sam_interval,
                "looksam_k": h.looksam_k,
                "looksam_alpha": h.looksam_alpha,
                "quick": self.cfg.quick,
            },
            "runs": runs,
            "summary": summary,
        });
        let text = serde_json::to_string_pretty(&doc)
            .map_err(|e| format!("cannot serialise the results: {e}"))?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Test accuracy per epoch, mean over seeds, one curve per optimizer.
    pub fn plot_accuracy(&self, path: &Path) -> Result<(), String> {
        let series: Vec<(Kind, Vec<(f64, f64)>)> = self
            .cfg
            .optimizers
            .iter()
            .map(|&kind| {
                let runs: Vec<&Run> = self.of(kind).collect();
                let epochs = runs.iter().map(|r| r.out.test_acc.len()).min().unwrap_or(0);
                let pts = (0..epochs)
                    .map(|e| {
                        let v: Vec<f64> = runs.iter().map(|r| 100.0 * r.out.test_acc[e]).collect();
                        ((e + 1) as f64, mean(&v))
                    })
                    .collect();
                (kind, pts)
            })
            .collect();
        let curves: Vec<Curve<'_>> = series
            .iter()
            .map(|(kind, pts)| Curve {
                label: kind.label().to_string(),
                color: COLORS[Kind::ALL.iter().position(|k| k == kind).unwrap_or(0)],
                points: pts,
            })
            .collect();
        let noise = if self.cfg.label_noise > 0.0 {
            format!(", {:.0}% label noise", 100.0 * self.cfg.label_noise)
        } else {
            String::new()
        };
        let title = format!(
            "digits CNN (candle): test accuracy, mean of {} seed{}{noise}",
            self.cfg.seeds,
            if self.cfg.seeds == 1 { "" } else { "s" }
        );
        plot::accuracy(path, &title, "test accuracy (%)", &curves)
    }
}
