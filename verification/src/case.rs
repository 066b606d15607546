//! The conformance-case model and its strict parser (`sam-conformance/1`, see `SCHEMA.md`).
//!
//! [`parse_case`] turns the bytes of one case file into a fully resolved [`Case`]: defaults of
//! SCHEMA §5 are filled in, per-group options are resolved as in §4, and every structural rule
//! (shapes, lengths, labels, group membership, known keys) is checked. Optimizer hyperparameter
//! *domains* (negative `rho`, `gamma >= 1`, …) are deliberately not checked: they are passed
//! through so that the optimizer library reports its own error.
//!
//! The parser never panics and bounds its allocations by the caps below, so it can be fed
//! arbitrary bytes.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

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

/// Precision of parameters, data, optimizer state and tensor arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Resolved hyperparameters of the base optimizer of one group (SCHEMA §5, §6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseHyper {
    /// `torch.optim.SGD`.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum factor (0 disables momentum).
        momentum: f64,
        /// Dampening of the momentum update.
        dampening: f64,
        /// L2 weight decay added to the gradient.
        weight_decay: f64,
        /// Nesterov momentum.
        nesterov: bool,
    },
    /// `torch.optim.Adam` (L2 weight decay).
    Adam {
        /// Learning rate.
        lr: f64,
        /// First-moment decay (`betas[0]`).
        beta1: f64,
        /// Second-moment decay (`betas[1]`).
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// L2 weight decay added to the gradient.
        weight_decay: f64,
        /// AMSGrad variant.
        amsgrad: bool,
    },
    /// `torch.optim.AdamW` (decoupled weight decay).
    AdamW {
        /// Learning rate.
        lr: f64,
        /// First-moment decay (`betas[0]`).
        beta1: f64,
        /// Second-moment decay (`betas[1]`).
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
        /// AMSGrad variant.
        amsgrad: bool,
    },
}

impl BaseHyper {
    /// The learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            Self::Sgd { lr, .. } | Self::Adam { lr, .. } | Self::AdamW { lr, .. } => lr,
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

// ---------------------------------------------------------------------------------------------
// A minimal JSON tree that rejects duplicate keys and keeps integers exact.

#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Uint(u64),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(de: D) -> std::result::Result<Self, D::Error> {
        de.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> std::result::Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Json, E> {
        Ok(Json::Uint(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Json, E> {
        Ok(if v >= 0 {
            Json::Uint(v.unsigned_abs())
        } else {
            Json::Int(v)
        })
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Json, E> {
        Ok(Json::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Json, E> {
        Ok(Json::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Json, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Json::Arr(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Json, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key '{key}'")));
            }
            let value = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Json::Obj(out))
    }
}

impl Json {
    fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Uint(_) | Json::Int(_) | Json::Float(_) => "a number",
            Json::Str(_) => "a string",
            Json::Arr(_) => "an array",
            Json::Obj(_) => "an object",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed accessors. Each takes the value and its path, for error messages.

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn idx(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn wrong_type(v: &Json, path: &str, want: &str) -> CaseError {
    CaseError::new(path, format!("expected {want}, found {}", v.type_name()))
}

fn num(v: &Json, path: &str) -> Result<f64> {
    let x = match *v {
        Json::Uint(u) => u as f64,
        Json::Int(i) => i as f64,
        Json::Float(f) => f,
        _ => return Err(wrong_type(v, path, "a number")),
    };
    if x.is_finite() {
        Ok(x)
    } else {
        Err(CaseError::new(path, "must be finite"))
    }
}

fn uint(v: &Json, path: &str) -> Result<u64> {
    // 2^64 as f64; every integral f64 in [0, 2^64) converts exactly.
    const TWO_64: f64 = 18_446_744_073_709_551_616.0;
    match *v {
        Json::Uint(u) => Ok(u),
        Json::Float(f) if f.fract() == 0.0 && (0.0..TWO_64).contains(&f) => Ok(f as u64),
        Json::Int(i) => Err(CaseError::new(
            path,
            format!("must be a non-negative integer, got {i}"),
        )),
        Json::Float(f) => Err(CaseError::new(
            path,
            format!("must be a non-negative integer, got {f:?}"),
        )),
        _ => Err(wrong_type(v, path, "a non-negative integer")),
    }
}

fn usize_(v: &Json, path: &str) -> Result<usize> {
    let u = uint(v, path)?;
    usize::try_from(u).map_err(|_| CaseError::new(path, format!("{u} is too large")))
}

fn boolean(v: &Json, path: &str) -> Result<bool> {
    match *v {
        Json::Bool(b) => Ok(b),
        _ => Err(wrong_type(v, path, "a boolean")),
    }
}

fn string<'a>(v: &'a Json, path: &str) -> Result<&'a str> {
    match v {
        Json::Str(s) => Ok(s),
        _ => Err(wrong_type(v, path, "a string")),
    }
}

fn array<'a>(v: &'a Json, path: &str) -> Result<&'a [Json]> {
    match v {
        Json::Arr(a) => Ok(a),
        _ => Err(wrong_type(v, path, "an array")),
    }
}

/// An array of exactly `len` numbers (when given).
fn numbers(v: &Json, path: &str, len: Option<usize>) -> Result<Vec<f64>> {
    let a = array(v, path)?;
    if let Some(len) = len.filter(|&l| l != a.len()) {
        return Err(CaseError::new(
            path,
            format!("has {} values, expected {len}", a.len()),
        ));
    }
    // The element path is only formatted on failure.
    a.iter()
        .enumerate()
        .map(|(i, x)| num(x, "").map_err(|e| CaseError::new(&idx(path, i), e.message)))
        .collect()
}

/// An array of `rows` arrays of `cols` numbers each. All row lengths are checked before
/// anything is allocated; the caller has bounded `rows · cols`.
fn matrix(v: &Json, path: &str, rows: usize, cols: usize) -> Result<Vec<Vec<f64>>> {
    let a = array(v, path)?;
    if a.len() != rows {
        return Err(CaseError::new(
            path,
            format!("has {} rows, expected {rows}", a.len()),
        ));
    }
    for (i, row) in a.iter().enumerate() {
        let p = idx(path, i);
        let len = array(row, &p)?.len();
        if len != cols {
            return Err(CaseError::new(
                &p,
                format!("row has {len} values, expected {cols}"),
            ));
        }
    }
    a.iter()
        .enumerate()
        .map(|(i, row)| numbers(row, &idx(path, i), None))
        .collect()
}

/// A JSON object together with its path.
struct Obj<'a> {
    path: String,
    map: &'a BTreeMap<String, Json>,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Json, path: &str) -> Result<Self> {
        match v {
            Json::Obj(map) => Ok(Self {
                path: path.to_owned(),
                map,
            }),
            _ => Err(wrong_type(v, path, "an object")),
        }
    }

    /// Rejects any key not in `allowed`; `what` completes "unknown key 'k' …".
    fn only(&self, allowed: &[&str], what: &str) -> Result<()> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(CaseError::new(
                &self.path,
                format!("unknown key '{k}'{what}"),
            )),
            None => Ok(()),
        }
    }

    fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn get(&self, key: &str) -> Option<&'a Json> {
        self.map.get(key)
    }

    fn req(&self, key: &str) -> Result<&'a Json> {
        self.get(key)
            .ok_or_else(|| CaseError::new(&self.at(key), "missing required field"))
    }

    fn obj(&self, key: &str) -> Result<Obj<'a>> {
        Obj::new(self.req(key)?, &self.at(key))
    }

    fn num(&self, key: &str) -> Result<f64> {
        num(self.req(key)?, &self.at(key))
    }

    fn num_or(&self, key: &str, default: f64) -> Result<f64> {
        self.get(key).map_or(Ok(default), |v| num(v, &self.at(key)))
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        self.get(key)
            .map_or(Ok(default), |v| boolean(v, &self.at(key)))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        usize_(self.req(key)?, &self.at(key))
    }

    fn str(&self, key: &str) -> Result<&'a str> {
        string(self.req(key)?, &self.at(key))
    }

    fn arr(&self, key: &str) -> Result<&'a [Json]> {
        array(self.req(key)?, &self.at(key))
    }
}

fn cap(path: &str, what: &str, value: Option<usize>, max: usize) -> Result<usize> {
    match value {
        Some(v) if v <= max => Ok(v),
        Some(v) => Err(CaseError::new(
            path,
            format!("{what} is {v}, above the cap of {max}"),
        )),
        None => Err(CaseError::new(
            path,
            format!("{what} overflows, above the cap of {max}"),
        )),
    }
}

fn fmt_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(","))
}

// ---------------------------------------------------------------------------------------------
// The parser.

/// Parses and validates one case file.
///
/// Never panics; every rejection names the offending field. See the module docs and the
/// `MAX_*` constants for the caps.
pub fn parse_case(bytes: &[u8]) -> std::result::Result<Case, CaseError> {
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(CaseError::new(
            "",
            format!(
                "input is {} bytes, above the cap of {MAX_INPUT_BYTES}",
                bytes.len()
            ),
        ));
    }
    let json: Json = serde_json::from_slice(bytes)
        .map_err(|e| CaseError::new("", format!("invalid JSON: {e}")))?;
    let root = Obj::new(&json, "")?;
    root.only(
        &[
            "schema",
            "name",
            "description",
            "reference",
            "dtype",
            "tolerance",
            "objective",
            "params",
            "param_groups",
            "optimizer",
            "steps",
            "expected",
        ],
        " at top level",
    )?;
    let schema = root.str("schema")?;
    if schema != SCHEMA {
        return Err(CaseError::new(
            "schema",
            format!("unsupported schema '{schema}', expected '{SCHEMA}'"),
        ));
    }
    let name = root.str("name")?.to_owned();
    let description = root.str("description")?.to_owned();
    let reference = root.str("reference")?.to_owned();
    let dtype = match root.str("dtype")? {
        "f64" => Dtype::F64,
        "f32" => Dtype::F32,
        other => {
            return Err(CaseError::new(
                "dtype",
                format!("unknown dtype '{other}', expected 'f32' or 'f64'"),
            ));
        }
    };
    let tolerance = parse_tolerance(&root.obj("tolerance")?)?;
    let steps = root.usize("steps")?;
    cap("steps", "value", Some(steps), MAX_STEPS)?;

    let params = parse_params(root.arr("params")?, dtype)?;
    let n_elements = params.iter().map(|p| p.init.len()).sum::<usize>();
    cap(
        "expected.params",
        "steps × elements",
        steps.checked_mul(n_elements),
        MAX_TRAJECTORY,
    )?;
    let objective = parse_objective(&root.obj("objective")?, &params, dtype)?;
    // The replay evaluates the objective twice per step: bound the total work.
    let eval_cost = match &objective {
        Objective::Quadratic { n, .. } => n.checked_mul(*n),
        Objective::Softmax { n, .. } | Objective::Mlp { n, .. } => n.checked_mul(n_elements),
    };
    cap(
        "steps",
        "steps × samples × elements (replay work)",
        eval_cost.and_then(|c| c.checked_mul(steps)),
        MAX_REPLAY_COST,
    )?;

    let optimizer = root.obj("optimizer")?;
    let (variant, base, opt_rho, opt_adaptive) = parse_optimizer(&optimizer)?;
    let groups = parse_groups(
        root.arr("param_groups")?,
        &params,
        &variant,
        base,
        opt_rho,
        opt_adaptive,
    )?;
    let expected = parse_expected(&root.obj("expected")?, &variant, steps, n_elements)?;

    Ok(Case {
        name,
        description,
        reference,
        dtype,
        tolerance,
        objective,
        params,
        groups,
        variant,
        steps,
        expected,
    })
}

