//! `sam-fuzz-checks`: the checks behind the cargo-fuzz targets of the workspace (`fuzz/`), as a
//! normal crate, so that a plain `cargo test -p sam-fuzz-checks` on stable replays every corpus
//! file, every crash artifact and every kept regression input.
//!
//! Each check takes the fuzzer's bytes, decodes them with [`arbitrary::Unstructured`] (through
//! [`src::Src`]), drives `sam-core` (and `sam-ndarray`, `sam-verification`), and **panics on a
//! contract violation** (that is what the fuzzer records as a crash); it returns normally
//! otherwise.
//!
//! | target | check | what it asserts |
//! |---|---|---|
//! | `config` | [`check_config`] | construction from hostile hyperparameters never panics and succeeds exactly inside the documented domain; validated objects compute finite values |
//! | `step` | [`check_step`] | sequences of calls on the reference backend, every variant including LookSAM and SAM every k steps, with accumulated gradients and checkpoint round trips: exact outcome prediction, nothing changes on `Err`/skip, the gradient storage untouched, bit-exact restore, perturbation norm, finite outputs for the finiteness class, a resumed run equal to an uninterrupted one bit for bit |
//! | `ndarray_step` | [`check_ndarray_step`] | the same sequences on `sam-ndarray` in lockstep with the reference backend: same outcomes, bit-identical storage |
//! | `case_json` | [`check_case_json`] | arbitrary bytes and mutations of valid case files into `sam_verification::run_bytes`: a result or a clear error, never a panic |
//! | `interval` | [`check_interval`] | SAM every k steps of every variant against a composition of the base optimizer and the variant, with hostile gradients and checkpoint resumes: same outcomes, same bits |
//! | `looksam` | [`check_looksam`] | LookSAM with hostile gradients and checkpoint resumes: a resumed run equals the uninterrupted one bit for bit; α = 0 and `k = 1` equal a composition of SAM and the base optimizer; skips change nothing; the stored direction is orthogonal to the clean gradient |
//! | `loss_scale` | [`check_loss_scale`] | every variant under a loss scale driven by `LossScaler` against an unscaled twin: for a power of two `S` the same outcomes and bits, an overflow of `S·ĝ` skips with nothing persistent changed; `set_grad_scale` refuses exactly the invalid scales |
//! | `checkpoint` | [`check_checkpoint`] | mutated checkpoint files into `Checkpoint::load`: never a panic; a refusal changes nothing; an accepted load saves back to itself |
//!
//! # The finiteness class
//!
//! "Never produce NaN from finite input" cannot hold for every finite input (`w = 3e38` in
//! `f32` plus any step overflows). The checks demand finite outputs for this class, which is as
//! wide as the arithmetic allows in both `f32` and `f64` storage over a run of at most 16 calls:
//!
//! - every weight at the start of the call and every gradient the call consumes (clean and
//!   second) lies in `[-1e10, 1e10]` ([`step::BOUND_VALUE`]; zeros, subnormals included), and
//!   base-state and average slots lie in `[-1e25, 1e25]` ([`step::BOUND_SLOT`]);
//! - every earlier applied step of the run was in the class (the slots are then coherent);
//! - hyperparameters are accepted by construction and in these normal ranges: SGD `lr ∈ [0, 10]`,
//!   `momentum, dampening, weight_decay ∈ [0, 1]`; Adam/AdamW `lr ∈ [0, 10]`, any accepted
//!   `β1, β2`, `eps ∈ [1e-12, 1e10]`, `weight_decay ∈ [0, 1]`; GSAM `α ∈ [0, 10]`, lr-schedule
//!   values in `[-10, 10]` and the lr a step uses in `[-10, 10]` (a negative one is refused);
//!   WSAM `γ ∈ [0, 0.99]`; LookSAM `α ∈ [0, 10]`; every other accepted value (ρ, η, ε of every variant, `max_norm`,
//!   schedules of ρ, WASAM starts) without restriction;
//! - no call prepared a buffer for another slot layout than the one it held (a layout change is
//!   refused with `InvalidGroups`, except right after a checkpoint load, where the reference
//!   backend then reinterprets its slot memory, as documented).
//!
//! Outside the class the checks still demand everything else (no panic, exact restore, nothing
//! changed on `Err`/skip, the predicted outcome).
//!
//! # Findings
//!
//! Every contract violation the harness found is a [`Finding`]; its minimised input is kept in
//! `fuzz/regressions/<target>/<Finding>-min` and replayed as a hard check. A violation that
//! matches a finding still open in `sam-core` ([`KNOWN_OPEN`]) is not reported unless the
//! environment variable `SAM_FUZZ_STRICT=1` is set, so that fuzzing can go on past bugs already
//! reported; `SAM_FUZZ_ONLY=<Finding>` reports that one finding only (to minimise or replay its
//! input). A violation with the symptom of a fixed finding carries its name too (a regression).

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod case_json;
pub mod checkpoint;
pub mod config;
pub mod inspect;
pub mod interval;
pub mod looksam;
pub mod loss_scale;
pub mod palette;
pub mod src;
pub mod step;
pub mod variant;

