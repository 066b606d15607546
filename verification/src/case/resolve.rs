//! From the file as written ([`super::raw`]) to a resolved [`Case`]: the keys each kind and
//! variant takes, SCHEMA §5's defaults, §4's per-group option resolution, the caps, and every
//! cross-field rule (shapes, lengths, labels, group membership). Each rejection names the
//! field by the same path syntax serde_path_to_error uses for structural errors.

use std::collections::BTreeMap;

use sam_core::{AdamConfig, SgdConfig};

use super::raw::{
    RawCase, RawExpected, RawGroup, RawHyper, RawObjective, RawOptimizer, RawParam, RawSchedule,
    Uint,
};
use super::{
    BaseHyper, Case, CaseError, Dtype, Expected, GroupSpec, MAX_DATA, MAX_ELEMENTS, MAX_EVAL_COST,
    MAX_REPLAY_COST, MAX_SAMPLES, MAX_STEPS, MAX_TRAJECTORY, Objective, Param, Result, SCHEMA,
    ScheduleSpec, Tolerance, VariantSpec,
};

fn idx(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Refuses any given key not in `allowed`; `what` completes "unknown key 'k' …".
fn only<'k>(
    path: &str,
    mut given: impl Iterator<Item = &'k str>,
    allowed: &[&str],
    what: &str,
) -> Result<()> {
    match given.find(|k| !allowed.contains(k)) {
        Some(k) => Err(CaseError::new(path, format!("unknown key '{k}'{what}"))),
        None => Ok(()),
    }
}

fn required<T>(path: &str, key: &str, value: Option<T>) -> Result<T> {
    value.ok_or_else(|| CaseError::new(&format!("{path}.{key}"), "missing required field"))
}