fn parse_tolerance(t: &Obj<'_>) -> Result<Tolerance> {
    t.only(&["rtol", "atol"], "")?;
    let rtol = t.num("rtol")?;
    let atol = t.num("atol")?;
    for (key, v) in [("rtol", rtol), ("atol", atol)] {
        if v < 0.0 {
            return Err(CaseError::new(
                &t.at(key),
                format!("must be >= 0, got {v:?}"),
            ));
        }
    }
    Ok(Tolerance { rtol, atol })
}

fn parse_params(list: &[Json], dtype: Dtype) -> Result<Vec<Param>> {
    if list.is_empty() {
        return Err(CaseError::new("params", "must list at least one param"));
    }
    let mut total = 0usize;
    let mut out: Vec<Param> = Vec::new();
    for (i, v) in list.iter().enumerate() {
        let path = idx("params", i);
        let p = Obj::new(v, &path)?;
        p.only(&["name", "shape", "init"], "")?;
        let name = p.str("name")?.to_owned();
        if out.iter().any(|q| q.name == name) {
            return Err(CaseError::new(
                &p.at("name"),
                format!("duplicate param name '{name}'"),
            ));
        }
        let shape_path = p.at("shape");
        let shape = p
            .arr("shape")?
            .iter()
            .enumerate()
            .map(|(j, d)| usize_(d, &idx(&shape_path, j)))
            .collect::<Result<Vec<usize>>>()?;
        let size = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let size = cap(&shape_path, "element count", size, MAX_ELEMENTS)?;
        total = cap(
            "params",
            "total element count",
            total.checked_add(size),
            MAX_ELEMENTS,
        )?;
        let init = p.arr("init")?;
        if init.len() != size {
            return Err(CaseError::new(
                &path,
                format!(
                    "init has {} values but shape {} needs {size}",
                    init.len(),
                    fmt_shape(&shape)
                ),
            ));
        }
        let init = numbers(p.req("init")?, &p.at("init"), None)?;
        check_f32(&init, &p.at("init"), dtype)?;
        out.push(Param { name, shape, init });
    }
    Ok(out)
}

/// In f32 cases, data and initial values must be exactly representable in f32 (SCHEMA §1).
fn check_f32(values: &[f64], path: &str, dtype: Dtype) -> Result<()> {
    match values
        .iter()
        .enumerate()
        .find(|&(_, &v)| f64::from(v as f32) != v)
    {
        Some((i, v)) if dtype == Dtype::F32 => Err(CaseError::new(
            &idx(path, i),
            format!("{v:?} is not exactly representable in f32"),
        )),
        _ => Ok(()),
    }
}

