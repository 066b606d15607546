//! Every SAM-family variant under a name, for tests that run one check per variant.

use sam_core::{
    GroupOptions, Gsam, GsamConfig, LookSam, LookSamConfig, Perturbation, Proportional,
    RhoSchedule, Sam, SamConfig, Schedule, ScheduleConfig, ScheduleShape, Timeline, Wasam, Wsam,
    WsamConfig,
};

/// A change to group options.
pub type MapOptions = fn(GroupOptions) -> GroupOptions;

/// The variants' names, with the change each needs to the standard group options (GSAM takes
/// one global ρ schedule and adaptivity: no per-group overrides).
pub const NAMES: [(&str, MapOptions); 6] = [
    ("SAM", keep),
    ("ASAM", keep),
    ("GSAM", no_overrides),
    ("GSAM-warmup", no_overrides),
    ("WSAM", keep),
    ("WASAM", keep),
];

/// [`NAMES`] and LookSAM, whose steps alternate between one and two gradients on their own
/// (the checks of SAM every `k` steps, which assume a two-gradient inner step, use [`NAMES`]).
pub const ALL_NAMES: [(&str, MapOptions); 7] = [
    NAMES[0],
    NAMES[1],
    NAMES[2],
    NAMES[3],
    NAMES[4],
    NAMES[5],
    ("LookSAM", keep),
];

/// The options unchanged.
pub fn keep(o: GroupOptions) -> GroupOptions {
    o
}

/// The same base rule without per-group ρ/adaptivity overrides.
pub fn no_overrides(o: GroupOptions) -> GroupOptions {
    GroupOptions::new(*o.base())
}

/// SAM with the default configuration.
pub fn sam() -> Sam {
    Sam::new(SamConfig::default()).expect("SAM")
}

/// ASAM with ρ = 0.5, η = 0.01.
pub fn asam() -> Sam {
    Sam::new(Perturbation::asam(0.5, 0.01).into()).expect("ASAM")
}

/// GSAM with a constant ρ = 0.05 and α = 0.3.
pub fn gsam() -> Gsam {
    let rho = RhoSchedule::Schedule(Schedule::constant(0.05).expect("schedule"));
    Gsam::new(GsamConfig {
        alpha: 0.3,
        ..GsamConfig::new(rho)
    })
    .expect("GSAM")
}

/// GSAM in the upstream form: a linear lr warm-up over 8 steps then cosine decay (over 40), ρ
/// proportional to the lr (step `t` uses the schedule's value at `t`).
pub fn gsam_warmup() -> Gsam {
    let lr = Schedule::new(ScheduleConfig {
        shape: ScheduleShape::Cosine,
        t_max: 40,
        max_value: 0.05,
        min_value: 0.0,
        init_value: 0.0,
        warmup_steps: 8,
        clamp: true,
    })
    .expect("lr schedule");
    let rho = RhoSchedule::Proportional(Proportional {
        max_lr: 0.05,
        min_lr: 0.0,
        max_value: 0.1,
        min_value: 0.02,
    });
    Gsam::new(GsamConfig {
        alpha: 0.3,
        lr_schedule: Some(lr),
        timeline: Timeline::Synced,
        ..GsamConfig::new(rho)
    })
    .expect("GSAM with warm-up")
}

/// WSAM with the default configuration.
pub fn wsam() -> Wsam {
    Wsam::new(WsamConfig::default()).expect("WSAM")
}

/// WASAM (SAM defaults) with averages starting at steps 0 and 2.
pub fn wasam() -> Wasam {
    Wasam::new(SamConfig::default(), &[0, 2]).expect("WASAM")
}

/// LookSAM refreshing every 3 steps, α = 0.7, SAM's default climb.
pub fn looksam() -> LookSam {
    LookSam::new(LookSamConfig {
        k: 3,
        ..LookSamConfig::default()
    })
    .expect("LookSAM")
}

/// Runs `$body` with `$opt` bound to a fresh optimizer of the variant named `$name` (one of
/// [`ALL_NAMES`]).
#[macro_export]
macro_rules! with_variant {
    ($name:expr, |$opt:ident| $body:block) => {
        match $name {
            "SAM" => {
                let $opt = $crate::variants::sam();
                $body
            }
            "ASAM" => {
                let $opt = $crate::variants::asam();
                $body
            }
            "GSAM" => {
                let $opt = $crate::variants::gsam();
                $body
            }
            "GSAM-warmup" => {
                let $opt = $crate::variants::gsam_warmup();
                $body
            }
            "WSAM" => {
                let $opt = $crate::variants::wsam();
                $body
            }
            "WASAM" => {
                let $opt = $crate::variants::wasam();
                $body
            }
            "LookSAM" => {
                let $opt = $crate::variants::looksam();
                $body
            }
            other => panic!("unknown variant {other}"),
        }
    };
}