fn to_usize(path: &str, Uint(u): Uint) -> Result<usize> {
    usize::try_from(u).map_err(|_| CaseError::new(path, format!("{u} is too large")))
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

fn check_len(path: &str, values: &[f64], len: usize) -> Result<()> {
    if values.len() == len {
        Ok(())
    } else {
        Err(CaseError::new(
            path,
            format!("has {} values, expected {len}", values.len()),
        ))
    }
}

/// Checks that `rows` is `n_rows × n_cols`.
fn check_matrix(path: &str, rows: &[Vec<f64>], n_rows: usize, n_cols: usize) -> Result<()> {
    if rows.len() != n_rows {
        return Err(CaseError::new(
            path,
            format!("has {} rows, expected {n_rows}", rows.len()),
        ));
    }
    match rows.iter().position(|r| r.len() != n_cols) {
        Some(i) => Err(CaseError::new(
            &idx(path, i),
            format!(
                "row has {} values, expected {n_cols}",
                rows.get(i).map_or(0, Vec::len)
            ),
        )),
        None => Ok(()),
    }
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

/// Resolves and checks a whole case, in the order of the file's sections.
pub(super) fn case(raw: RawCase) -> Result<Case> {
    if raw.schema != SCHEMA {
        return Err(CaseError::new(
            "schema",
            format!("unsupported schema '{}', expected '{SCHEMA}'", raw.schema),
        ));
    }
    let tolerance = tolerance(raw.tolerance.rtol, raw.tolerance.atol)?;
    let steps = to_usize("steps", raw.steps)?;
    cap("steps", "value", Some(steps), MAX_STEPS)?;

    let params = params(raw.params, raw.dtype)?;
    let n_elements = params.iter().map(|p| p.init.len()).sum::<usize>();
    cap(
        "expected.params",
        "steps × elements",
        steps.checked_mul(n_elements),
        MAX_TRAJECTORY,
    )?;
    let objective = objective(raw.objective, &params, raw.dtype)?;
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

    let (variant, base, rho, adaptive) = optimizer(raw.optimizer)?;
    let groups = groups(raw.param_groups, &params, &variant, base, rho, adaptive)?;
    let expected = expected(raw.expected, &variant, steps, n_elements)?;
    Ok(Case {
        name: raw.name,
        description: raw.description,
        reference: raw.reference,
        dtype: raw.dtype,
        tolerance,
        objective,
        params,
        groups,
        variant,
        steps,
        expected,
    })
}

fn tolerance(rtol: f64, atol: f64) -> Result<Tolerance> {
    for (key, v) in [("rtol", rtol), ("atol", atol)] {
        if v < 0.0 {
            return Err(CaseError::new(
                &format!("tolerance.{key}"),
                format!("must be >= 0, got {v:?}"),
            ));
        }
    }
    Ok(Tolerance { rtol, atol })
}

fn params(list: Vec<RawParam>, dtype: Dtype) -> Result<Vec<Param>> {
    if list.is_empty() {
        return Err(CaseError::new("params", "must list at least one param"));
    }
    let mut total = 0usize;
    let mut out: Vec<Param> = Vec::with_capacity(list.len());
    for (i, p) in list.into_iter().enumerate() {
        let path = idx("params", i);
        if out.iter().any(|q| q.name == p.name) {
            return Err(CaseError::new(
                &format!("{path}.name"),
                format!("duplicate param name '{}'", p.name),
            ));
        }
        let shape_path = format!("{path}.shape");
        let shape = p
            .shape
            .iter()
            .enumerate()
            .map(|(j, &d)| to_usize(&idx(&shape_path, j), d))
            .collect::<Result<Vec<usize>>>()?;
        let size = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let size = cap(&shape_path, "element count", size, MAX_ELEMENTS)?;
        total = cap(
            "params",
            "total element count",
            total.checked_add(size),
            MAX_ELEMENTS,
        )?;
        if p.init.len() != size {
            return Err(CaseError::new(
                &path,
                format!(
                    "init has {} values but shape {} needs {size}",
                    p.init.len(),
                    fmt_shape(&shape)
                ),
            ));
        }
        check_f32(&p.init, &format!("{path}.init"), dtype)?;
        out.push(Param {
            name: p.name,
            shape,
            init: p.init,
        });
    }
    Ok(out)
}

fn objective(o: RawObjective, params: &[Param], dtype: Dtype) -> Result<Objective> {
    const PATH: &str = "objective";
    let n_elements = params.iter().map(|p| p.init.len()).sum::<usize>();
    match o.kind.as_str() {
        "quadratic" => {
            only(
                PATH,
                o.given(),
                &["a", "b"],
                " for objective kind quadratic",
            )?;
            let rows = required(PATH, "a", o.a)?;
            let n = rows.len();
            cap("objective.a", "n×n", n.checked_mul(n), MAX_DATA)?;
            if n != n_elements {
                return Err(CaseError::new(
                    "objective.a",
                    format!("quadratic has n = {n} but the params have {n_elements} elements"),
                ));
            }
            check_matrix("objective.a", &rows, n, n)?;
            let at = |i: usize, j: usize| rows.get(i).and_then(|r| r.get(j));
            if let Some((i, j)) = (0..n)
                .flat_map(|i| (0..i).map(move |j| (i, j)))
                .find(|&(i, j)| at(i, j) != at(j, i))
            {
                return Err(CaseError::new(
                    "objective.a",
                    format!("not symmetric: a[{i}][{j}] != a[{j}][{i}]"),
                ));
            }
            let a = rows.concat();
            let b = required(PATH, "b", o.b)?;
            check_len("objective.b", &b, n)?;
            check_f32(&a, "objective.a", dtype)?;
            check_f32(&b, "objective.b", dtype)?;
            Ok(Objective::Quadratic { a, b, n })
        }
        "softmax" => classifier(o, false, params, dtype),
        "mlp" => classifier(o, true, params, dtype),
        other => Err(CaseError::new(
            "objective.kind",
            format!("unknown objective kind '{other}', expected quadratic, softmax or mlp"),
        )),
    }
}

/// The softmax and mlp objectives: data, labels and the params' names and shapes.
fn classifier(o: RawObjective, mlp: bool, params: &[Param], dtype: Dtype) -> Result<Objective> {
    const PATH: &str = "objective";
    let n_elements = params.iter().map(|p| p.init.len()).sum::<usize>();
    let kind = if mlp { "mlp" } else { "softmax" };
    let keys: &[&str] = if mlp {
        &["x", "y", "classes", "hidden"]
    } else {
        &["x", "y", "classes"]
    };
    only(
        PATH,
        o.given(),
        keys,
        &format!(" for objective kind {kind}"),
    )?;
    let rows = required(PATH, "x", o.x)?;
    let n = cap("objective.x", "sample count", Some(rows.len()), MAX_SAMPLES)?;
    let Some(d) = rows.first().map(Vec::len) else {
        return Err(CaseError::new(
            "objective.x",
            "must have at least one sample",
        ));
    };
    cap("objective.x", "n×d", n.checked_mul(d), MAX_DATA)?;
    cap(
        "objective.x",
        "samples × elements",
        n.checked_mul(n_elements),
        MAX_EVAL_COST,
    )?;
    let classes = to_usize("objective.classes", required(PATH, "classes", o.classes)?)?;
    let hidden = match mlp {
        true => to_usize("objective.hidden", required(PATH, "hidden", o.hidden)?)?,
        false => 0,
    };
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
    check_matrix("objective.x", &rows, n, d)?;
    let x = rows.concat();
    check_f32(&x, "objective.x", dtype)?;
    let labels = required(PATH, "y", o.y)?;
    if labels.len() != n {
        return Err(CaseError::new(
            "objective.y",
            format!("has {} labels, expected {n}", labels.len()),
        ));
    }
    let y = labels
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let path = idx("objective.y", i);
            match to_usize(&path, v)? {
                label if label < classes => Ok(label),
                label => Err(CaseError::new(
                    &path,
                    format!("label {label} out of range for {classes} classes"),
                )),
            }
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

/// Applies the base keys given in `o` to `h`. A key that is neither one the base kind takes
/// nor in `extra` is refused; `note` completes the message.
fn apply_base_keys(
    h: &mut BaseHyper,
    o: &RawHyper,
    path: &str,
    extra: &[&str],
    note: &str,
) -> Result<()> {
    let mut allowed: Vec<&str> = match h {
        BaseHyper::Sgd { .. } => vec!["lr", "momentum", "dampening", "weight_decay", "nesterov"],
        BaseHyper::Adam { .. } | BaseHyper::AdamW { .. } => {
            vec!["lr", "betas", "eps", "weight_decay", "amsgrad"]
        }
    };
    allowed.extend(extra);
    let kind = base_kind_name(h);
    only(
        path,
        o.given(),
        &allowed,
        &format!(" for base kind {kind}{note}"),
    )?;
    fn set<T: Copy>(dst: &mut T, v: Option<T>) {
        if let Some(v) = v {
            *dst = v;
        }
    }
    match h {
        BaseHyper::Sgd(c) => {
            set(&mut c.lr, o.lr);
            set(&mut c.momentum, o.momentum);
            set(&mut c.dampening, o.dampening);
            set(&mut c.weight_decay, o.weight_decay);
            set(&mut c.nesterov, o.nesterov);
        }
        BaseHyper::Adam(c) | BaseHyper::AdamW(c) => {
            set(&mut c.lr, o.lr);
            if let Some([beta1, beta2]) = o.betas {
                (c.beta1, c.beta2) = (beta1, beta2);
            }
            set(&mut c.eps, o.eps);
            set(&mut c.weight_decay, o.weight_decay);
            set(&mut c.amsgrad, o.amsgrad);
        }
    }
    Ok(())
}

/// `optimizer.base`: the kind's torch defaults (SCHEMA §5), then the given keys.
fn base(b: &RawHyper) -> Result<BaseHyper> {
    const PATH: &str = "optimizer.base";
    let kind = required(PATH, "kind", b.kind.as_deref())?;
    // torch's defaults; SGD has none for lr.
    let mut h = match kind {
        "sgd" => BaseHyper::Sgd(SgdConfig {
            lr: required(PATH, "lr", b.lr)?,
            ..SgdConfig::default()
        }),
        "adam" => BaseHyper::Adam(AdamConfig::default()),
        "adamw" => BaseHyper::AdamW(AdamConfig {
            weight_decay: 1e-2,
            ..AdamConfig::default()
        }),
        other => {
            return Err(CaseError::new(
                "optimizer.base.kind",
                format!("unknown base kind '{other}', expected sgd, adam or adamw"),
            ));
        }
    };
    apply_base_keys(&mut h, b, PATH, &["kind"], "")?;
    Ok(h)
}

fn schedule(s: &RawSchedule, path: &str) -> Result<ScheduleSpec> {
    let kind = s.kind.as_str();
    match kind {
        "linear" | "cosine" => {
            only(
                path,
                s.given(),
                &[
                    "t_max",
                    "max_value",
                    "min_value",
                    "init_value",
                    "warmup_steps",
                ],
                &format!(" for schedule kind {kind}"),
            )?;
            let t_max = required(path, "t_max", s.t_max)?;
            let max_value = required(path, "max_value", s.max_value)?;
            let min_value = s.min_value.unwrap_or(0.0);
            let init_value = s.init_value.unwrap_or(0.0);
            let warmup_steps = s.warmup_steps.unwrap_or(0.0);
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
            only(
                path,
                s.given(),
                &["max_lr", "min_lr", "max_value", "min_value"],
                " for schedule kind proportion",
            )?;
            Ok(ScheduleSpec::Proportion {
                max_lr: required(path, "max_lr", s.max_lr)?,
                min_lr: required(path, "min_lr", s.min_lr)?,
                max_value: required(path, "max_value", s.max_value)?,
                min_value: required(path, "min_value", s.min_value)?,
            })
        }
        other => Err(CaseError::new(
            &format!("{path}.kind"),
            format!("unknown schedule kind '{other}', expected linear, cosine or proportion"),
        )),
    }
}

/// Returns the variant, the base hyperparameters, and the optimizer-level rho and adaptive.
fn optimizer(o: RawOptimizer) -> Result<(VariantSpec, BaseHyper, f64, bool)> {
    const PATH: &str = "optimizer";
    let variant = o.variant.as_str();
    let keys: &[&str] = match variant {
        "sam" => &["rho", "adaptive"],
        "wasam" => &["rho", "adaptive", "swa_start"],
        "wsam" => &[
            "rho", "adaptive", "gamma", "decouple", "max_norm", "sam_eps",
        ],
        "gsam" => &[
            "alpha",
            "adaptive",
            "perturb_eps",
            "rho_schedule",
            "lr_schedule",
        ],
        other => {
            return Err(CaseError::new(
                "optimizer.variant",
                format!("unknown variant '{other}', expected sam, wasam, wsam or gsam"),
            ));
        }
    };
    only(PATH, o.given(), keys, &format!(" for variant {variant}"))?;
    let base = base(&o.base)?;
    let adaptive = o.adaptive.unwrap_or(false);
    let rho = match variant {
        "gsam" => 0.0,
        _ => o.rho.unwrap_or(0.05),
    };
    let spec = match variant {
        "wasam" => VariantSpec::Wasam {
            swa_start: required(PATH, "swa_start", o.swa_start)?.0,
        },
        "wsam" => VariantSpec::Wsam {
            gamma: o.gamma.unwrap_or(0.9),
            decouple: o.decouple.unwrap_or(true),
            max_norm: o.max_norm.flatten(),
            sam_eps: o.sam_eps.unwrap_or(1e-12),
        },
        "gsam" => {
            let rho_schedule = schedule(
                &required(PATH, "rho_schedule", o.rho_schedule)?,
                "optimizer.rho_schedule",
            )?;
            let lr_schedule = o
                .lr_schedule
                .flatten()
                .map(|s| schedule(&s, "optimizer.lr_schedule"))
                .transpose()?;
            if matches!(lr_schedule, Some(ScheduleSpec::Proportion { .. })) {
                return Err(CaseError::new(
                    "optimizer.lr_schedule",
                    "kind 'proportion' is only allowed for rho_schedule",
                ));
            }
            if matches!(rho_schedule, ScheduleSpec::Proportion { .. }) && lr_schedule.is_none() {
                return Err(CaseError::new(
                    "optimizer.rho_schedule",
                    "kind 'proportion' requires a non-null lr_schedule",
                ));
            }
            VariantSpec::Gsam {
                alpha: required(PATH, "alpha", o.alpha)?,
                adaptive,
                perturb_eps: o.perturb_eps.unwrap_or(1e-12),
                rho_schedule,
                lr_schedule,
            }
        }
        _ => VariantSpec::Sam,
    };
    Ok((spec, base, rho, adaptive))
}

fn groups(
    list: Vec<RawGroup>,
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
    for (g, group) in list.iter().enumerate() {
        let path = idx("param_groups", g);
        let mut members = Vec::with_capacity(group.params.len());
        for (j, name) in group.params.iter().enumerate() {
            let p = idx(&format!("{path}.params"), j);
            let Some(&i) = by_name.get(name.as_str()) else {
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
        if let Some(opts) = &group.options {
            let note = if gsam {
                " (gsam groups take base keys only)"
            } else {
                ""
            };
            let extra: &[&str] = if gsam { &[] } else { &["rho", "adaptive"] };
            let opts_path = format!("{path}.options");
            apply_base_keys(&mut spec.base, opts, &opts_path, extra, note)?;
            if !gsam {
                spec.rho = opts.rho.unwrap_or(rho);
                spec.adaptive = opts.adaptive.unwrap_or(adaptive);
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

fn expected(e: RawExpected, variant: &VariantSpec, steps: usize, n: usize) -> Result<Expected> {
    const PATH: &str = "expected";
    let (keys, name): (&[&str], &str) = match variant {
        VariantSpec::Sam => (&[], "sam"),
        VariantSpec::Wasam { .. } => (&["swa_params"], "wasam"),
        VariantSpec::Wsam { .. } => (&[], "wsam"),
        VariantSpec::Gsam { .. } => (&["lr", "rho"], "gsam"),
    };
    only(PATH, e.given(), keys, &format!(" for variant {name}"))?;
    check_len("expected.loss", &e.loss, steps)?;
    check_matrix("expected.params", &e.params, steps, n)?;
    let wasam = matches!(variant, VariantSpec::Wasam { .. });
    let gsam = matches!(variant, VariantSpec::Gsam { .. });
    let swa_params = match wasam {
        true => Some(required(PATH, "swa_params", e.swa_params)?),
        false => None,
    };
    if let Some(s) = &swa_params {
        check_len("expected.swa_params", s, n)?;
    }
    let (lr, rho) = match gsam {
        true => (
            Some(required(PATH, "lr", e.lr)?),
            Some(required(PATH, "rho", e.rho)?),
        ),
        false => (None, None),
    };
    for (key, v) in [("lr", &lr), ("rho", &rho)] {
        if let Some(v) = v {
            check_len(&format!("expected.{key}"), v, steps)?;
        }
    }
    Ok(Expected {
        loss: e.loss,
        params: e.params,
        swa_params,
        lr,
        rho,
    })
}