fn parse_objective(o: &Obj<'_>, params: &[Param], dtype: Dtype) -> Result<Objective> {
    let n_elements = params.iter().map(|p| p.init.len()).sum::<usize>();
    let kind = o.str("kind")?;
    match kind {
        "quadratic" => {
            o.only(&["kind", "a", "b"], " for objective kind quadratic")?;
            let n = o.arr("a")?.len();
            cap(&o.at("a"), "n×n", n.checked_mul(n), MAX_DATA)?;
            if n != n_elements {
                return Err(CaseError::new(
                    &o.at("a"),
                    format!("quadratic has n = {n} but the params have {n_elements} elements"),
                ));
            }
            let rows = matrix(o.req("a")?, &o.at("a"), n, n)?;
            let at = |i: usize, j: usize| rows.get(i).and_then(|r| r.get(j));
            if let Some((i, j)) = (0..n)
                .flat_map(|i| (0..i).map(move |j| (i, j)))
                .find(|&(i, j)| at(i, j) != at(j, i))
            {
                return Err(CaseError::new(
                    &o.at("a"),
                    format!("not symmetric: a[{i}][{j}] != a[{j}][{i}]"),
                ));
            }
            let a = rows.concat();
            let b = numbers(o.req("b")?, &o.at("b"), Some(n))?;
            check_f32(&a, &o.at("a"), dtype)?;
            check_f32(&b, &o.at("b"), dtype)?;
            Ok(Objective::Quadratic { a, b, n })
        }
        "softmax" | "mlp" => {
            let mlp = kind == "mlp";
            if mlp {
                o.only(
                    &["kind", "x", "y", "classes", "hidden"],
                    " for objective kind mlp",
                )?;
            } else {
                o.only(
                    &["kind", "x", "y", "classes"],
                    " for objective kind softmax",
                )?;
            }
            let rows = o.arr("x")?;
            let n = cap(&o.at("x"), "sample count", Some(rows.len()), MAX_SAMPLES)?;
            let Some(first) = rows.first() else {
                return Err(CaseError::new(&o.at("x"), "must have at least one sample"));
            };
            let d = array(first, &idx(&o.at("x"), 0))?.len();
            cap(&o.at("x"), "n×d", n.checked_mul(d), MAX_DATA)?;
            cap(
                &o.at("x"),
                "samples × elements",
                n.checked_mul(n_elements),
                MAX_EVAL_COST,
            )?;
            let classes = o.usize("classes")?;
            let hidden = if mlp { o.usize("hidden")? } else { 0 };
            let shapes: Vec<(&str, Vec<usize>)> = if mlp {
                vec![
                    ("W1", vec![hidden, d]),
                    ("b1", vec![hidden]),
                    ("W2", vec![classes, hidden]),
                    ("b2", vec![classes]),
                ]
            } else {
                vec![("W", vec![classes, d]), ("b", vec![classes])]
            };
            check_classifier_params(params, &shapes, kind)?;
            let x = matrix(o.req("x")?, &o.at("x"), n, d)?.concat();
            check_f32(&x, &o.at("x"), dtype)?;
            let y_path = o.at("y");
            let y_arr = o.arr("y")?;
            if y_arr.len() != n {
                return Err(CaseError::new(
                    &y_path,
                    format!("has {} labels, expected {n}", y_arr.len()),
                ));
            }
            let y = y_arr
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let msg = match usize_(v, "") {
                        Ok(label) if label < classes => return Ok(label),
                        Ok(label) => format!("label {label} out of range for {classes} classes"),
                        Err(e) => e.message,
                    };
                    Err(CaseError::new(&idx(&y_path, i), msg))
                })
                .collect::<Result<Vec<usize>>>()?;
            Ok(if mlp {
                Objective::Mlp {
                    x,
                    y,
                    n,
                    d,
                    classes,
                    hidden,
                }
            } else {
                Objective::Softmax {
                    x,
                    y,
                    n,
                    d,
                    classes,
                }
            })
        }
        other => Err(CaseError::new(
            &o.at("kind"),
            format!("unknown objective kind '{other}', expected quadratic, softmax or mlp"),
        )),
    }
}

/// Checks the names, order and shapes of a classifier's params.
fn check_classifier_params(
    params: &[Param],
    want: &[(&str, Vec<usize>)],
    kind: &str,
) -> Result<()> {
    let names: Vec<&str> = want.iter().map(|w| w.0).collect();
    let got: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    if names != got {
        return Err(CaseError::new(
            "params",
            format!(
                "{kind} objective needs params [{}] in that order, found [{}]",
                names.join(", "),
                got.join(", ")
            ),
        ));
    }
    for (i, (p, (name, need))) in params.iter().zip(want).enumerate() {
        if &p.shape != need {
            return Err(CaseError::new(
                &idx("params", i),
                format!(
                    "{name} has shape {} but the {kind} objective needs {}",
                    fmt_shape(&p.shape),
                    fmt_shape(need)
                ),
            ));
        }
    }
    Ok(())
}

fn base_kind_name(b: &BaseHyper) -> &'static str {
    match b {
        BaseHyper::Sgd { .. } => "sgd",
        BaseHyper::Adam { .. } => "adam",
        BaseHyper::AdamW { .. } => "adamw",
    }
}

/// Sets one base option; returns `Ok(false)` if `key` is not a base key of this kind.
fn set_base_key(h: &mut BaseHyper, key: &str, v: &Json, path: &str) -> Result<bool> {
    match h {
        BaseHyper::Sgd {
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
        } => match key {
            "lr" => *lr = num(v, path)?,
            "momentum" => *momentum = num(v, path)?,
            "dampening" => *dampening = num(v, path)?,
            "weight_decay" => *weight_decay = num(v, path)?,
            "nesterov" => *nesterov = boolean(v, path)?,
            _ => return Ok(false),
        },
        BaseHyper::Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            amsgrad,
        }
        | BaseHyper::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            amsgrad,
        } => match key {
            "lr" => *lr = num(v, path)?,
            "betas" => match numbers(v, path, Some(2))?.as_slice() {
                &[b1, b2] => (*beta1, *beta2) = (b1, b2),
                _ => return Err(CaseError::new(path, "expected [beta1, beta2]")),
            },
            "eps" => *eps = num(v, path)?,
            "weight_decay" => *weight_decay = num(v, path)?,
            "amsgrad" => *amsgrad = boolean(v, path)?,
            _ => return Ok(false),
        },
    }
    Ok(true)
}