use std::sync::OnceLock;

/// A contract violation found by the harness and reported. All are fixed in `sam-core` (see
/// `docs/bad-input.md`, "Findings fixed"); their regression inputs are hard checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Finding {
    /// Fixed. A validated `Schedule` (or GSAM's `lr_at`) yielded NaN or ±∞: polynomial shape past
    /// `t_max`, or `max − min` overflowing, or step counts beyond 2^53. Now values are within
    /// ±`MAX_VALUE` and step counts ≤ `MAX_STEP`, the polynomial base is clamped at 0 past
    /// `t_max`, and GSAM refuses a negative or non-finite lr with `InvalidHyperparameter`.
    ScheduleNotFinite,
    /// Fixed. `load_state` accepted a step count (or WASAM snapshot count) of `u64::MAX`, and
    /// the next step panicked on `steps + 1` (debug) or wrapped. Now the counters saturate.
    CounterOverflow,
    /// Fixed. `Wasam::load_state` accepted `pending_fold: true` with `steps: 0`, and the next
    /// call panicked on `steps − 1`. Now refused with `Error::InvalidState`.
    PendingFoldUnderflow,
    /// Fixed. WASAM's `swap` and `update_averages` (also run at the start of `first_step`) used
    /// the average slots without preparing the buffers: on buffers never prepared (a fresh
    /// process resuming from a checkpoint) every call failed with `Backend(MissingSlot)`. Now
    /// both run `Engine::begin` (which prepares) first.
    WasamUnprepared,
    /// Fixed. WASAM folded a pending average at the start of `first_step`/`swap` even when that
    /// call then returned `Err`. Now the fold happens after every check passed.
    WasamFoldOnError,
    /// Fixed. An adaptive group with finite weights and gradients was reported as
    /// `NonFiniteGradient` because `(|w| + η)·g` overflows `f64`. Now `NormOverflow`.
    AdaptiveOverflowMisreported,
    /// Fixed. A leaked WASAM swap guard (`mem::forget`) could not be recovered. Now `recover`
    /// swaps the recorded average back.
    SwapLeakUnrecoverable,
    /// Fixed. The reference backend reinterpreted its slot memory when the slot layout changed
    /// between steps (group options changed); `sam-ndarray` kept the slots, so the backends
    /// diverged. Now `Engine::begin` refuses a changed layout with `InvalidGroups` (a checkpoint
    /// load resets its record).
    SliceRespec,
    /// Fixed. `Engine::norms` unscaled the GSAM dot product as `dot / s_g / s_s`, which
    /// overflowed in between although ⟨g₁,g₂⟩ is finite, and the second step failed with
    /// `NormOverflow`. Now GSAM's cosine is evaluated at the reduction's scales (nothing
    /// unscaled).
    GsamDotOverflow,
    /// Fixed. With ε ≥ ~1.4e8 and gradients below 1e-140 (`f64`), `ε·s` overflowed at the
    /// rescaling scale and the perturbation coefficient was set to 0. Now `(ρ/s)/(n_s/s + ε)`.
    HugeEpsFlush,
    /// Fixed. GSAM turned finite input into NaN/∞ in the second step (`cos` = 0/0 for zero
    /// gradients with ε = 0, the mixing coefficient overflowing for extreme norm ratios, or a NaN
    /// lr from the schedule). Now `cos = 0` for a zero denominator, `a = 1` for `cos = 0`, and
    /// `NormOverflow` (weights restored) when `a` overflows.
    GsamNonFinite,
    /// Fixed. The first fix of [`GsamDotOverflow`](Finding::GsamDotOverflow) divided by the
    /// product of the two scales only when it was a *normal* number; when it was subnormal (max
    /// |g₂| ≥ 2^1023, so `s_g = 2^-1024`, and max |g₁| in [¼, ½), so `s_s = 2`) the two divisions
    /// in turn still overflowed in between, and the second step failed with `NormOverflow`. Now
    /// the cosine is evaluated at the reduction's scales.
    GsamDotSubnormalScale,
    /// Fixed. GSAM's cosine at the reduction's scales, `dot_s/(n₂ₛ·n₁ₛ + ε·s₂·s₁)`, computed
    /// `ε·s₂·s₁` as `(ε·s₂)·s₁`, which overflowed in between when `s₂` is large (a tiny `g₂`) and
    /// `s₁` small (a huge `g₁`) although `ε·s₂·s₁` is finite — the cosine was then taken as 0
    /// (`a = 1`) instead of `⟨g₁,g₂⟩/(‖g₂‖‖g₁‖ + ε)` — or underflowed the other way round. Now
    /// `ε` times the exact product of the scales.
    GsamScaledEps,
    /// Fixed. A radius tiny next to the gradient norm (ρ = 1e-300 with ‖g‖ = 8e38) made the
    /// perturbation coefficient `ρ/(‖T⊙g‖ + ε)` flush to 0, so no perturbation was applied
    /// although `e = ρ·g/‖g‖` is representable. Now the coefficient is formed at a further
    /// power-of-two scale of the norm whenever it would not be normal (`perturbation.rs`).
    TinyRhoFlush,
}

