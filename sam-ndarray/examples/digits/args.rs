//! The command line (hand-rolled: a handful of flags does not need a parser crate).

use std::ffi::OsString;
use std::path::PathBuf;

use crate::cli;
use crate::mlp::Activation;
use crate::precision::Precision;
use crate::train::{Hyper, Kind};

/// Everything a run needs, with defaults resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--data`: a CSV file instead of the bundled digits.
    pub data: Option<PathBuf>,
    /// `--skip-header`.
    pub skip_header: bool,
    /// `--test-fraction`: per class, held out for testing.
    pub test_fraction: f64,
    /// `--label-noise`: fraction of training labels flipped.
    pub label_noise: f64,
    /// `--validate`: report on a validation split carved from the training split.
    pub validate: bool,
    /// `--hidden`: hidden units.
    pub hidden: usize,
    /// `--activation`.
    pub activation: Activation,
    /// `--optimizers`, in table order.
    pub optimizers: Vec<Kind>,
    /// `--precision`: storage types, in table order.
    pub precisions: Vec<Precision>,
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
    /// `--subset` (or `--quick`): use a stratified subset of this many samples.
    pub subset: Option<usize>,
    /// Lanczos iterations of λ_max.
    pub lanczos_iters: usize,
    /// Gradient-ascent steps of the ρ-ball sharpness.
    pub ascent_steps: usize,
    /// Points of the landscape slice.
    pub landscape_points: usize,
    /// Radius of the ρ-ball sharpness.
    pub sharpness_rho: f64,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Help,
    Run(Box<Config>),
}

pub const HELP: &str = "\
digits: SGD, SAM, ASAM, GSAM, WSAM and WASAM on a small MLP, on the CPU with sam-ndarray.

Trains a one-hidden-layer perceptron on the UCI handwritten digits (bundled, 1797 8x8 images)
with every optimizer over several seeds, then prints a table (test accuracy, final training
loss, sharpness, time per epoch), and writes results.json, accuracy.svg and landscape.svg.

USAGE:
    cargo run --release -p sam-ndarray --example digits -- [OPTIONS]

