//! Command-line pieces shared by the demos (sam-ndarray's `digits`, sam-candle's
//! `digits_cnn`): splitting `--flag value` / `--flag=value`, checked numbers, the optimizer
//! list.

use std::ffi::OsString;

use crate::optimizers::Kind;

/// One option and its value, if it takes one.
pub struct Arg {
    /// The option (`--epochs`, `-h`, …).
    pub flag: String,
    /// Its value, for an option that takes one.
    pub value_os: Option<OsString>,
}

impl Arg {
    /// The value as UTF-8.
    pub fn value(&self) -> Result<String, String> {
        self.value_os
            .clone()
            .ok_or_else(|| format!("{} needs a value", self.flag))?
            .into_string()
            .map_err(|v| format!("{}: {v:?} is not valid UTF-8", self.flag))
    }
}

/// The next option of `args`: `switches` take no value, `value_flags` take one (as the next
/// argument or after `=`); anything else is an error.
pub fn next_arg(
    args: &mut impl Iterator<Item = OsString>,
    switches: &[&str],
    value_flags: &[&str],
) -> Option<Result<Arg, String>> {
    let raw = args.next()?;
    Some((|| {
        let Some(arg) = raw.to_str() else {
            return Err(format!("unexpected argument {raw:?} (not valid UTF-8)"));
        };
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(OsString::from(v))),
            _ => (arg.to_string(), None),
        };
        let takes_value = match flag.as_str() {
            f if switches.contains(&f) => false,
            f if value_flags.contains(&f) => true,
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other => {
                return Err(format!(
                    "unexpected argument {other:?} (options start with --)"
                ));
            }
        };
        let value_os = match (takes_value, inline) {
            (true, Some(v)) => Some(v),
            (true, None) => Some(args.next().ok_or_else(|| format!("{flag} needs a value"))?),
            (false, Some(_)) => return Err(format!("{flag} takes no value")),
            (false, None) => None,
        };
        Ok(Arg { flag, value_os })
    })())
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse::<T>()
        .map_err(|_| format!("{flag}: cannot parse {v:?} as a number"))
}

/// A finite number in `[lo, hi]` (`[lo, hi)` when `hi_open`; `hi = f64::MAX` reads `inf`).
pub fn float(flag: &str, v: &str, lo: f64, hi: f64, hi_open: bool) -> Result<f64, String> {
    let x: f64 = num(flag, v)?;
    let ok = x.is_finite() && x >= lo && if hi_open { x < hi } else { x <= hi };
    if !ok {
        let close = if hi_open { ")" } else { "]" };
        let hi = if hi == f64::MAX {
            "inf".to_string()
        } else {
            hi.to_string()
        };
        return Err(format!(
            "{flag}: {v} is out of range: expected a number in [{lo}, {hi}{close}"
        ));
    }
    Ok(x)
}

/// A whole number in `lo..=hi`.
pub fn count(flag: &str, v: &str, lo: usize, hi: usize) -> Result<usize, String> {
    let x: usize = v
        .parse()
        .map_err(|_| format!("{flag}: expected a whole number, found {v:?}"))?;
    if x < lo || x > hi {
        return Err(format!("{flag}: {x} is out of range: expected {lo}..={hi}"));
    }
    Ok(x)
}

/// A comma-separated list of optimizer names, deduplicated, in table order.
pub fn optimizers(flag: &str, v: &str) -> Result<Vec<Kind>, String> {
    let mut list = Vec::new();
    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let k = Kind::parse(name).ok_or_else(|| {
            format!(
                "{flag}: unknown optimizer {name:?} (expected sgd, sam, asam, gsam, wsam, wasam, sam-every-k, looksam)"
            )
        })?;
        if !list.contains(&k) {
            list.push(k);
        }
    }
    if list.is_empty() {
        return Err(format!("{flag}: the list is empty"));
    }
    list.sort_by_key(|k| Kind::ALL.iter().position(|a| a == k));
    Ok(list)
}
