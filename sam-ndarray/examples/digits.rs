//! The project's demo: every optimizer of `sam-core` on a small MLP, on the CPU through
//! `sam-ndarray`, on the UCI handwritten digits (bundled) or your own CSV file.
//!
//! ```text
//! cargo run --release -p sam-ndarray --example digits                     # ~1 min on 2 cores
//! cargo run --release -p sam-ndarray --example digits -- --label-noise 0.4
//! cargo run --release -p sam-ndarray --example digits -- --quick          # a few seconds (CI)
//! cargo run --release -p sam-ndarray --example digits -- --help
//! ```
//!
//! It trains a `64 → 64 → 10` ReLU perceptron (softmax cross-entropy, forward and backward
//! written with ndarray in `digits/mlp.rs`) with mini-batch SGD with momentum and with SAM,
//! ASAM, GSAM, WSAM and WASAM around it, over several seeds, then prints a table (test
//! accuracy, final training loss, two sharpness measures, time per epoch) and writes
//! `results.json`, `accuracy.svg` and `landscape.svg` (a 1-D slice of the loss along a
//! filter-normalised random direction, Li et al. 2018). See `docs/demo.md` for measured
//! results and how to read them.
//!
//! Data: E. Alpaydin and C. Kaynak, UCI Machine Learning Repository,
//! <https://archive.ics.uci.edu/dataset/80>, CC BY 4.0 (see `sam-ndarray/data/README.md`).

#[path = "digits/analysis.rs"]
mod analysis;
#[path = "digits/args.rs"]
mod args;
#[path = "digits/cli.rs"]
mod cli;
#[path = "digits/data.rs"]
mod data;
#[path = "digits/mlp.rs"]
mod mlp;
#[path = "digits/optimizers.rs"]
mod optimizers;
#[path = "digits/plot.rs"]
mod plot;
#[path = "digits/precision.rs"]
mod precision;
#[path = "digits/report.rs"]
mod report;
#[path = "digits/rng.rs"]
mod rng;
#[path = "digits/stats.rs"]
mod stats;
#[path = "digits/train.rs"]
mod train;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::analysis::SharpnessConfig;
use crate::args::{Command, Config};
use crate::data::Dataset;
use crate::mlp::Mlp;
use crate::report::{Arm, Run, Study};
use crate::rng::Rng;

fn main() -> ExitCode {
    match args::parse(std::env::args_os().skip(1)) {
        Ok(Command::Help) => {
            print!("{}", args::HELP);
            ExitCode::SUCCESS
        }
        Ok(Command::Run(cfg)) => match run(&cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}\n\nRun with --help to see the options.");
            ExitCode::from(2)
        }
    }
}

/// The data splits of a run.
struct Splits {
    train: Dataset,
    /// Where accuracy is reported: the test split, or the validation split with `--validate`.
    eval: Dataset,
    flipped: usize,
}

fn prepare_data(cfg: &Config) -> Result<Splits, String> {
    let mut all = match &cfg.data {
        None => data::load_bundled()?,
        Some(path) => data::load_file(path, cfg.skip_header)?,
    };
    if let Some(m) = cfg.subset
        && m < all.len()
    {
        let frac = 1.0 - m as f64 / all.len() as f64;
        let (keep, _) =
            data::stratified_split(&all.y, all.classes, frac, &mut Rng::new("subset", 0));
        all = all.subset(&keep);
        all.source = format!("{}, stratified subset of {}", all.source, all.len());
    }
    let (pool, test) = data::stratified_split(
        &all.y,
        all.classes,
        cfg.test_fraction,
        &mut Rng::new("test-split", 0),
    );
    let mut pool = all.subset(&pool);
    let test = all.subset(&test);
    if test.y.is_empty() || pool.len() < 2 {
        return Err(format!(
            "{}: {} samples are too few to hold out a test split of {:.0}% per class",
            all.source,
            all.len(),
            100.0 * cfg.test_fraction
        ));
    }
    let flipped = if cfg.label_noise > 0.0 {
        data::flip_labels(
            &mut pool.y,
            pool.classes,
            cfg.label_noise,
            &mut Rng::new("label-noise", 0),
        )
    } else {
        0
    };
    let (mut train, mut eval) = if cfg.validate {
        let (tr, va) = data::stratified_split(
            &pool.y,
            pool.classes,
            0.2,
            &mut Rng::new("validation-split", 0),
        );
        if va.is_empty() {
            return Err("too few training samples to hold out a validation split".into());
        }
        (pool.subset(&tr), pool.subset(&va))
    } else {
        (pool, test)
    };
    data::scale(&mut train, &mut [&mut eval]);
    Ok(Splits {
        train,
        eval,
        flipped,
    })
}