fn parse_base(b: &Obj<'_>) -> Result<BaseHyper> {
    let kind = b.str("kind")?;
    let mut h = match kind {
        "sgd" => {
            b.req("lr")?;
            BaseHyper::Sgd {
                lr: 0.0,
                momentum: 0.0,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false,
            }
        }
        "adam" => BaseHyper::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        },
        "adamw" => BaseHyper::AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
        },
        other => {
            return Err(CaseError::new(
                &b.at("kind"),
                format!("unknown base kind '{other}', expected sgd, adam or adamw"),
            ));
        }
    };
    for (key, v) in b.map.iter().filter(|(k, _)| k.as_str() != "kind") {
        if !set_base_key(&mut h, key, v, &b.at(key))? {
            return Err(CaseError::new(
                &b.path,
                format!("unknown key '{key}' for base kind {kind}"),
            ));
        }
    }
    Ok(h)
}

fn parse_schedule(s: &Obj<'_>) -> Result<ScheduleSpec> {
    match s.str("kind")? {
        kind @ ("linear" | "cosine") => {
            s.only(
                &[
                    "kind",
                    "t_max",
                    "max_value",
                    "min_value",
                    "init_value",
                    "warmup_steps",
                ],
                &format!(" for schedule kind {kind}"),
            )?;
            let (t_max, max_value) = (s.num("t_max")?, s.num("max_value")?);
            let min_value = s.num_or("min_value", 0.0)?;
            let init_value = s.num_or("init_value", 0.0)?;
            let warmup_steps = s.num_or("warmup_steps", 0.0)?;
            Ok(if kind == "linear" {
                ScheduleSpec::Linear {
                    t_max,
                    max_value,
                    min_value,
                    init_value,
                    warmup_steps,
                }
            } else {
                ScheduleSpec::Cosine {
                    t_max,
                    max_value,
                    min_value,
                    init_value,
                    warmup_steps,
                }
            })
        }
        "proportion" => {
            s.only(
                &["kind", "max_lr", "min_lr", "max_value", "min_value"],
                " for schedule kind proportion",
            )?;
            Ok(ScheduleSpec::Proportion {
                max_lr: s.num("max_lr")?,
                min_lr: s.num("min_lr")?,
                max_value: s.num("max_value")?,
                min_value: s.num("min_value")?,
            })
        }
        other => Err(CaseError::new(
            &s.at("kind"),
            format!("unknown schedule kind '{other}', expected linear, cosine or proportion"),
        )),
    }
}

/// Returns the variant, the base hyperparameters, and the optimizer-level rho and adaptive.
fn parse_optimizer(o: &Obj<'_>) -> Result<(VariantSpec, BaseHyper, f64, bool)> {
    let variant = o.str("variant")?;
    let keys: &[&str] = match variant {
        "sam" => &["variant", "base", "rho", "adaptive"],
        "wasam" => &["variant", "base", "rho", "adaptive", "swa_start"],
        "wsam" => &[
            "variant", "base", "rho", "adaptive", "gamma", "decouple", "max_norm", "sam_eps",
        ],
        "gsam" => &[
            "variant",
            "base",
            "alpha",
            "adaptive",
            "perturb_eps",
            "rho_schedule",
            "lr_schedule",
        ],
        other => {
            return Err(CaseError::new(
                &o.at("variant"),
                format!("unknown variant '{other}', expected sam, wasam, wsam or gsam"),
            ));
        }
    };
    o.only(keys, &format!(" for variant {variant}"))?;
    let base = parse_base(&o.obj("base")?)?;
    let adaptive = o.bool_or("adaptive", false)?;
    let rho = if variant == "gsam" {
        0.0
    } else {
        o.num_or("rho", 0.05)?
    };
    let spec = match variant {
        "wasam" => VariantSpec::Wasam {
            swa_start: uint(o.req("swa_start")?, &o.at("swa_start"))?,
        },
        "wsam" => VariantSpec::Wsam {
            gamma: o.num_or("gamma", 0.9)?,
            decouple: o.bool_or("decouple", true)?,
            max_norm: match o.get("max_norm") {
                None | Some(Json::Null) => None,
                Some(v) => Some(num(v, &o.at("max_norm"))?),
            },
            sam_eps: o.num_or("sam_eps", 1e-12)?,
        },
        "gsam" => {
            let rho_schedule = parse_schedule(&o.obj("rho_schedule")?)?;
            let lr_schedule = match o.get("lr_schedule") {
                None | Some(Json::Null) => None,
                Some(v) => Some(parse_schedule(&Obj::new(v, &o.at("lr_schedule"))?)?),
            };
            if matches!(lr_schedule, Some(ScheduleSpec::Proportion { .. })) {
                return Err(CaseError::new(
                    &o.at("lr_schedule"),
                    "kind 'proportion' is only allowed for rho_schedule",
                ));
            }
            if matches!(rho_schedule, ScheduleSpec::Proportion { .. }) && lr_schedule.is_none() {
                return Err(CaseError::new(
                    &o.at("rho_schedule"),
                    "kind 'proportion' requires a non-null lr_schedule",
                ));
            }
            VariantSpec::Gsam {
                alpha: o.num("alpha")?,
                adaptive,
                perturb_eps: o.num_or("perturb_eps", 1e-12)?,
                rho_schedule,
                lr_schedule,
            }
        }
        _ => VariantSpec::Sam,
    };
    Ok((spec, base, rho, adaptive))
}