/// Findings still open in `sam-core` / `sam-verification`; see [`Finding`].
pub const KNOWN_OPEN: &[Finding] = &[];

/// A contract violation found by a check.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The known finding it is an instance of, if any.
    pub finding: Option<Finding>,
    /// What went wrong.
    pub message: String,
}

impl Violation {
    /// A violation with a message.
    pub fn new(finding: Option<Finding>, message: String) -> Self {
        Violation { finding, message }
    }

    /// A violation that is no known finding.
    pub fn plain(message: impl Into<String>) -> Self {
        Violation::new(None, message.into())
    }
}

/// What to do with violations of known findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Report every violation, known or not (`SAM_FUZZ_STRICT=1`).
    pub strict: bool,
    /// Report this known finding, tolerate the other known ones
    /// (`SAM_FUZZ_ONLY=<Finding>`, e.g. `SAM_FUZZ_ONLY=CounterOverflow`): to minimise or replay
    /// the regression input of one finding.
    pub only: Option<Finding>,
}

impl Policy {
    /// The default: tolerate the known findings.
    pub const TOLERANT: Policy = Policy {
        strict: false,
        only: None,
    };
    /// Report everything.
    pub const STRICT: Policy = Policy {
        strict: true,
        only: None,
    };

    /// The policy of the environment (`SAM_FUZZ_STRICT=1`, `SAM_FUZZ_ONLY=<Finding>`), read once.
    pub fn from_env() -> Self {
        static POLICY: OnceLock<Policy> = OnceLock::new();
        *POLICY.get_or_init(|| Policy {
            strict: std::env::var("SAM_FUZZ_STRICT").is_ok_and(|v| v == "1"),
            only: std::env::var("SAM_FUZZ_ONLY")
                .ok()
                .and_then(|n| Finding::from_name(&n)),
        })
    }