fn progress_bar(cfg: &Config, visible: bool, label: &str, seed: usize) -> ProgressBar {
    let target = if visible {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let pb = ProgressBar::with_draw_target(Some(cfg.hyper.epochs as u64), target);
    let style = ProgressStyle::with_template(
        "{prefix:<14} [{bar:32.cyan/blue}] {pos:>4}/{len} epochs  {elapsed:>4}  {msg}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_prefix(format!("{label} seed {seed}"));
    pb
}

fn run(cfg: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let splits = prepare_data(cfg)?;
    let (train, eval) = (&splits.train, &splits.eval);
    let mlp = Mlp {
        inputs: train.x.ncols(),
        hidden: cfg.hidden,
        classes: train.classes,
        activation: cfg.activation,
    };
    std::fs::create_dir_all(&cfg.out).map_err(|e| {
        format!(
            "cannot create the output directory {}: {e}",
            cfg.out.display()
        )
    })?;

    let eval_name = if cfg.validate { "validation" } else { "test" };
    println!("data: {}", train.source);
    println!(
        "split: {} training samples{}, {} {eval_name} samples, {} features, {} classes",
        train.len(),
        if splits.flipped > 0 {
            format!(
                " ({} labels flipped, {:.0}%)",
                splits.flipped,
                100.0 * cfg.label_noise
            )
        } else {
            String::new()
        },
        eval.len(),
        mlp.inputs,
        mlp.classes
    );
    let h = &cfg.hyper;
    let (inputs, hidden, classes) = (mlp.inputs, mlp.hidden, mlp.classes);
    println!(
        "model: {inputs}-{hidden}-{classes} {} MLP, {} parameters, stored in {}",
        mlp.activation.name(),
        mlp.num_params(),
        cfg.precisions
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "training: {} epochs, batch {}, SGD lr {} (cosine to 0), momentum {}, weight decay {}; {} seed{}{}",
        h.epochs,
        h.batch,
        h.lr,
        h.momentum,
        h.weight_decay,
        cfg.seeds,
        if cfg.seeds == 1 { "" } else { "s" },
        if cfg.quick { " (--quick)" } else { "" }
    );
    println!(
        "variants: SAM rho {rho}; ASAM rho {} eta {}; GSAM rho {rho}->{} (follows the lr) alpha {};\n          \
         WSAM rho {rho} gamma {}; WASAM rho {rho}, averaging from {:.0}% of the steps;\n          \
         SAM every k: SAM rho {rho} on every k-th step (k = {}), SGD on the others;\n          \
         LookSAM: SAM rho {rho} every k-th step (k = {}), alpha {} in between\n",
        h.asam_rho,
        h.asam_eta,
        h.gsam_rho_min,
        h.gsam_alpha,
        h.wsam_gamma,
        100.0 * h.swa_start,
        h.sam_interval,
        h.looksam_k,
        h.looksam_alpha,
        rho = h.rho,
    );

    let sharp_cfg = SharpnessConfig {
        lanczos_iters: cfg.lanczos_iters,
        ascent_steps: cfg.ascent_steps,
        rho: cfg.sharpness_rho,
        seed: 0,
    };
    let alphas: Vec<f64> = (0..cfg.landscape_points)
        .map(|i| -1.0 + 2.0 * i as f64 / (cfg.landscape_points.max(2) - 1) as f64)
        .collect();
    // Bars on a terminal; one line per run on stderr otherwise (CI logs); neither with --quiet.
    let tty = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let (bars, log_lines) = (!cfg.quiet && tty, !cfg.quiet && !tty);
    let mut runs = Vec::new();
    for arm in Arm::all(cfg) {
        let label = arm.label(cfg);
        for s in 0..cfg.seeds {
            let pb = progress_bar(cfg, bars, &label, s);
            let out = train::train(arm.kind, arm.precision, h, &mlp, train, eval, s as u64, &pb)?;
            let who = format!("{label} seed {s}");
            if !out.weights.iter().all(|w| w.is_finite()) {
                pb.abandon();
                return Err(format!(
                    "{who}: training diverged (the weights are no longer finite); \
                     lower --lr, --weight-decay or rho"
                )
                .into());
            }
            if out.skipped > 0 {
                pb.suspend(|| {
                    eprintln!(
                        "{}{who}: {} of {} steps skipped (NaN/inf gradient{}; the optimizer left \
                         the weights unchanged for those steps)",
                        if out.final_loss_scale.is_some() {
                            ""
                        } else {
                            "warning: "
                        },
                        out.skipped,
                        out.steps,
                        if out.final_loss_scale.is_some() {
                            ": overflows of the loss-scaled gradient, each backing the scale off"
                        } else {
                            ""
                        }
                    )
                });
            }
            let final_train = mlp.eval_flat(&out.weights, train.x.view(), &train.y)?;
            let final_eval = mlp.eval_flat(&out.weights, eval.x.view(), &eval.y)?;
            let sharp =
                analysis::sharpness(&mlp, &out.weights, train.x.view(), &train.y, &sharp_cfg)?;
            let landscape = if s == 0 {
                let dir = analysis::filter_normalised_direction(&mlp, &out.weights, 0);
                Some((
                    analysis::slice(&mlp, &out.weights, &dir, &alphas, train.x.view(), &train.y)?,
                    analysis::slice(&mlp, &out.weights, &dir, &alphas, eval.x.view(), &eval.y)?,
                ))
            } else {
                None
            };
            let msg = format!(
                "{eval_name} acc {:.2}%  lambda_max {:.2}  {:.2} ms/epoch",
                100.0 * final_eval.accuracy(),
                sharp.lambda_max,
                1e3 * stats::median(&out.epoch_seconds)
            );
            pb.finish_with_message(msg.clone());
            if log_lines {
                eprintln!("{who:<14} {msg}");
            }
            runs.push(Run {
                arm,
                seed: s,
                out,
                final_train,
                final_eval,
                sharpness: sharp,
                landscape,
            });
        }
    }

    let study = Study {
        cfg,
        mlp: &mlp,
        train,
        eval,
        eval_name,
        flipped: splits.flipped,
        runs,
        alphas,
    };
    println!();
    print!("{}", study.table());
    study.write_json(&cfg.out.join("results.json"))?;
    study.plot_accuracy(&cfg.out.join("accuracy.svg"))?;
    study.plot_landscape(&cfg.out.join("landscape.svg"))?;
    println!(
        "\nwrote {0}/results.json, {0}/accuracy.svg, {0}/landscape.svg in {1:.1} s",
        cfg.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