fn parse_groups(
    list: &[Json],
    params: &[Param],
    variant: &VariantSpec,
    base: BaseHyper,
    rho: f64,
    adaptive: bool,
) -> Result<Vec<GroupSpec>> {
    if list.is_empty() {
        return Err(CaseError::new(
            "param_groups",
            "must list at least one group",
        ));
    }
    let gsam = matches!(variant, VariantSpec::Gsam { .. });
    let by_name: BTreeMap<&str, usize> = params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let mut owner: Vec<Option<usize>> = vec![None; params.len()];
    let mut groups = Vec::with_capacity(list.len());
    for (g, v) in list.iter().enumerate() {
        let path = idx("param_groups", g);
        let o = Obj::new(v, &path)?;
        o.only(&["params", "options"], "")?;
        let names_path = o.at("params");
        let mut members = Vec::new();
        for (j, nv) in o.arr("params")?.iter().enumerate() {
            let p = idx(&names_path, j);
            let name = string(nv, &p)?;
            let Some(&i) = by_name.get(name) else {
                return Err(CaseError::new(&p, format!("unknown param '{name}'")));
            };
            match owner.get_mut(i) {
                Some(Some(prev)) => {
                    return Err(CaseError::new(
                        &p,
                        format!("param '{name}' is already in param_groups[{prev}]"),
                    ));
                }
                Some(slot) => *slot = Some(g),
                None => return Err(CaseError::new(&p, "internal index error")),
            }
            members.push(i);
        }
        let mut spec = GroupSpec {
            params: members,
            base,
            rho,
            adaptive,
        };
        if let Some(opts) = o.get("options") {
            let opts = Obj::new(opts, &o.at("options"))?;
            for (key, v) in opts.map {
                let kp = opts.at(key);
                match key.as_str() {
                    "rho" if !gsam => spec.rho = num(v, &kp)?,
                    "adaptive" if !gsam => spec.adaptive = boolean(v, &kp)?,
                    _ => {
                        if !set_base_key(&mut spec.base, key, v, &kp)? {
                            let kind = base_kind_name(&base);
                            let note = if gsam {
                                " (gsam groups take base keys only)"
                            } else {
                                ""
                            };
                            return Err(CaseError::new(
                                &opts.path,
                                format!("unknown key '{key}' for base kind {kind}{note}"),
                            ));
                        }
                    }
                }
            }
        }
        groups.push(spec);
    }
    if let Some(i) = owner.iter().position(Option::is_none) {
        let name = params.get(i).map_or("", |p| p.name.as_str());
        return Err(CaseError::new(
            &idx("params", i),
            format!("param '{name}' is in no param group"),
        ));
    }
    Ok(groups)
}

