//! SGD and the SAM family of `sam-core` on a small convolutional network written with
//! candle-nn, trained on the CPU through `sam-candle`'s `SamCandle`, on the UCI handwritten
//! digits bundled with `sam-ndarray`.
//!
//! ```text
//! cargo run --release -p sam-candle --example digits_cnn                      # 6 optimizers × 3 seeds
//! cargo run --release -p sam-candle --example digits_cnn -- --label-noise 0.4
//! cargo run --release -p sam-candle --example digits_cnn -- --quick           # a few seconds (CI)
//! cargo run --release -p sam-candle --example digits_cnn -- --help
//! ```
//!
//! The network is `conv(1→8, 3×3, pad 1) → relu → max-pool 2 → conv(8→16, 3×3, pad 1) → relu →
//! max-pool 2 → flatten → linear(64→10)` (`digits_cnn/model.rs`), 1,898 f32 parameters in one
//! param group (`VarBuffer`). Each step is `opt.step(|| loss)`: the driver runs candle's
//! `backward()` itself, twice for the SAM variants. It prints a table (test accuracy, paired
//! difference to SGD, time per step) and writes `results.json` and `accuracy.svg`. See
//! `docs/demo-candle.md` for measured results.
//!
//! The data loading, the random number generator and the plot are those of the ndarray demo
//! (`sam-ndarray/examples/digits/`), included as modules.
//!
//! Data: E. Alpaydin and C. Kaynak, UCI Machine Learning Repository,
//! <https://archive.ics.uci.edu/dataset/80>, CC BY 4.0 (see `sam-ndarray/data/README.md`).

#[path = "digits_cnn/args.rs"]
mod args;
#[path = "../../sam-ndarray/examples/digits/cli.rs"]
mod cli;
// Shared with the ndarray demo; this example uses the bundled loader, the splits and the
// scaling, not the CSV loader of `--data` nor the landscape plot.
#[allow(dead_code)]
#[path = "../../sam-ndarray/examples/digits/data.rs"]
mod data;
#[path = "digits_cnn/model.rs"]
mod model;
#[path = "../../sam-ndarray/examples/digits/optimizers.rs"]
mod optimizers;
#[allow(dead_code)]
#[path = "../../sam-ndarray/examples/digits/plot.rs"]
mod plot;
#[path = "digits_cnn/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../../sam-ndarray/examples/digits/rng.rs"]
mod rng;
#[path = "../../sam-ndarray/examples/digits/stats.rs"]
mod stats;
#[path = "digits_cnn/train.rs"]
mod train;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::{Command, Config};
use crate::model::{Cnn, Split};
use crate::report::{Run, Study};
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

/// The bundled digits: a fixed stratified 30 % test split, `--label-noise` on the training
/// labels, pixels scaled to [0, 1]. Returns (train, test, classes, flipped labels, source).
fn prepare_data(cfg: &Config) -> Result<(Split, Split, usize, usize, String), String> {
    let all = data::load_bundled()?;
    let (train_idx, test_idx) =
        data::stratified_split(&all.y, all.classes, 0.3, &mut Rng::new("test-split", 0));
    let mut train = all.subset(&train_idx);
    let mut test = all.subset(&test_idx);
    let flipped = if cfg.label_noise > 0.0 {
        data::flip_labels(
            &mut train.y,
            train.classes,
            cfg.label_noise,
            &mut Rng::new("label-noise", 0),
        )
    } else {
        0
    };
    data::scale(&mut train, &mut [&mut test]);
    let tensors = |d: &data::Dataset| Split::new(d).map_err(|e| format!("{}: {e}", d.source));
    Ok((
        tensors(&train)?,
        tensors(&test)?,
        all.classes,
        flipped,
        all.source,
    ))
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
    let (train_split, test_split, classes, flipped, source) = prepare_data(cfg)?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| {
        format!(
            "cannot create the output directory {}: {e}",
            cfg.out.display()
        )
    })?;
    let h = &cfg.hyper;
    let params = Cnn::new(classes, &mut Rng::new("init", 0))?.num_params();
    let setup = vec![
        format!("data: {source}"),
        format!(
            "split: {} training images{}, {} test images, 8x8, {classes} classes",
            train_split.len,
            if flipped > 0 {
                format!(
                    " ({flipped} labels flipped, {:.0}%)",
                    100.0 * cfg.label_noise
                )
            } else {
                String::new()
            },
            test_split.len,
        ),
        format!(
            "model: conv(1->8,3x3)-relu-pool-conv(8->16,3x3)-relu-pool-linear(64->{classes}), \
             {params} parameters (f32, candle-nn on the CPU)"
        ),
        format!(
            "training: {} epochs, batch {}, SGD lr {} (cosine to 0), momentum {}, weight decay {}; {} seed{}{}",
            h.epochs,
            h.batch,
            h.lr,
            h.momentum,
            h.weight_decay,
            cfg.seeds,
            if cfg.seeds == 1 { "" } else { "s" },
            if cfg.quick { " (--quick)" } else { "" }
        ),
        format!(
            "variants: SAM rho {rho}; ASAM rho {} eta {}; GSAM rho {rho}->{} (follows the lr) alpha {}; \
             WSAM rho {rho} gamma {}; WASAM rho {rho}, averaging from {:.0}% of the steps; \
             SAM every k: SAM rho {rho} on every k-th step (k = {}), SGD on the others; \
             LookSAM: SAM rho {rho} every k-th step (k = {}), alpha {} in between",
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
        ),
    ];
    for line in &setup {
        println!("{line}");
    }
    println!();

    // Bars on a terminal; one line per run on stderr otherwise (CI logs); neither with --quiet.
    let tty = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    let (bars, log_lines) = (!cfg.quiet && tty, !cfg.quiet && !tty);
    let mut runs = Vec::new();
    for &kind in &cfg.optimizers {
        for s in 0..cfg.seeds {
            let pb = progress_bar(cfg, bars, kind.label(), s);
            let out = train::train(kind, h, classes, &train_split, &test_split, s as u64, &pb)?;
            let who = format!("{} seed {s}", kind.label());
            if !out.final_train_loss.is_finite() {
                pb.abandon();
                return Err(format!(
                    "{who}: training diverged (the training loss is no longer finite); lower --lr or --rho"
                )
                .into());
            }
            if out.skipped > 0 {
                pb.suspend(|| {
                    eprintln!(
                        "warning: {who}: {} of {} steps skipped (NaN/inf gradient; the optimizer \
                         left the weights unchanged for those steps)",
                        out.skipped,
                        out.step_seconds.len()
                    )
                });
            }
            let msg = format!(
                "test acc {:.2}%  train loss {:.4}  {:.2} ms/step",
                100.0 * out.test_acc.last().copied().unwrap_or(f64::NAN),
                out.final_train_loss,
                1e3 * stats::median(&report::epoch_means(&out))
            );
            pb.finish_with_message(msg.clone());
            if log_lines {
                eprintln!("{who:<14} {msg}");
            }
            runs.push(Run { kind, seed: s, out });
        }
    }

    let study = Study { cfg, runs, setup };
    print!("{}", study.table());
    study.write_json(&cfg.out.join("results.json"))?;
    study.plot_accuracy(&cfg.out.join("accuracy.svg"))?;
    println!(
        "\nwrote {0}/results.json, {0}/accuracy.svg in {1:.1} s",
        cfg.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
