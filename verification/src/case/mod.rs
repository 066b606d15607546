//! The conformance-case model and its strict parser (`sam-conformance/1`, see `SCHEMA.md`).
//!
//! [`parse_case`] turns the bytes of one case file into a fully resolved [`Case`]: defaults of
//! SCHEMA §5 are filled in, per-group options are resolved as in §4, and every structural rule
//! (shapes, lengths, labels, group membership, known keys) is checked. Optimizer hyperparameter
//! *domains* (negative `rho`, `gamma >= 1`, …) are deliberately not checked: they are passed
//! through so that the optimizer library reports its own error.
//!
//! Parsing has two layers: `raw` holds serde types that mirror the file's JSON (unknown
//! fields, duplicate keys, wrong types and a `null` where none is allowed are refused there,
//! with the path of the offending field from `serde_path_to_error`); `resolve` turns them
//! into a [`Case`], checking the caps and every rule that spans fields.
//!
//! The parser never panics and can be fed arbitrary bytes: the input is capped at
//! [`MAX_INPUT_BYTES`] before it is read, which bounds every allocation, and the caps below
//! bound the work of a replay.

use std::fmt;

use sam_core::{AdamConfig, SgdConfig};
use serde::Deserialize;

mod raw;
mod resolve;
#[cfg(test)]
mod tests;

/// Largest accepted input, in bytes (16 MiB).
pub const MAX_INPUT_BYTES: usize = 16 << 20;
/// Largest total number of parameter elements (length of θ).
pub const MAX_ELEMENTS: usize = 1_000_000;
/// Largest number of optimizer steps.
pub const MAX_STEPS: usize = 100_000;
/// Largest number of samples of a softmax or mlp objective.
pub const MAX_SAMPLES: usize = 100_000;
/// Largest objective data size: `n·d` for softmax/mlp, `n·n` for quadratic.
pub const MAX_DATA: usize = 10_000_000;
/// Largest `steps · n_elements` (the size of `expected.params`).
pub const MAX_TRAJECTORY: usize = 50_000_000;
/// Largest `samples · n_elements` of a softmax or mlp objective (the work of one evaluation).
pub const MAX_EVAL_COST: usize = 100_000_000;

/// Largest `steps · samples · elements` (`steps · n²` for quadratic): the work of a replay,
/// a few seconds in a release build.
pub const MAX_REPLAY_COST: usize = 2_000_000_000;

/// The schema identifier this parser accepts.
pub const SCHEMA: &str = "sam-conformance/1";

/// Precision of parameters, data, optimizer state and tensor arithmetic (`"f32"`, `"f64"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// Single precision.
    F32,
    /// Double precision.
    F64,
}

/// Comparison rule of SCHEMA §9: `|got − exp| ≤ atol + rtol·|exp|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
}

/// One named parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Name, unique within the case.
    pub name: String,
    /// Shape; the number of elements is the product (1 for `[]`).
    pub shape: Vec<usize>,
    /// Initial values, flattened row-major; `init.len()` is the product of `shape`.
    pub init: Vec<f64>,
}

/// The full-batch objective (SCHEMA §3).
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// `L(θ) = ½·θᵀAθ − bᵀθ` with symmetric `A`.
    Quadratic {
        /// `A`, `n·n` values, row-major.
        a: Vec<f64>,
        /// `b`, `n` values.
        b: Vec<f64>,
        /// Dimension; equals the number of parameter elements.
        n: usize,
    },
    /// Multinomial logistic regression with params `W [classes, d]` and `b [classes]`.
    Softmax {
        /// Inputs, `n·d` values, row-major.
        x: Vec<f64>,
        /// Labels, `n` values, each `< classes`.
        y: Vec<usize>,
        /// Number of samples (at least 1).
        n: usize,
        /// Input dimension.
        d: usize,
        /// Number of classes.
        classes: usize,
    },
    /// One-hidden-layer tanh network with params `W1 [hidden, d]`, `b1 [hidden]`,
    /// `W2 [classes, hidden]`, `b2 [classes]`.
    Mlp {
        /// Inputs, `n·d` values, row-major.
        x: Vec<f64>,
        /// Labels, `n` values, each `< classes`.
        y: Vec<usize>,
        /// Number of samples (at least 1).
        n: usize,
        /// Input dimension.
        d: usize,
        /// Number of classes.
        classes: usize,
        /// Hidden width.
        hidden: usize,
    },
}