fn parse_expected(e: &Obj<'_>, variant: &VariantSpec, steps: usize, n: usize) -> Result<Expected> {
    let (wasam, gsam) = (
        matches!(variant, VariantSpec::Wasam { .. }),
        matches!(variant, VariantSpec::Gsam { .. }),
    );
    let (keys, name): (&[&str], &str) = match variant {
        VariantSpec::Sam => (&["loss", "params"], "sam"),
        VariantSpec::Wasam { .. } => (&["loss", "params", "swa_params"], "wasam"),
        VariantSpec::Wsam { .. } => (&["loss", "params"], "wsam"),
        VariantSpec::Gsam { .. } => (&["loss", "params", "lr", "rho"], "gsam"),
    };
    e.only(keys, &format!(" for variant {name}"))?;
    let loss = numbers(e.req("loss")?, &e.at("loss"), Some(steps))?;
    let params = matrix(e.req("params")?, &e.at("params"), steps, n)?;
    let swa_params = wasam
        .then(|| numbers(e.req("swa_params")?, &e.at("swa_params"), Some(n)))
        .transpose()?;
    let lr = gsam
        .then(|| numbers(e.req("lr")?, &e.at("lr"), Some(steps)))
        .transpose()?;
    let rho = gsam
        .then(|| numbers(e.req("rho")?, &e.at("rho"), Some(steps)))
        .transpose()?;
    Ok(Expected {
        loss,
        params,
        swa_params,
        lr,
        rho,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cases")
    }

    fn case_files() -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(cases_dir())
            .expect("cases dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
                (stem, std::fs::read(&p).expect("read case"))
            })
            .collect()
    }

    fn small_case() -> Vec<u8> {
        std::fs::read(cases_dir().join("sam_multigroup_sgd.json")).expect("read")
    }

    #[test]
    fn every_vendored_case_parses() {
        let files = case_files();
        assert!(files.len() >= 41, "found {} cases", files.len());
        for (stem, bytes) in &files {
            let c = parse_case(bytes).unwrap_or_else(|e| panic!("{stem}: {e}"));
            assert_eq!(&c.name, stem);
            assert_eq!(c.expected.loss.len(), c.steps);
            assert_eq!(c.offsets().len(), c.params.len());
            assert!(c.expected.params.iter().all(|p| p.len() == c.n_elements()));
        }
    }

    #[test]
    fn resolution_and_defaults() {
        let c = parse_case(&small_case()).expect("parse");
        assert_eq!(c.variant, VariantSpec::Sam);
        assert_eq!(c.groups.len(), 2);
        assert_eq!(c.groups[0].params, vec![0]);
        assert_eq!(c.groups[0].rho, 0.246);
        assert_eq!(
            c.groups[1].base,
            BaseHyper::Sgd {
                lr: 0.286,
                momentum: 0.136,
                dampening: 0.0,
                weight_decay: 0.0,
                nesterov: false
            }
        );
        assert_eq!(c.offsets(), vec![0, 9]);

        // Minimal adamw + wsam: every default applied.
        let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("json");
        v["optimizer"] = serde_json::json!({"variant": "wsam", "base": {"kind": "adamw"}});
        v["param_groups"] = serde_json::json!([{"params": ["W", "b"]}]);
        let c = parse_case(v.to_string().as_bytes()).expect("parse");
        assert_eq!(
            c.variant,
            VariantSpec::Wsam {
                gamma: 0.9,
                decouple: true,
                max_norm: None,
                sam_eps: 1e-12
            }
        );
        assert_eq!(
            c.groups[0],
            GroupSpec {
                params: vec![0, 1],
                base: BaseHyper::AdamW {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 1e-2,
                    amsgrad: false
                },
                rho: 0.05,
                adaptive: false,
            }
        );
    }

    #[test]
    fn gsam_groups_and_schedules() {
        let bytes = std::fs::read(cases_dir().join("gsam_multigroup_const_lr.json")).expect("read");
        let c = parse_case(&bytes).expect("parse");
        assert!(matches!(
            c.variant,
            VariantSpec::Gsam {
                lr_schedule: None,
                ..
            }
        ));
        assert_eq!(c.groups[0].base.lr(), 0.0754);
        assert_eq!(c.groups[1].rho, 0.0);
        assert!(c.expected.lr.is_some() && c.expected.rho.is_some());
    }

    /// Applies `edit` to the JSON of a valid case and returns the parse error text.
    fn error_after(file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let bytes = std::fs::read(cases_dir().join(file)).expect("read");
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        edit(&mut v);
        match parse_case(v.to_string().as_bytes()) {
            Ok(_) => panic!("edited case was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn malformed_inputs_are_rejected_with_clear_messages() {
        use serde_json::json;
        let sgd = "sam_multigroup_sgd.json";
        let checks: Vec<(String, &str)> = vec![
            (
                error_after(sgd, |v| v["param_groups"][1]["options"]["foo"] = json!(1)),
                "param_groups[1].options: unknown key 'foo' for base kind sgd",
            ),
            (
                error_after(sgd, |v| {
                    v["params"][0]["init"]
                        .as_array_mut()
                        .expect("a")
                        .truncate(8)
                }),
                "params[0]: init has 8 values but shape [3,3] needs 9",
            ),
            (
                error_after(sgd, |v| v["schema"] = json!("sam-conformance/2")),
                "schema: unsupported schema 'sam-conformance/2', expected 'sam-conformance/1'",
            ),
            (
                error_after(sgd, |v| v["optimizer"]["variant"] = json!("lookahead")),
                "optimizer.variant: unknown variant 'lookahead', expected sam, wasam, wsam or gsam",
            ),
            (
                error_after(sgd, |v| v["optimizer"]["base"]["kind"] = json!("rmsprop")),
                "optimizer.base.kind: unknown base kind 'rmsprop', expected sgd, adam or adamw",
            ),
            (
                error_after(sgd, |v| v["param_groups"][1]["params"] = json!(["b", "W"])),
                "param_groups[1].params[1]: param 'W' is already in param_groups[0]",
            ),
            (
                error_after(sgd, |v| v["param_groups"][1]["params"] = json!([])),
                "params[1]: param 'b' is in no param group",
            ),
            (
                error_after(sgd, |v| v["param_groups"][1]["params"] = json!(["c"])),
                "param_groups[1].params[0]: unknown param 'c'",
            ),
            (
                error_after(sgd, |v| v["params"][1]["shape"] = json!([3, 1])),
                "params[1]: b has shape [3,1] but the softmax objective needs [3]",
            ),
            (
                error_after(sgd, |v| v["objective"]["y"][2] = json!(3)),
                "objective.y[2]: label 3 out of range for 3 classes",
            ),
            (
                error_after(sgd, |v| v["steps"] = json!(2.5)),
                "steps: must be a non-negative integer, got 2.5",
            ),
            (
                error_after(sgd, |v| v["steps"] = json!(-1)),
                "steps: must be a non-negative integer, got -1",
            ),
            (
                error_after(sgd, |v| {
                    v["expected"]["loss"].as_array_mut().expect("a").pop();
                }),
                "expected.loss: has 13 values, expected 14",
            ),
            (
                error_after(sgd, |v| {
                    v["expected"]["params"][4]
                        .as_array_mut()
                        .expect("a")
                        .push(json!(0))
                }),
                "expected.params[4]: row has 13 values, expected 12",
            ),
            (
                error_after(sgd, |v| {
                    v["optimizer"]["base"]
                        .as_object_mut()
                        .expect("o")
                        .remove("lr");
                }),
                "optimizer.base.lr: missing required field",
            ),
            (
                error_after("wasam_sgd_momentum.json", |v| {
                    v["expected"]
                        .as_object_mut()
                        .expect("o")
                        .remove("swa_params");
                }),
                "expected.swa_params: missing required field",
            ),
            (
                error_after("gsam_proportion_cosine.json", |v| {
                    v["optimizer"]["lr_schedule"] = json!(null)
                }),
                "optimizer.rho_schedule: kind 'proportion' requires a non-null lr_schedule",
            ),
            (
                error_after("gsam_multigroup_const_lr.json", |v| {
                    v["param_groups"][0]["options"]["rho"] = json!(0.1)
                }),
                "param_groups[0].options: unknown key 'rho' for base kind sgd (gsam groups take base keys only)",
            ),
            (
                error_after("gsam_multigroup_const_lr.json", |v| {
                    v["optimizer"]["rho_schedule"]["kind"] = json!("step")
                }),
                "optimizer.rho_schedule.kind: unknown schedule kind 'step', expected linear, cosine or proportion",
            ),
            (
                error_after("asam_sgd_plain.json", |v| {
                    v["objective"]["a"][1][0] = json!(123.0)
                }),
                "objective.a: not symmetric: a[1][0] != a[0][1]",
            ),
            (
                error_after("asam_sgd_plain.json", |v| {
                    v["objective"]["a"][2].as_array_mut().expect("a").pop();
                }),
                "objective.a[2]: row has 7 values, expected 8",
            ),
            (
                error_after("f32_wasam.json", |v| v["params"][1]["init"][0] = json!(0.1)),
                "params[1].init[0]: 0.1 is not exactly representable in f32",
            ),
            (
                error_after("asam_adamw.json", |v| {
                    v["optimizer"]["base"]["betas"] = json!([0.9])
                }),
                "optimizer.base.betas: has 1 values, expected 2",
            ),
            (
                error_after(sgd, |v| v["steps"] = json!(100_001)),
                "steps: value is 100001, above the cap of 100000",
            ),
            (
                error_after(sgd, |v| {
                    v["params"][0]["shape"] = json!([1_000_000, 1_000_000])
                }),
                "params[0].shape: element count is 1000000000000, above the cap of 1000000",
            ),
            (
                error_after(sgd, |v| v["params"][0]["shape"] = json!([u64::MAX, 4])),
                "params[0].shape: element count overflows, above the cap of 1000000",
            ),
            (
                error_after(sgd, |v| v["expected"]["lr"] = json!([])),
                "expected: unknown key 'lr' for variant sam",
            ),
        ];
        for (got, want) in checks {
            assert_eq!(got, want);
        }
        assert_eq!(
            parse_case(b"{\"schema\": 1, \"schema\": 2}").map_err(|e| e.to_string()),
            Err("invalid JSON: duplicate key 'schema' at line 1 column 22".to_owned())
        );
        let big = vec![b' '; MAX_INPUT_BYTES + 1];
        assert_eq!(
            parse_case(&big).map_err(|e| e.to_string()),
            Err(format!(
                "input is {} bytes, above the cap of {MAX_INPUT_BYTES}",
                MAX_INPUT_BYTES + 1
            ))
        );
    }

    #[test]
    fn integral_floats_accepted_as_integers() {
        let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("json");
        v["steps"] = serde_json::json!(14.0);
        v["params"][0]["shape"] = serde_json::json!([3.0, 3]);
        let c = parse_case(v.to_string().as_bytes()).expect("parse");
        assert_eq!((c.steps, c.params[0].shape.clone()), (14, vec![3, 3]));
    }

    #[test]
    fn hyperparameter_domains_are_not_checked() {
        let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("json");
        v["optimizer"] = serde_json::json!({"variant": "wsam", "rho": -1.0, "gamma": 1.5,
            "base": {"kind": "sgd", "lr": -0.1, "momentum": 2.0}});
        let c = parse_case(v.to_string().as_bytes()).expect("parse");
        assert_eq!(c.groups[0].rho, 0.246);
        assert!(matches!(c.variant, VariantSpec::Wsam { gamma: 1.5, .. }));
        assert_eq!(c.groups[1].base.lr(), 0.286);
    }

    /// xorshift64*, enough for fuzz-style tests without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn truncations_never_panic_and_are_rejected() {
        for (stem, bytes) in case_files().iter().step_by(5) {
            let len = bytes.trim_ascii_end().len();
            let stride = (len / 300).max(1);
            let cuts = (0..len).step_by(stride).chain(len.saturating_sub(64)..len);
            for cut in cuts {
                assert!(
                    parse_case(&bytes[..cut]).is_err(),
                    "{stem} truncated at {cut} was accepted"
                );
            }
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let files = case_files();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let tokens: [&[u8]; 12] = [
            b"-",
            b"0",
            b"1e308",
            b"1e999",
            b"\"",
            b",",
            b"]",
            b"[",
            b"{}",
            b"null",
            b"3.5",
            b"99999999999",
        ];
        for _ in 0..3000 {
            let (_, base) = &files[rng.below(files.len())];
            let mut bytes = base.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] = rng.next() as u8,
                    1 => {
                        let t = tokens[rng.below(tokens.len())];
                        bytes.splice(at..at, t.iter().copied());
                    }
                    _ => {
                        let end = (at + 1 + rng.below(16)).min(bytes.len());
                        bytes.drain(at..end);
                    }
                }
            }
            let _ = parse_case(&bytes);
        }
        for len in [0, 1, 2, 7, 100, 5000] {
            let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            assert!(parse_case(&noise).is_err());
        }
        let deep = "[".repeat(100_000);
        assert!(parse_case(deep.as_bytes()).is_err());
    }
}
