//! The `case_json` check: hostile case files into the conformance runner.
//!
//! An input starting with a NUL byte is a *structured* input: the rest picks one of a few
//! vendored conformance cases and a list of mutations of its JSON tree (replace a value by an
//! odd one, drop or add keys, resize arrays, shorten the run consistently) and of its text
//! (NaN/∞ tokens, huge integers, spliced bytes). Any other input is fed as it is (the seed
//! corpus holds every vendored case). The check asserts:
//!
//! - `run_bytes` never panics and returns `PASS`, a mismatch, or an error with a message;
//! - an input the parser accepts satisfies every cap of `sam_verification::case`, and its
//!   replay is deterministic (small cases are replayed twice);
//! - an unmutated vendored case passes, and so does one whose run was shortened consistently
//!   (steps and expected trajectory cut to a prefix).

use serde_json::Value;

use sam_verification::backend::CoreBackend;
use sam_verification::case::{self, Case, Objective};
use sam_verification::replay::Verdict;
use sam_verification::run_bytes;

use crate::palette;
use crate::src::Src;
use crate::{Policy, Violation};

/// Vendored cases the structured mode mutates (small ones, every variant, both dtypes, all
/// three objectives).
pub const BASE_CASES: &[(&str, &str)] = &[
    (
        "gsam_zero_grad_start",
        include_str!("../../verification/cases/gsam_zero_grad_start.json"),
    ),
    (
        "wsam_decoupled_adam",
        include_str!("../../verification/cases/wsam_decoupled_adam.json"),
    ),
    (
        "sam_multigroup_mixed_adaptive_adam",
        include_str!("../../verification/cases/sam_multigroup_mixed_adaptive_adam.json"),
    ),
    (
        "f32_wasam",
        include_str!("../../verification/cases/f32_wasam.json"),
    ),
    (
        "f32_gsam_cosine",
        include_str!("../../verification/cases/f32_gsam_cosine.json"),
    ),
    (
        "wsam_multigroup",
        include_str!("../../verification/cases/wsam_multigroup.json"),
    ),
    (
        "gsam_proportion_cosine",
        include_str!("../../verification/cases/gsam_proportion_cosine.json"),
    ),
];

/// Largest mutated case the structured mode replays (bounds the replay time per input).
pub const MAX_MUTATED_BYTES: usize = 256 << 10;

/// Keys worth inserting (known keys of every object of the schema, and a stranger).
const KEYS: &[&str] = &[
    "steps",
    "rho",
    "gamma",
    "alpha",
    "adaptive",
    "max_norm",
    "swa_start",
    "classes",
    "hidden",
    "kind",
    "lr",
    "betas",
    "eps",
    "momentum",
    "nesterov",
    "dampening",
    "amsgrad",
    "weight_decay",
    "decouple",
    "sam_eps",
    "perturb_eps",
    "t_max",
    "warmup_steps",
    "max_value",
    "min_value",
    "init_value",
    "max_lr",
    "min_lr",
    "lr_schedule",
    "rho_schedule",
    "options",
    "params",
    "swa_params",
    "loss",
    "rtol",
    "atol",
    "dtype",
    "schema",
    "name",
    "shape",
    "init",
    "x",
    "y",
    "a",
    "b",
    "unknown",
    "",
];

/// Odd number tokens for text mutations.
const TOKENS: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "18446744073709551616",
    "18446744073709551615",
    "-9223372036854775809",
    "-0",
    "0.0",
    "-0.0",
    "1E+2",
    "01",
    "1.",
    ".5",
    "9007199254740993",
    "100001",
    "1000000",
    "4294967296",
    "5e-324",
    "1.7976931348623157e308",
    "\"1\"",
    "null",
    "true",
    "[]",
    "{}",
];

fn odd_value(s: &mut Src<'_>) -> Value {
    match s.int(0, 11) {
        0 => Value::Null,
        1 => Value::Bool(s.bool()),
        2 => Value::from(s.u64()),
        3 => Value::from(-(s.int(0, 1 << 40) as i64)),
        4 => Value::from(s.int(0, 200_000)),
        5 => serde_json::Number::from_f64(palette::element(s)).map_or(Value::Null, Value::Number),
        6 => Value::String(
            s.pick(&[
                "",
                "sam",
                "gsam",
                "wsam",
                "wasam",
                "f16",
                "f32",
                "f64",
                "linear",
                "cosine",
                "proportion",
                "sgd",
                "adam",
                "adamw",
                "quadratic",
                "softmax",
                "mlp",
                "sam-conformance/2",
                "\u{0}\u{ffff}",
            ])
            .into(),
        ),
        7 => Value::Array(vec![]),
        8 => Value::Object(serde_json::Map::new()),
        9 => Value::Array(
            (0..s.usize(1, 4))
                .map(|_| Value::from(s.int(0, 3)))
                .collect(),
        ),
        10 => Value::from(s.pick(&[0.0, -0.0, 1.5, 1e308, -1e308, 5e-324, 0.5, 2.0])),
        _ => Value::from(s.int(0, 12)),
    }
}