/// Resolved hyperparameters of the base optimizer of one group (SCHEMA §5, §6), in sam-core's
/// own config types (the case's keys are torch's, which these configs mirror; `betas` is
/// `beta1`, `beta2`). Domains are not checked here: [`sam_core::BaseRule`] does that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseHyper {
    /// `torch.optim.SGD`.
    Sgd(SgdConfig),
    /// `torch.optim.Adam` (L2 weight decay).
    Adam(AdamConfig),
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW(AdamConfig),
}

impl BaseHyper {
    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            Self::Sgd(c) => c.lr,
            Self::Adam(c) | Self::AdamW(c) => c.lr,
        }
    }
}

/// One param group after option resolution (SCHEMA §4).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSpec {
    /// Indices into [`Case::params`], in the group's listed order.
    pub params: Vec<usize>,
    /// Resolved base-optimizer hyperparameters.
    pub base: BaseHyper,
    /// Resolved perturbation radius (`sam`, `wasam`, `wsam`); `0.0` for `gsam`, whose rho is global.
    pub rho: f64,
    /// Resolved adaptive (ASAM) flag; for `gsam` the optimizer-level flag.
    pub adaptive: bool,
}

/// A GSAM schedule (SCHEMA §5, §7.4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScheduleSpec {
    /// Linear warmup then linear decay.
    Linear {
        /// `T`, the step at which the decay reaches `min_value`.
        t_max: f64,
        /// Value at the end of warmup.
        max_value: f64,
        /// Value at `t_max`.
        min_value: f64,
        /// Value at step 0.
        init_value: f64,
        /// `W`, the number of warmup steps.
        warmup_steps: f64,
    },
    /// Linear warmup then cosine decay.
    Cosine {
        /// `T`, the step at which the decay reaches `min_value`.
        t_max: f64,
        /// Value at the end of warmup.
        max_value: f64,
        /// Value at `t_max`.
        min_value: f64,
        /// Value at step 0.
        init_value: f64,
        /// `W`, the number of warmup steps.
        warmup_steps: f64,
    },
    /// Rho proportional to the lr schedule (rho schedule only).
    Proportion {
        /// lr mapped to `max_value`.
        max_lr: f64,
        /// lr mapped to `min_value`.
        min_lr: f64,
        /// Largest rho.
        max_value: f64,
        /// Smallest rho.
        min_value: f64,
    },
}

/// The SAM variant and its variant-level settings (SCHEMA §5, §7).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VariantSpec {
    /// davda54 SAM / ASAM.
    Sam,
    /// WASAM: SAM plus a running average of the iterates from step `swa_start` on.
    Wasam {
        /// First step (0-based) whose result enters the average.
        swa_start: u64,
    },
    /// Weighted SAM (atorch).
    Wsam {
        /// Sharpness weight γ.
        gamma: f64,
        /// Decoupled update.
        decouple: bool,
        /// Gradient clipping norm, if any.
        max_norm: Option<f64>,
        /// Epsilon of the perturbation norm.
        sam_eps: f64,
    },
    /// Surrogate-gap SAM (GSAM).
    Gsam {
        /// Surrogate-gap weight α.
        alpha: f64,
        /// Adaptive perturbation.
        adaptive: bool,
        /// Epsilon of the norms.
        perturb_eps: f64,
        /// Schedule of the global rho.
        rho_schedule: ScheduleSpec,
        /// Schedule of the lr of all groups, if any.
        lr_schedule: Option<ScheduleSpec>,
    },
}