DATA:
    --data FILE           train on your own CSV file instead of the bundled digits: numeric
                          features, integer class label (0..K-1) last, comma-separated, one
                          sample per line; gzip-compressed or plain; blank lines and lines
                          starting with '#' are ignored. Features are min-max scaled to [0,1]
                          with the training split's statistics (the digits: divided by 16).
    --skip-header         the first (non-comment) line of --data FILE is a header
    --test-fraction F     fraction of each class held out as the test split [default: 0.3]
                          (the split's seed is fixed: every run sees the same split)
    --label-noise F       flip a fraction F of the training labels, each to a different class
                          chosen at random (fixed seed; test labels stay clean) [default: 0]
    --subset N            use a stratified random subset of N samples of the data (fixed seed)
    --validate            report accuracy on a validation split (20% of the training split,
                          stratified) instead of the test split: use this to tune anything
                          (with --label-noise its labels are noisy too, as they would be)

MODEL:
    --hidden N            hidden units [default: 64]
    --activation A        relu or tanh [default: relu]

TRAINING:
    --optimizers LIST     comma-separated subset of sgd,sam,asam,gsam,wsam,wasam,sam-every-k,looksam
                          [default: all]
    --precision LIST      comma-separated subset of f64,f32,bf16,f16,bf16-mixed,f16-mixed:
                          every optimizer runs in each. f64..f16: weights, gradients and
                          optimizer state stored in that type; bf16-mixed, f16-mixed: f32
                          master weights and optimizer state, a 16-bit model copy of the
                          weights and 16-bit gradients. Forward and backward compute in f64
                          from the weights the network uses; f16 gradients are loss-scaled
                          (torch's GradScaler defaults) [default: f64]
    --seeds N             runs per optimizer; seed s fixes the initialisation and the
                          mini-batch order, the same for every optimizer [default: 5]
    --epochs N            epochs [default: 100]
    --batch-size N        mini-batch size [default: 32]
    --lr F                peak learning rate of SGD with momentum (the base optimizer of every
                          variant), cosine-decayed to 0 over the run [default: 0.1]
    --momentum F          SGD momentum [default: 0.9]
    --weight-decay F      L2 weight decay [default: 5e-4]
    --rho F               rho of SAM, WSAM, WASAM and LookSAM, and GSAM's rho_max
                          [default: 0.05]
    --asam-rho F          rho of ASAM [default: 0.5]
    --asam-eta F          eta of ASAM (T = |w| + eta) [default: 0.01]
    --gsam-rho-min F      GSAM's rho when the lr reaches 0 (rho follows the lr) [default: 0.02]
    --gsam-alpha F        GSAM's alpha [default: 0.4]
    --wsam-gamma F        WSAM's gamma (weight of the sharpness term) [default: 0.9]
    --swa-start F         WASAM averages the weights after this fraction of the steps
                          [default: 0.75]
    --sam-interval K      SAM every k: a SAM step on every K-th step, SGD on the others
                          [default: 2]
    --looksam-k K         LookSAM: a SAM step on every K-th step, the stored sharpness
                          direction reused on the others [default: 5]
    --looksam-alpha F     LookSAM's alpha (weight of the stored direction) [default: 0.3]

OUTPUT:
    --out DIR             where results.json, accuracy.svg and landscape.svg go, created if
                          needed (relative to the current directory) [default: target/digits-demo]
    --quiet               only the table: no progress bars (on a terminal) and no per-run lines
                          (on stderr, printed instead of the bars when stdout is not a terminal)
    --quick               a reduced configuration for CI, a few seconds: 600 samples, 1 seed,
                          6 epochs, shorter analyses; explicit flags still override it
    -h, --help            print this help

SHARPNESS (on the training loss at the final weights; WASAM: the averaged weights):
    lambda_max            largest Hessian eigenvalue, by 30 Lanczos iterations on
                          finite-difference Hessian-vector products (central, h = 1e-5, with
                          the ReLU pattern frozen at w, as automatic differentiation gives)
    rho-ball              max over ||d||_2 <= 0.05 of L(w+d) - L(w), estimated by 10 steps of
                          projected normalised gradient ascent (a lower bound)

EXIT STATUS: 0 on success, 1 when the run fails (unreadable or malformed data, training that
diverges, output that cannot be written), 2 for a bad command line.
";

/// The options that take a value.
const VALUE_FLAGS: &[&str] = &[
    "--data",
    "--out",
    "--test-fraction",
    "--label-noise",
    "--hidden",
    "--activation",
    "--optimizers",
    "--precision",
    "--seeds",
    "--epochs",
    "--batch-size",
    "--lr",
    "--momentum",
    "--weight-decay",
    "--rho",
    "--asam-rho",
    "--asam-eta",
    "--gsam-rho-min",
    "--gsam-alpha",
    "--wsam-gamma",
    "--swa-start",
    "--sam-interval",
    "--looksam-k",
    "--looksam-alpha",
    "--subset",
];

/// Parses the arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    const INF: f64 = f64::MAX;
    let mut args = args.into_iter();
    let mut quick = false;
    let (mut seeds, mut epochs, mut subset) = (None, None, None);
    let mut c = Config {
        data: None,
        skip_header: false,
        test_fraction: 0.3,
        label_noise: 0.0,
        validate: false,
        hidden: 64,
        activation: Activation::Relu,
        optimizers: Kind::ALL.to_vec(),
        precisions: vec![Precision::F64],
        seeds: 5,
        hyper: Hyper {
            epochs: 100,
            batch: 32,
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
            swa_start: 0.75,
        },
        out: PathBuf::from("target/digits-demo"),
        quiet: false,
        quick: false,
        subset: None,
        lanczos_iters: 30,
        ascent_steps: 10,
        landscape_points: 41,
        sharpness_rho: 0.05,
    };
    while let Some(arg) = cli::next_arg(
        &mut args,
        &[
            "-h",
            "--help",
            "--quick",
            "--quiet",
            "--validate",
            "--skip-header",
        ],
        VALUE_FLAGS,
    ) {
        let arg = arg?;
        let (flag, value_os) = (arg.flag.clone(), arg.value_os.clone());
        let value = || arg.value();
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--quick" => quick = true,
            "--quiet" => c.quiet = true,
            "--validate" => c.validate = true,
            "--skip-header" => c.skip_header = true,
            "--data" => c.data = value_os.clone().map(PathBuf::from),
            "--out" => c.out = value_os.clone().map(PathBuf::from).unwrap_or(c.out),
            "--test-fraction" => c.test_fraction = cli::float(&flag, &value()?, 0.05, 0.9, false)?,
            "--label-noise" => c.label_noise = cli::float(&flag, &value()?, 0.0, 1.0, true)?,
            "--hidden" => c.hidden = cli::count(&flag, &value()?, 1, 4096)?,
            "--activation" => {
                c.activation = match value()?.to_ascii_lowercase().as_str() {
                    "relu" => Activation::Relu,
                    "tanh" => Activation::Tanh,
                    other => {
                        return Err(format!(
                            "--activation: expected relu or tanh, found {other:?}"
                        ));
                    }
                }
            }
            "--optimizers" => c.optimizers = cli::optimizers(&flag, &value()?)?,
            "--precision" => c.precisions = Precision::parse_list(&flag, &value()?)?,
            "--seeds" => seeds = Some(cli::count(&flag, &value()?, 1, 1000)?),
            "--epochs" => epochs = Some(cli::count(&flag, &value()?, 1, 100_000)?),
            "--batch-size" => c.hyper.batch = cli::count(&flag, &value()?, 1, 1 << 20)?,
            "--lr" => c.hyper.lr = cli::float(&flag, &value()?, 0.0, 100.0, false)?,
            "--momentum" => c.hyper.momentum = cli::float(&flag, &value()?, 0.0, 1.0, true)?,
            "--weight-decay" => {
                c.hyper.weight_decay = cli::float(&flag, &value()?, 0.0, INF, false)?
            }
            "--rho" => c.hyper.rho = cli::float(&flag, &value()?, 0.0, INF, false)?,
            "--asam-rho" => c.hyper.asam_rho = cli::float(&flag, &value()?, 0.0, INF, false)?,
            "--asam-eta" => c.hyper.asam_eta = cli::float(&flag, &value()?, 0.0, INF, false)?,
            "--gsam-rho-min" => {
                c.hyper.gsam_rho_min = cli::float(&flag, &value()?, 0.0, INF, false)?
            }
            "--gsam-alpha" => c.hyper.gsam_alpha = cli::float(&flag, &value()?, 0.0, INF, false)?,
            "--wsam-gamma" => c.hyper.wsam_gamma = cli::float(&flag, &value()?, 0.0, 1.0, true)?,
            "--swa-start" => c.hyper.swa_start = cli::float(&flag, &value()?, 0.0, 1.0, true)?,
            "--sam-interval" => {
                c.hyper.sam_interval = cli::count(&flag, &value()?, 1, 1 << 20)? as u64
            }
            "--looksam-k" => c.hyper.looksam_k = cli::count(&flag, &value()?, 1, 1 << 20)? as u64,
            "--looksam-alpha" => {
                c.hyper.looksam_alpha = cli::float(&flag, &value()?, 0.0, INF, false)?
            }
            "--subset" => subset = Some(cli::count(&flag, &value()?, 20, usize::MAX)?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if quick {
        c.quick = true;
        c.seeds = 1;
        c.hyper.epochs = 6;
        c.subset = Some(600);
        c.lanczos_iters = 10;
        c.ascent_steps = 4;
        c.landscape_points = 21;
    }
    c.seeds = seeds.unwrap_or(c.seeds);
    c.hyper.epochs = epochs.unwrap_or(c.hyper.epochs);
    c.subset = subset.or(c.subset);
    if c.data.is_some() && c.data.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        return Err("--data: the file name is empty".into());
    }
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
        assert_eq!((c.seeds, c.hyper.epochs, c.optimizers.len()), (5, 100, 8));
        let q = run(&["--quick"]).unwrap();
        assert_eq!((q.seeds, q.hyper.epochs, q.subset), (1, 6, Some(600)));
        let q = run(&[
            "--seeds=2",
            "--quick",
            "--label-noise",
            "0.4",
            "--optimizers",
            "wasam,SGD",
        ])
        .unwrap();
        assert_eq!((q.seeds, q.label_noise), (2, 0.4));
        assert_eq!(q.optimizers, vec![Kind::Sgd, Kind::Wasam]);
        assert_eq!(c.precisions, vec![Precision::F64]);
        let p = run(&["--precision", "f16,bf16-mixed,f32"]).unwrap();
        let want = [Precision::F32, Precision::F16, Precision::Bf16Mixed];
        assert_eq!(p.precisions, want);
        assert_eq!((c.hyper.looksam_k, c.hyper.looksam_alpha), (5, 0.3));
        let l = run(&[
            "--optimizers",
            "looksam,sam-every-k",
            "--sam-interval",
            "3",
            "--looksam-k=4",
            "--looksam-alpha",
            "0",
        ])
        .unwrap();
        assert_eq!(l.optimizers, vec![Kind::SamInterval, Kind::LookSam]);
        assert_eq!(
            (
                l.hyper.sam_interval,
                l.hyper.looksam_k,
                l.hyper.looksam_alpha
            ),
            (3, 4, 0.0)
        );
        assert!(matches!(
            parse(["-h"].map(OsString::from)),
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
            &["--lr", "nan"],
            &["--label-noise", "1"],
            &["--quick=1"],
            &["stray"],
            &["--optimizers", "sgd,adam"],
            &["--activation", "gelu"],
            &["--precision", "f8"],
            &["--precision"],
            &["--data="],
            &["--looksam-k", "0"],
            &["--looksam-alpha", "-0.1"],
            &["--looksam-alpha", "inf"],
        ] {
            assert!(run(bad).is_err(), "{bad:?}");
        }
    }
}