    /// Whether violations that are instances of this finding are tolerated.
    pub fn avoids(&self, f: Finding) -> bool {
        !self.strict && self.only != Some(f) && KNOWN_OPEN.contains(&f)
    }

    /// Panics with the violation, unless it is a tolerated known finding.
    pub fn report(&self, v: Violation) {
        if v.finding.is_some_and(|f| self.avoids(f)) {
            return;
        }
        match v.finding {
            Some(f) => panic!("contract violation ({f:?}): {}", v.message),
            None => panic!("contract violation: {}", v.message),
        }
    }
}

impl Finding {
    /// Every finding.
    pub const ALL: &[Finding] = &[
        Finding::ScheduleNotFinite,
        Finding::CounterOverflow,
        Finding::PendingFoldUnderflow,
        Finding::WasamUnprepared,
        Finding::WasamFoldOnError,
        Finding::AdaptiveOverflowMisreported,
        Finding::SwapLeakUnrecoverable,
        Finding::SliceRespec,
        Finding::GsamNonFinite,
        Finding::GsamDotOverflow,
        Finding::HugeEpsFlush,
        Finding::GsamDotSubnormalScale,
        Finding::GsamScaledEps,
        Finding::TinyRhoFlush,
    ];

    /// The finding of this name (its `Debug` form), if any.
    pub fn from_name(name: &str) -> Option<Finding> {
        Finding::ALL
            .iter()
            .copied()
            .find(|f| format!("{f:?}") == name)
    }
}

/// The check of a target with an explicit policy.
pub fn check_with(target: &str) -> Option<fn(&[u8], &Policy)> {
    Some(match target {
        "config" => config::check,
        "step" => step::check,
        "ndarray_step" => step::check_ndarray,
        "case_json" => case_json::check,
        "checkpoint" => checkpoint::check,
        "interval" => interval::check,
        "looksam" => looksam::check,
        "loss_scale" => loss_scale::check,
        _ => return None,
    })
}

/// The `config` target: see [`config`].
pub fn check_config(data: &[u8]) {
    config::check(data, &Policy::from_env());
}

/// The `step` target: see [`step`].
pub fn check_step(data: &[u8]) {
    step::check(data, &Policy::from_env());
}

/// The `ndarray_step` target: see [`step`].
pub fn check_ndarray_step(data: &[u8]) {
    step::check_ndarray(data, &Policy::from_env());
}

/// The `case_json` target: see [`case_json`].
pub fn check_case_json(data: &[u8]) {
    case_json::check(data, &Policy::from_env());
}

/// The `checkpoint` target: see [`checkpoint`].
pub fn check_checkpoint(data: &[u8]) {
    checkpoint::check(data, &Policy::from_env());
}

/// The `interval` target: see [`interval`].
pub fn check_interval(data: &[u8]) {
    interval::check(data, &Policy::from_env());
}

/// The `looksam` target: see [`looksam`].
pub fn check_looksam(data: &[u8]) {
    looksam::check(data, &Policy::from_env());
}

/// The `loss_scale` target: see [`loss_scale`].
pub fn check_loss_scale(data: &[u8]) {
    loss_scale::check(data, &Policy::from_env());
}

/// The check of a target by name (`config`, `step`, `ndarray_step`, `case_json`,
/// `checkpoint`, `interval`, `looksam`, `loss_scale`).
pub fn check_for(target: &str) -> Option<fn(&[u8])> {
    Some(match target {
        "config" => check_config,
        "step" => check_step,
        "ndarray_step" => check_ndarray_step,
        "case_json" => check_case_json,
        "checkpoint" => check_checkpoint,
        "interval" => check_interval,
        "looksam" => check_looksam,
        "loss_scale" => check_loss_scale,
        _ => return None,
    })
}

/// The names of the targets.
pub const TARGETS: &[&str] = &[
    "config",
    "step",
    "ndarray_step",
    "case_json",
    "checkpoint",
    "interval",
    "looksam",
    "loss_scale",
];