/// Paths (object keys / array indices) of every node, up to a cap.
fn paths(v: &Value, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
    if out.len() >= 4096 {
        return;
    }
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(Seg::Key(k.clone()));
                paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate().take(64) {
                at.push(Seg::Index(i));
                paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn node<'v>(v: &'v mut Value, path: &[Seg]) -> Option<&'v mut Value> {
    let mut cur = v;
    for s in path {
        cur = match (s, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Shortens the run to `k` steps, consistently: the case stays valid and must still pass.
fn shorten(v: &mut Value, k: u64) -> bool {
    let Some(steps) = v.get("steps").and_then(Value::as_u64) else {
        return false;
    };
    if k >= steps || k == 0 {
        return false;
    }
    // WASAM's expected average is of the full run; a shorter run has another one.
    if v.pointer("/expected/swa_params").is_some() {
        return false;
    }
    v["steps"] = Value::from(k);
    for key in ["loss", "params", "lr", "rho"] {
        if let Some(Value::Array(a)) = v.pointer_mut(&format!("/expected/{key}")) {
            a.truncate(k as usize);
        }
    }
    true
}

/// Mutates a JSON tree (also used by the `checkpoint` check): returns the number of mutations
/// applied and whether all of them kept a case consistent.
pub(crate) fn mutate(s: &mut Src<'_>, v: &mut Value) -> (usize, bool) {
    let mut applied = 0;
    let mut only_consistent = true;
    for _ in 0..s.usize(0, 6) {
        let mut all = Vec::new();
        paths(v, &mut Vec::new(), &mut all);
        let path = all[s.index(all.len())].clone();
        let op = s.int(0, 9);
        if op == 0 {
            let k = s.int(1, 40);
            if shorten(v, k) {
                applied += 1;
            }
            continue;
        }
        only_consistent = false;
        let Some(n) = node(v, &path) else { continue };
        applied += 1;
        match (op, n) {
            (1..=3, n) => *n = odd_value(s),
            (4, Value::Object(m)) => {
                let keys: Vec<String> = m.keys().cloned().collect();
                if !keys.is_empty() {
                    m.remove(&keys[s.index(keys.len())]);
                }
            }
            (5, Value::Object(m)) => {
                let k = s.pick(KEYS).to_string();
                m.insert(k, odd_value(s));
            }
            (6, Value::Array(a)) if !a.is_empty() => {
                let i = s.index(a.len());
                match s.int(0, 3) {
                    0 => {
                        a.remove(i);
                    }
                    1 => {
                        let x = a[i].clone();
                        a.insert(i, x);
                    }
                    2 => a.truncate(i),
                    _ => {
                        let x = a[i].clone();
                        let extra = s.usize(1, 64);
                        a.extend(std::iter::repeat_n(x, extra));
                    }
                }
            }
            (7, Value::Number(x)) => {
                let f = x.as_f64().unwrap_or(0.0);
                let g = match s.int(0, 4) {
                    0 => -f,
                    1 => f * 2.0,
                    2 => f + 1.0,
                    3 => 0.0,
                    _ => f * 1e300,
                };
                *n_number(x) = serde_json::Number::from_f64(g)
                    .unwrap_or_else(|| serde_json::Number::from(0u8));
            }
            (_, n) => *n = odd_value(s),
        }
    }
    (applied, only_consistent)
}

fn n_number(x: &mut serde_json::Number) -> &mut serde_json::Number {
    x
}

/// Mutates JSON text (odd number tokens, truncation, spliced bytes, duplicate keys): returns
/// whether anything changed.
pub(crate) fn text_mutate(s: &mut Src<'_>, text: &mut Vec<u8>) -> bool {
    let mut any = false;
    for _ in 0..s.usize(0, 3) {
        if text.is_empty() {
            break;
        }
        any = true;
        let at = s.index(text.len());
        match s.int(0, 3) {
            0 => {
                // Replace the number starting at or after `at` by an odd token.
                let start = (at..text.len()).find(|&i| text[i].is_ascii_digit() || text[i] == b'-');
                if let Some(st) = start {
                    let end = (st + 1..text.len())
                        .find(|&i| !(text[i].is_ascii_digit() || b".eE+-".contains(&text[i])))
                        .unwrap_or(text.len());
                    let tok = s.pick(TOKENS).as_bytes().to_vec();
                    text.splice(st..end, tok);
                }
            }
            1 => text.truncate(at),
            2 => {
                let len = s.usize(1, 8);
                let b = s.bytes(len).to_vec();
                text.splice(at..at, b);
            }
            _ => {
                // A duplicate key right after the first brace.
                if let Some(p) = text.iter().position(|&c| c == b'{') {
                    let k = format!("\"{}\": 0, ", s.pick(KEYS));
                    text.splice(p + 1..p + 1, k.into_bytes());
                }
            }
        }
    }
    any
}

/// Caps the parser promises for every case it accepts.
fn check_caps(c: &Case) -> Result<(), Violation> {
    let n = c.n_elements();
    let data = match &c.objective {
        Objective::Quadratic { n, .. } => n.checked_mul(*n),
        Objective::Softmax { n, d, .. } | Objective::Mlp { n, d, .. } => n.checked_mul(*d),
    };
    let samples = match &c.objective {
        Objective::Quadratic { .. } => 0,
        Objective::Softmax { n, .. } | Objective::Mlp { n, .. } => *n,
    };
    // The work of one evaluation of the objective (`n²` for a quadratic), times the steps.
    let replay = match &c.objective {
        Objective::Quadratic { n, .. } => n.checked_mul(*n),
        Objective::Softmax { n: samples, .. } | Objective::Mlp { n: samples, .. } => {
            samples.checked_mul(n)
        }
    }
    .and_then(|e| e.checked_mul(c.steps));
    let ok = c.steps <= case::MAX_STEPS
        && n <= case::MAX_ELEMENTS
        && c.steps
            .checked_mul(n)
            .is_some_and(|x| x <= case::MAX_TRAJECTORY)
        && data.is_some_and(|x| x <= case::MAX_DATA)
        && samples <= case::MAX_SAMPLES
        && samples
            .checked_mul(n)
            .is_some_and(|x| x <= case::MAX_EVAL_COST)
        && replay.is_some_and(|x| x <= case::MAX_REPLAY_COST)
        && c.expected.loss.len() == c.steps
        && c.expected.params.len() == c.steps
        && c.expected.params.iter().all(|p| p.len() == n);
    if !ok {
        return Err(Violation::new(
            None,
            format!(
                "the parser accepted a case beyond its caps or inconsistent: steps {}, elements {n}",
                c.steps
            ),
        ));
    }
    Ok(())
}

fn judge(name: &str, bytes: &[u8], must_pass: bool) -> Result<(), Violation> {
    let parsed = case::parse_case(bytes);
    let r = run_bytes(name, bytes, &CoreBackend);
    match &r.verdict {
        Verdict::Error(e) if e.trim().is_empty() => {
            return Err(Violation::new(
                None,
                "an error verdict without a message".into(),
            ));
        }
        Verdict::Error(e) if parsed.is_ok() && e.starts_with("malformed case") => {
            return Err(Violation::new(
                None,
                format!("parse_case accepted the input but run_bytes called it malformed: {e}"),
            ));
        }
        _ => {}
    }
    if let Ok(c) = &parsed {
        check_caps(c)?;
        if c.steps.saturating_mul(c.n_elements()) <= 20_000 {
            let again = run_bytes(name, bytes, &CoreBackend);
            // Compare the rendered verdicts: a mismatch can carry NaN, which is never `==`.
            if again.line() != r.line() {
                return Err(Violation::new(
                    None,
                    format!(
                        "replay is not deterministic: `{}` then `{}`",
                        r.line(),
                        again.line()
                    ),
                ));
            }
        }
    }
    if must_pass && !r.passed() {
        return Err(Violation::new(
            None,
            format!(
                "a valid case (vendored, possibly shortened consistently) did not pass: {}",
                r.line()
            ),
        ));
    }
    Ok(())
}

/// The `case_json` check: see the module docs.
pub fn check(data: &[u8], policy: &Policy) {
    let r = if data.first() == Some(&0) {
        structured(&data[1..])
    } else {
        judge("fuzz", data, false)
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

fn structured(data: &[u8]) -> Result<(), Violation> {
    let mut s = Src::new(data);
    let (name, text) = BASE_CASES[s.index(BASE_CASES.len())];
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return Err(Violation::new(
            None,
            format!("vendored case {name} is not JSON"),
        ));
    };
    let (_applied, consistent) = mutate(&mut s, &mut v);
    let Ok(mut bytes) = serde_json::to_vec(&v) else {
        return Ok(());
    };
    let texted = text_mutate(&mut s, &mut bytes);
    if bytes.len() > MAX_MUTATED_BYTES {
        return Ok(());
    }
    judge(name, &bytes, consistent && !texted)
}
