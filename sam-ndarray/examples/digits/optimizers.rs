//! The optimizers the demos compare and their hyperparameters, built the same way for every
//! storage backend (shared by sam-ndarray's `digits` and sam-candle's `digits_cnn`).

use sam_core::{
    BaseOptimizer, Gsam, GsamConfig, Interval, LookSam, LookSamConfig, Perturbation, Proportional,
    RhoSchedule, Sam, SamConfig, Schedule, ScheduleConfig, ScheduleShape, Timeline, Wasam, Wsam,
    WsamConfig,
};

/// The optimizers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sgd,
    Sam,
    Asam,
    Gsam,
    Wsam,
    Wasam,
    /// SAM on every `sam_interval`-th step, SGD on the others.
    SamInterval,
    /// LookSAM: SAM every `looksam_k`-th step, its sharpness direction reused in between.
    LookSam,
}

impl Kind {
    /// All of them, in table order.
    pub const ALL: [Kind; 8] = [
        Kind::Sgd,
        Kind::Sam,
        Kind::Asam,
        Kind::Gsam,
        Kind::Wsam,
        Kind::Wasam,
        Kind::SamInterval,
        Kind::LookSam,
    ];

    /// Lower-case name (command line, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sgd => "sgd",
            Kind::Sam => "sam",
            Kind::Asam => "asam",
            Kind::Gsam => "gsam",
            Kind::Wsam => "wsam",
            Kind::Wasam => "wasam",
            Kind::SamInterval => "sam-every-k",
            Kind::LookSam => "looksam",
        }
    }

    /// Display name (table, plots).
    pub fn label(self) -> &'static str {
        match self {
            Kind::Sgd => "SGD",
            Kind::Sam => "SAM",
            Kind::Asam => "ASAM",
            Kind::Gsam => "GSAM",
            Kind::Wsam => "WSAM",
            Kind::Wasam => "WASAM",
            Kind::SamInterval => "SAM every k",
            Kind::LookSam => "LookSAM",
        }
    }

    /// From a command-line name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

/// Training hyperparameters (shared by every optimizer unless named after one).
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    /// Epochs.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch: usize,
    /// Peak learning rate (cosine decay to 0 over the run).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// ρ of SAM, WSAM, WASAM, LookSAM and GSAM's ρ_max.
    pub rho: f64,
    /// ρ of ASAM.
    pub asam_rho: f64,
    /// η of ASAM.
    pub asam_eta: f64,
    /// GSAM's ρ at lr = 0 (ρ follows the lr from `rho` down to this).
    pub gsam_rho_min: f64,
    /// GSAM's α.
    pub gsam_alpha: f64,
    /// WSAM's γ.
    pub wsam_gamma: f64,
    /// WASAM starts averaging after this fraction of the steps.
    pub swa_start: f64,
    /// "SAM every k": SAM on every k-th step.
    pub sam_interval: u64,
    /// LookSAM's refresh interval k: a SAM step on every k-th step.
    pub looksam_k: u64,
    /// LookSAM's α: the weight of the stored direction between refreshes.
    pub looksam_alpha: f64,
}

/// Steps in a run of `h.epochs` epochs over `n` training samples.
pub fn total_steps(h: &Hyper, n: usize) -> u64 {
    let per_epoch = n.div_ceil(h.batch.clamp(1, n.max(1)));
    (per_epoch * h.epochs).max(1) as u64
}

/// The lr schedule of every optimizer: cosine decay from `h.lr` to 0 over `total` steps.
pub fn lr_schedule(h: &Hyper, total: u64) -> Result<Schedule, sam_core::Error> {
    Schedule::new(ScheduleConfig {
        shape: ScheduleShape::Cosine,
        t_max: total,
        max_value: h.lr,
        min_value: 0.0,
        init_value: h.lr,
        warmup_steps: 0,
        clamp: true,
    })
}

/// One optimizer of the comparison, built.
pub enum Built {
    /// SGD.
    Base(BaseOptimizer),
    /// SAM or ASAM.
    Sam(Sam),
    /// GSAM (its ρ follows the lr schedule, which it holds).
    Gsam(Gsam),
    /// WSAM.
    Wsam(Wsam),
    /// WASAM (evaluated at its average).
    Wasam(Wasam),
    /// SAM every k steps.
    Interval(Interval<Sam>),
    /// LookSAM.
    LookSam(LookSam),
}

/// Optimizer `kind` with the hyperparameters `h`, for a run of `total` steps.
pub fn build(kind: Kind, h: &Hyper, total: u64) -> Result<Built, sam_core::Error> {
    let sam = |rho| SamConfig::from(Perturbation::sam(rho));
    Ok(match kind {
        Kind::Sgd => Built::Base(BaseOptimizer::new()),
        Kind::Sam => Built::Sam(Sam::new(sam(h.rho))?),
        Kind::Asam => Built::Sam(Sam::new(Perturbation::asam(h.asam_rho, h.asam_eta).into())?),
        Kind::Gsam => {
            let rho = RhoSchedule::Proportional(Proportional {
                max_lr: h.lr,
                min_lr: 0.0,
                max_value: h.rho,
                min_value: h.gsam_rho_min,
            });
            Built::Gsam(Gsam::new(GsamConfig {
                alpha: h.gsam_alpha,
                lr_schedule: Some(lr_schedule(h, total)?),
                timeline: Timeline::Synced,
                ..GsamConfig::new(rho)
            })?)
        }
        Kind::Wsam => Built::Wsam(Wsam::new(WsamConfig {
            perturbation: Perturbation::sam(h.rho),
            gamma: h.wsam_gamma,
            ..Default::default()
        })?),
        Kind::Wasam => {
            let start = ((total as f64) * h.swa_start).floor() as u64;
            Built::Wasam(Wasam::new(sam(h.rho), &[start.min(total - 1)])?)
        }
        Kind::SamInterval => Built::Interval(Interval::new(Sam::new(sam(h.rho))?, h.sam_interval)?),
        Kind::LookSam => Built::LookSam(LookSam::new(LookSamConfig {
            perturbation: Perturbation::sam(h.rho),
            k: h.looksam_k,
            alpha: h.looksam_alpha,
        })?),
    })
}
