//! The case file as written: serde types that mirror the JSON of `SCHEMA.md` one to one.
//!
//! Every object denies unknown fields, and serde's derive refuses a key given twice. Numbers
//! are `f64` (serde_json accepts any JSON number there and never yields a non-finite one:
//! `1e999` is a syntax error); counts and indices are [`Uint`]. An optional field is either
//! absent or holds a value of its type: `null` is refused ([`some`]) except where SCHEMA gives
//! it a meaning (`max_norm`, `lr_schedule`). Fields whose meaning depends on a `kind` or a
//! `variant` are all optional here; which of them a kind takes, their defaults and every
//! cross-field rule are applied by `resolve`, which reports the same paths.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::Dtype;

/// Deserializes a present field as `Some`, so that `null` reaches `T` (which refuses it unless
/// `T` is itself an `Option`). Used with `#[serde(default)]`: an absent field is `None`.
fn some<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// The names of the optional fields of `$raw` that are present, in declaration order.
macro_rules! given {
    ($raw:expr; $($field:ident),+ $(,)?) => {
        [$((stringify!($field), $raw.$field.is_some())),+]
            .into_iter()
            .filter_map(|(key, present)| present.then_some(key))
    };
}

/// A non-negative integer, exact. An integral float (`3.0`) is accepted, as a writer that
/// does not distinguish integers from floats may produce one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Uint(pub u64);

impl<'de> Deserialize<'de> for Uint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UintVisitor)
    }
}

struct UintVisitor;

impl Visitor<'_> for UintVisitor {
    type Value = Uint;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Uint, E> {
        Ok(Uint(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Uint, E> {
        u64::try_from(v)
            .map(Uint)
            .map_err(|_| E::custom(format!("must be a non-negative integer, got {v}")))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Uint, E> {
        // 2^64 as f64; every integral f64 in [0, 2^64) converts exactly.
        const TWO_64: f64 = 18_446_744_073_709_551_616.0;
        if v.fract() == 0.0 && (0.0..TWO_64).contains(&v) {
            Ok(Uint(v as u64))
        } else {
            Err(E::custom(format!(
                "must be a non-negative integer, got {v:?}"
            )))
        }
    }
}

/// The whole file (SCHEMA §2).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a case object")]
pub(super) struct RawCase {
    pub schema: String,
    pub name: String,
    pub description: String,
    pub reference: String,
    pub dtype: Dtype,
    pub tolerance: RawTolerance,
    pub objective: RawObjective,
    pub params: Vec<RawParam>,
    pub param_groups: Vec<RawGroup>,
    pub optimizer: RawOptimizer,
    pub steps: Uint,
    pub expected: RawExpected,
}

/// Only the schema tag: read first, so that a file of another schema version is named as
/// such rather than by its first unknown field.
#[derive(Debug, Deserialize)]
pub(super) struct Head {
    pub schema: Option<String>,
}

/// SCHEMA §9.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawTolerance {
    pub rtol: f64,
    pub atol: f64,
}

/// SCHEMA §3; which fields a kind takes is checked by `resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawObjective {
    pub kind: String,
    #[serde(default, deserialize_with = "some")]
    pub a: Option<Vec<Vec<f64>>>,
    #[serde(default, deserialize_with = "some")]
    pub b: Option<Vec<f64>>,
    #[serde(default, deserialize_with = "some")]
    pub x: Option<Vec<Vec<f64>>>,
    #[serde(default, deserialize_with = "some")]
    pub y: Option<Vec<Uint>>,
    #[serde(default, deserialize_with = "some")]
    pub classes: Option<Uint>,
    #[serde(default, deserialize_with = "some")]
    pub hidden: Option<Uint>,
}

impl RawObjective {
    pub fn given(&self) -> impl Iterator<Item = &'static str> {
        given!(self; a, b, x, y, classes, hidden)
    }
}

/// One entry of `params`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawParam {
    pub name: String,
    pub shape: Vec<Uint>,
    pub init: Vec<f64>,
}

/// One entry of `param_groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawGroup {
    pub params: Vec<String>,
    #[serde(default, deserialize_with = "some")]
    pub options: Option<RawHyper>,
}

/// Base-optimizer keys, as `optimizer.base` (with `kind`) and as a group's `options` (with
/// `rho` and `adaptive` for the variants that take them per group). Which keys fit which
/// place and kind is checked by `resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawHyper {
    #[serde(default, deserialize_with = "some")]
    pub kind: Option<String>,
    #[serde(default, deserialize_with = "some")]
    pub lr: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub momentum: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub dampening: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub weight_decay: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub nesterov: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub betas: Option<[f64; 2]>,
    #[serde(default, deserialize_with = "some")]
    pub eps: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub amsgrad: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub rho: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub adaptive: Option<bool>,
}

impl RawHyper {
    pub fn given(&self) -> impl Iterator<Item = &'static str> {
        given!(self; kind, lr, momentum, dampening, weight_decay, nesterov, betas, eps, amsgrad,
            rho, adaptive)
    }
}

/// `optimizer` (SCHEMA §5); which fields a variant takes is checked by `resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawOptimizer {
    pub variant: String,
    pub base: RawHyper,
    #[serde(default, deserialize_with = "some")]
    pub rho: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub adaptive: Option<bool>,
    #[serde(default, deserialize_with = "some")]
    pub swa_start: Option<Uint>,
    #[serde(default, deserialize_with = "some")]
    pub gamma: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub decouple: Option<bool>,
    /// `Some(None)` for an explicit `null`.
    #[serde(default, deserialize_with = "some")]
    pub max_norm: Option<Option<f64>>,
    #[serde(default, deserialize_with = "some")]
    pub sam_eps: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub alpha: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub perturb_eps: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub rho_schedule: Option<RawSchedule>,
    /// `Some(None)` for an explicit `null`.
    #[serde(default, deserialize_with = "some")]
    pub lr_schedule: Option<Option<RawSchedule>>,
}

impl RawOptimizer {
    pub fn given(&self) -> impl Iterator<Item = &'static str> {
        given!(self; rho, adaptive, swa_start, gamma, decouple, max_norm, sam_eps, alpha,
            perturb_eps, rho_schedule, lr_schedule)
    }
}

/// A GSAM schedule (SCHEMA §5, §7.4); which fields a kind takes is checked by `resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawSchedule {
    pub kind: String,
    #[serde(default, deserialize_with = "some")]
    pub t_max: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub max_value: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub min_value: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub init_value: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub warmup_steps: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub max_lr: Option<f64>,
    #[serde(default, deserialize_with = "some")]
    pub min_lr: Option<f64>,
}

impl RawSchedule {
    pub fn given(&self) -> impl Iterator<Item = &'static str> {
        given!(self; t_max, max_value, min_value, init_value, warmup_steps, max_lr, min_lr)
    }
}

/// `expected` (SCHEMA §8); which fields a variant takes is checked by `resolve`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an object")]
pub(super) struct RawExpected {
    pub loss: Vec<f64>,
    pub params: Vec<Vec<f64>>,
    #[serde(default, deserialize_with = "some")]
    pub swa_params: Option<Vec<f64>>,
    #[serde(default, deserialize_with = "some")]
    pub lr: Option<Vec<f64>>,
    #[serde(default, deserialize_with = "some")]
    pub rho: Option<Vec<f64>>,
}

impl RawExpected {
    pub fn given(&self) -> impl Iterator<Item = &'static str> {
        given!(self; swa_params, lr, rho)
    }
}
