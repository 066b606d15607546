//! The command line (hand-rolled: a handful of flags does not need a parser crate).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::cli;
use crate::train::{Hyper, Kind};

/// Everything a run needs, with defaults resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--label-noise`: fraction of training labels flipped.
    pub label_noise: f64,
    /// `--optimizers`, in table order.
    pub optimizers: Vec<Kind>,
    /// `--seeds`: runs per optimizer.
    pub seeds: usize,
    /// Training hyperparameters.
    pub hyper: Hyper,
    /// `--out`: output directory.
    pub out: PathBuf,
    /// `--quiet`.
    pub quiet: bool,
    /// `--quick`.
    pub quick: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Help,
    Run(Box<Config>),
}

pub const HELP: &str = "\
digits_cnn: SGD, SAM, ASAM, GSAM, WSAM and WASAM on a small CNN written with candle-nn.

Trains conv(1->8, 3x3) -> relu -> max-pool 2 -> conv(8->16, 3x3) -> relu -> max-pool 2 ->
linear(64->10) on the UCI handwritten digits (bundled with sam-ndarray, 1797 8x8 images; 30%
of each class held out for testing), on the CPU, with every optimizer over several seeds,
driven by sam-candle's SamCandle. Prints a table and writes results.json and accuracy.svg.

USAGE:
    cargo run --release -p sam-candle --example digits_cnn -- [OPTIONS]

OPTIONS:
    --label-noise F       flip a fraction F of the training labels, each to a different class
                          chosen at random (fixed seed; test labels stay clean) [default: 0]
    --optimizers LIST     comma-separated subset of sgd,sam,asam,gsam,wsam,wasam,sam-every-k,looksam
                          [default: all]
    --seeds N             runs per optimizer; seed s fixes the initialisation and the
                          mini-batch order, the same for every optimizer [default: 3]
    --epochs N            epochs [default: 20]
    --batch-size N        mini-batch size [default: 64]
    --lr F                peak learning rate of SGD with momentum 0.9 (the base optimizer of
                          every variant), cosine-decayed to 0 over the run [default: 0.2]
    --rho F               rho of SAM, WSAM, WASAM, LookSAM and GSAM's rho_max [default: 0.05]
                          (ASAM: rho 0.5, eta 0.01; GSAM: rho follows the lr down to 0.02,
                          alpha 0.4; WSAM: gamma 0.9; WASAM: averages from 75% of the steps;
                          SAM every k: k 2; LookSAM: k 5, alpha 0.3)
    --out DIR             where results.json and accuracy.svg go, created if needed
                          [default: target/digits_cnn]
    --quiet               only the table: no progress bars and no per-run lines
    --quick               tiny configuration for CI, a few seconds: 1 seed, 2 epochs;
                          explicit --seeds/--epochs still override it
    -h, --help            print this help

EXIT STATUS: 0 on success, 1 when the run fails, 2 for a bad command line.
";

/// The options that take a value.
const VALUE_FLAGS: &[&str] = &[
    "--label-noise",
    "--optimizers",
    "--seeds",
    "--epochs",
    "--batch-size",
    "--lr",
    "--rho",
    "--out",
];

/// The defaults.
fn defaults() -> Config {
    Config {
        label_noise: 0.0,
        optimizers: Kind::ALL.to_vec(),
        seeds: 3,
        hyper: Hyper {
            epochs: 20,
            batch: 64,
            lr: 0.2,
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
            swa_start: 0.75,
        },
        out: PathBuf::from("target/digits_cnn"),
        quiet: false,
        quick: false,
    }
}

/// Parses the arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut args = args.into_iter();
    let (mut seeds, mut epochs) = (None, None);
    let mut c = defaults();
    while let Some(arg) = cli::next_arg(
        &mut args,
        &["-h", "--help", "--quick", "--quiet"],
        VALUE_FLAGS,
    ) {
        let arg = arg?;
        let (flag, value_os) = (arg.flag.clone(), arg.value_os.clone());
        let value = || arg.value();
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--quick" => c.quick = true,
            "--quiet" => c.quiet = true,
            "--out" => {
                let dir = value_os.clone().map(PathBuf::from).unwrap_or_default();
                if dir.as_os_str().is_empty() {
                    return Err("--out: the directory name is empty".into());
                }
                c.out = dir;
            }
            "--label-noise" => c.label_noise = cli::float(&flag, &value()?, 0.0, 1.0, true)?,
            "--optimizers" => c.optimizers = cli::optimizers(&flag, &value()?)?,
            "--seeds" => seeds = Some(cli::count(&flag, &value()?, 1, 1000)?),
            "--epochs" => epochs = Some(cli::count(&flag, &value()?, 1, 100_000)?),
            "--batch-size" => c.hyper.batch = cli::count(&flag, &value()?, 1, 1 << 20)?,
            "--lr" => c.hyper.lr = cli::float(&flag, &value()?, 0.0, 100.0, false)?,
            "--rho" => c.hyper.rho = cli::float(&flag, &value()?, 0.0, 100.0, false)?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if c.quick {
        c.seeds = 1;
        c.hyper.epochs = 2;
    }
    c.seeds = seeds.unwrap_or(c.seeds);
    c.hyper.epochs = epochs.unwrap_or(c.hyper.epochs);
    // GSAM's rho decays from --rho to gsam_rho_min; keep the schedule decreasing.
    c.hyper.gsam_rho_min = c.hyper.gsam_rho_min.min(c.hyper.rho);
    Ok(Command::Run(Box::new(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        match parse(args.iter().map(OsString::from))? {
            Command::Run(c) => Ok(*c),
            Command::Help => Err("help".into()),
        }
    }

    #[test]
    fn defaults_quick_and_overrides() {
        let c = run(&[]).unwrap();
        assert_eq!((c.seeds, c.hyper.epochs, c.optimizers.len()), (3, 20, 8));
        assert_eq!(c.out, PathBuf::from("target/digits_cnn"));
        let q = run(&["--quick"]).unwrap();
        assert_eq!((q.seeds, q.hyper.epochs, q.quick), (1, 2, true));
        let q = run(&[
            "--seeds=2",
            "--quick",
            "--label-noise",
            "0.4",
            "--optimizers",
            "asam,SGD,sgd",
            "--out",
            "/tmp/x",
            "--quiet",
        ])
        .unwrap();
        assert_eq!((q.seeds, q.hyper.epochs, q.label_noise), (2, 2, 0.4));
        assert_eq!(q.optimizers, vec![Kind::Sgd, Kind::Asam]);
        assert_eq!(q.out, PathBuf::from("/tmp/x"));
        assert!(q.quiet);
        let r = run(&["--rho", "0.01"]).unwrap();
        assert_eq!((r.hyper.rho, r.hyper.gsam_rho_min), (0.01, 0.01));
        assert!(matches!(
            parse(["--epochs", "3", "-h"].map(OsString::from)),
            Ok(Command::Help)
        ));
    }

    #[test]
    fn bad_arguments_are_errors() {
        for bad in [
            &["--nope"][..],
            &["--seeds"],
            &["--seeds", "0"],
            &["--seeds", "x"],
            &["--epochs", "-1"],
            &["--lr", "nan"],
            &["--label-noise", "1"],
            &["--label-noise", "-0.1"],
            &["--quick=1"],
            &["stray"],
            &["--optimizers", "sgd,adam"],
            &["--optimizers", ","],
            &["--out="],
        ] {
            assert!(run(bad).is_err(), "{bad:?}");
        }
    }
}