/// The expected trajectory (SCHEMA §8).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// `L(θ_t)` for each step `t`.
    pub loss: Vec<f64>,
    /// `θ_{t+1}` for each step `t`, each of length [`Case::n_elements`].
    pub params: Vec<Vec<f64>>,
    /// The SWA average after the last step (`wasam` only).
    pub swa_params: Option<Vec<f64>>,
    /// lr of group 0 used in each step (`gsam` only).
    pub lr: Option<Vec<f64>>,
    /// rho used in each step (`gsam` only).
    pub rho: Option<Vec<f64>>,
}

/// One parsed and validated conformance case.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Case name.
    pub name: String,
    /// Free-text description.
    pub description: String,
    /// Upstream implementation that produced `expected`.
    pub reference: String,
    /// Precision of the run.
    pub dtype: Dtype,
    /// Comparison tolerance.
    pub tolerance: Tolerance,
    /// The objective.
    pub objective: Objective,
    /// The parameters, in θ order.
    pub params: Vec<Param>,
    /// The param groups; every param is in exactly one.
    pub groups: Vec<GroupSpec>,
    /// Variant and variant-level settings.
    pub variant: VariantSpec,
    /// Number of optimizer steps.
    pub steps: usize,
    /// The expected trajectory.
    pub expected: Expected,
}

impl Case {
    /// Total number of parameter elements (length of θ).
    pub fn n_elements(&self) -> usize {
        self.params
            .iter()
            .fold(0, |n, p| n.saturating_add(p.init.len()))
    }

    /// Offset of each param in θ, in `params` order.
    pub fn offsets(&self) -> Vec<usize> {
        let mut at = 0usize;
        self.params
            .iter()
            .map(|p| {
                let o = at;
                at = at.saturating_add(p.init.len());
                o
            })
            .collect()
    }

    /// θ₀: the concatenation of all `init` arrays.
    pub fn theta0(&self) -> Vec<f64> {
        self.params
            .iter()
            .flat_map(|p| p.init.iter().copied())
            .collect()
    }
}

/// Why a case was rejected: the offending field's path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseError {
    path: String,
    message: String,
}

impl CaseError {
    fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// Path of the offending field, e.g. `param_groups[1].options`; empty for whole-input errors.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong, without the path.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for CaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for CaseError {}

type Result<T> = std::result::Result<T, CaseError>;

/// Parses and validates one case file.
///
/// Never panics; every rejection names the offending field. See the module docs and the
/// `MAX_*` constants for the caps.
pub fn parse_case(bytes: &[u8]) -> Result<Case> {
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(CaseError::new(
            "",
            format!(
                "input is {} bytes, above the cap of {MAX_INPUT_BYTES}",
                bytes.len()
            ),
        ));
    }
    // A file of another schema version is named as such, whatever else it holds.
    if let Ok(raw::Head {
        schema: Some(schema),
    }) = serde_json::from_slice(bytes)
        && schema != SCHEMA
    {
        return Err(CaseError::new(
            "schema",
            format!("unsupported schema '{schema}', expected '{SCHEMA}'"),
        ));
    }
    let mut json = serde_json::Deserializer::from_slice(bytes);
    let raw: raw::RawCase = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        json_error(if path == "." { "" } else { &path }, &e.into_inner())
    })?;
    json.end().map_err(|e| json_error("", &e))?;
    resolve::case(raw)
}

/// A serde_json error as a [`CaseError`]: a data error (wrong type, unknown or duplicate
/// field) at `path`, its position dropped as the path names the field; anything else (syntax,
/// end of input) as invalid JSON, with its position.
fn json_error(path: &str, e: &serde_json::Error) -> CaseError {
    let text = e.to_string();
    match e.classify() {
        serde_json::error::Category::Data => {
            let position = format!(" at line {} column {}", e.line(), e.column());
            CaseError::new(path, text.strip_suffix(&position).unwrap_or(&text))
        }
        _ => CaseError::new("", format!("invalid JSON: {text}")),
    }
}
