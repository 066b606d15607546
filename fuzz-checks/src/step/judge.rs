//! Predicted outcomes (`Pred`) and the judgement of a call's effect on the buffers against
//! the prediction (unchanged after an error, finite in the finiteness class, the applied step).

use super::*;

/// What a call is predicted to return (first half of a step, `swap`, `update_averages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pred {
    /// `Error::WrongPhase`.
    WrongPhase,
    /// `Error::InvalidGroups`.
    InvalidGroups,
    /// `Error::InvalidHyperparameter`.
    InvalidHyper,
    /// `Error::Backend`.
    Backend,
    /// `Error::NonFiniteGradient` (or a skip for the closure step and the base optimizer).
    NonFinite,
    /// `Error::NormOverflow`.
    NormOverflow,
    /// Success.
    Ok,
    /// Any other error (never predicted).
    Other,
}

/// The predicted start of a call that runs `Engine::begin` (a step's first half, `swap`,
/// `update_averages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct First {
    /// The outcome.
    pub pred: Pred,
    /// How many of the active groups (in order) the call prepares before it returns.
    pub prepares: usize,
    /// Whether one of them is prepared for another slot layout than the one it held.
    pub reinterpret: bool,
}

impl First {
    /// A refusal before `Engine::begin`.
    pub(crate) fn refused(pred: Pred) -> Self {
        First {
            pred,
            prepares: 0,
            reinterpret: false,
        }
    }

    /// Whether the call gets past `Engine::begin`, which then records the groups.
    pub(crate) fn begun(&self) -> bool {
        matches!(self.pred, Pred::Ok | Pred::NonFinite | Pred::NormOverflow)
    }
}

pub(crate) fn kind<E>(e: &Error<E>) -> Pred {
    match e {
        Error::WrongPhase { .. } => Pred::WrongPhase,
        Error::InvalidGroups { .. } => Pred::InvalidGroups,
        Error::InvalidHyperparameter { .. } => Pred::InvalidHyper,
        Error::Backend(_) => Pred::Backend,
        Error::NonFiniteGradient => Pred::NonFinite,
        Error::NormOverflow => Pred::NormOverflow,
        _ => Pred::Other,
    }
}

pub(crate) fn err_name<E>(e: &Error<E>) -> &'static str {
    match e {
        Error::WrongPhase { .. } => "WrongPhase",
        Error::InvalidGroups { .. } => "InvalidGroups",
        Error::InvalidHyperparameter { .. } => "InvalidHyperparameter",
        Error::Backend(_) => "Backend",
        Error::NonFiniteGradient => "NonFiniteGradient",
        Error::NormOverflow => "NormOverflow",
        Error::InvalidState { .. } => "InvalidState",
        _ => "other",
    }
}

/// Weights and base-state/average slots of `now` equal `before` bit for bit (roles present in
/// both).
pub(crate) fn check_unchanged(
    before: &[GroupSnap],
    now: &[GroupSnap],
    what: &str,
) -> Result<(), Violation> {
    check_same(before, now, what, true, None)
}

/// Like [`check_unchanged`]; `weights: false` leaves the weights out, `except` one slot role.
pub(crate) fn check_same(
    before: &[GroupSnap],
    now: &[GroupSnap],
    what: &str,
    weights: bool,
    except: Option<Slot>,
) -> Result<(), Violation> {
    if before.len() != now.len() {
        return Err(Violation::new(
            None,
            format!(
                "{what}: {} groups before, {} after",
                before.len(),
                now.len()
            ),
        ));
    }
    for (i, (b, n)) in before.iter().zip(now).enumerate() {
        if weights && !same(&b.w, &n.w) {
            return Err(Violation::new(
                None,
                format!(
                    "{what}: weights of group {i} changed ({})",
                    first_diff(&b.w, &n.w)
                ),
            ));
        }
        for (k, role) in Slot::ALL.iter().enumerate() {
            if !kept(*role) || except == Some(*role) {
                continue;
            }
            if let (Some(x), Some(y)) = (&b.slots[k], &n.slots[k]) {
                if !same(x, y) {
                    return Err(Violation::new(
                        None,
                        format!(
                            "{what}: slot {role:?} of group {i} changed ({})",
                            first_diff(x, y)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every weight (and gradient, with `grads_too`) and every slot that holds state is finite. The
/// scratch slots (the backup; the stash unless `keeps_stash`) are not judged: a step that does
/// not climb leaves them as they were, which after a checkpoint round trip is whatever fresh
/// memory held (they are checked where they are written, in [`check_perturbation`]).
pub(crate) fn check_finite(
    now: &[GroupSnap],
    grads_too: bool,
    keeps_stash: bool,
    what: &str,
) -> Result<(), Violation> {
    for (i, n) in now.iter().enumerate() {
        if let Some(j) = n.w.iter().position(|x| !x.is_finite()) {
            return Err(Violation::new(
                None,
                format!(
                    "{what}: finite-class input gave weight {j} of group {i} = {}",
                    n.w[j]
                ),
            ));
        }
        if grads_too {
            if let Some(j) = n.g.iter().position(|x| !x.is_finite()) {
                return Err(Violation::new(
                    None,
                    format!(
                        "{what}: finite-class input gave gradient {j} of group {i} = {}",
                        n.g[j]
                    ),
                ));
            }
        }
        for (k, s) in n.slots.iter().enumerate() {
            let role = Slot::ALL[k];
            if role == Slot::Backup || (role == Slot::Stash && !keeps_stash) {
                continue;
            }
            if let Some(j) = s
                .as_ref()
                .and_then(|s| s.iter().position(|x| !x.is_finite()))
            {
                return Err(Violation::new(
                    None,
                    format!(
                        "{what}: finite-class input gave slot {:?}[{j}] of group {i} non-finite",
                        Slot::ALL[k]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// What a call did, in words both backends must agree on.
pub type Outcome = String;

pub(crate) fn check_inactive(before: &[GroupSnap], now: &[GroupSnap]) -> Result<(), Violation> {
    let bitwise = |a: &GroupSnap, b: &GroupSnap| {
        same(&a.w, &b.w)
            && same(&a.g, &b.g)
            && a.slots.iter().zip(&b.slots).all(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => same(x, y),
                (None, None) => true,
                _ => false,
            })
    };
    if before.len() != now.len() || !before.iter().zip(now).all(|(a, b)| bitwise(a, b)) {
        return Err(Violation::new(
            None,
            "a group not passed to the call changed".into(),
        ));
    }
    Ok(())
}

/// Everything a step-like call needs to be judged.
pub(crate) struct Judge {
    /// The predicted first half.
    pub(crate) first: First,
    /// The WASAM fold owed, applied once the first half passes its checks.
    pub(crate) fold: Option<[Option<f64>; MAX_AVERAGES]>,
    /// GSAM's `(α, ε)`.
    pub(crate) gsam: Option<(f64, f64)>,
    pub(crate) class: bool,
    pub(crate) lr_zero: bool,
    pub(crate) checks_second: bool,
    pub(crate) stashes: bool,
    pub(crate) wsam_decoupled: bool,
    pub(crate) is_sam_like: bool,
    pub(crate) is_f64: bool,
    /// The step climbs (two gradients); else it takes the gradient in the buffers once.
    pub(crate) climbs: bool,
    /// The stash carries state between steps (LookSAM's stored direction).
    pub(crate) keeps_stash: bool,
    /// The step is a LookSAM refresh.
    pub(crate) looksam_refresh: bool,
}

impl Judge {
    pub(crate) fn pred(&self) -> Pred {
        self.first.pred
    }
}

pub(crate) fn judge<B: Inspect, O: Drawn>(w: &World<B, O>, m: &Model, g1: &[Vec<f64>]) -> Judge {
    let first = w.predict_first(m, g1);
    let climbs = w.opt.climbs();
    Judge {
        first,
        // Only a climbing first half applies the fold (a plain step of `Interval` leaves it owed).
        fold: w.opt.wasam().filter(|_| climbs).and_then(owed_fold),
        gsam: w
            .opt
            .gsam()
            .map(|v| (v.config().alpha, v.config().perturbation.eps)),
        // A call that reinterprets slot memory leaves the class (its base state is garbage).
        class: w.class_pre(m) && !first.reinterpret,
        lr_zero: w.act().iter().all(|g| w.opt.lr_used(&g.options) == 0.0),
        checks_second: w.opt.checks_second(),
        stashes: w.opt.stashes(),
        wsam_decoupled: w.opt.wsam().is_some_and(|v| v.config().decouple),
        is_sam_like: w.opt.is_sam_like(),
        is_f64: w.f64,
        climbs,
        keeps_stash: w.opt.keeps_stash(),
        looksam_refresh: w.opt.looksam_refresh(),
    }
}

/// The gradient storage holds `want` bit for bit: the optimizers read it only inside their
/// passes and never zero or write it (except `restore_with_gradient`, by request), which is
/// what gradient accumulation relies on.
pub(crate) fn check_grads(
    now: &[GroupSnap],
    want: &[Vec<f64>],
    what: &str,
) -> Result<(), Violation> {
    for (i, (n, g)) in now.iter().zip(want).enumerate() {
        if !same(&n.g, g) {
            return Err(Violation::new(
                None,
                format!(
                    "{what}: the optimizer wrote the gradient storage of group {i} ({})",
                    first_diff(&n.g, g)
                ),
            ));
        }
    }
    Ok(())
}

/// The persistent stash (LookSAM's stored direction) after a step that was not applied, or did
/// not climb: as before the call, or the clean gradient `g1` once a climbing first half passed
/// its checks (a skipped or refused refresh leaves it there, as `LookSam` documents).
pub(crate) fn check_stash(
    j: &Judge,
    before: &[GroupSnap],
    now: &[GroupSnap],
    g1: &[Vec<f64>],
    climbed: bool,
    what: &str,
) -> Result<(), Violation> {
    if !j.keeps_stash {
        return Ok(());
    }
    for (i, (b, n)) in before.iter().zip(now).enumerate() {
        let want = if climbed {
            Some(&g1[i][..])
        } else {
            b.slot(Slot::Stash)
        };
        if let (Some(want), Some(got)) = (want, n.slot(Slot::Stash)) {
            if !same(want, got) {
                return Err(Violation::new(
                    None,
                    format!(
                        "{what}: the stored direction of group {i} is not {} ({})",
                        if climbed {
                            "the clean gradient"
                        } else {
                            "as before"
                        },
                        first_diff(got, want)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Judges an applied step: in the finiteness class, every weight and slot (and, for an
/// external finish, the written gradient) is finite, and lr = 0 everywhere is the identity.
/// Returns whether the step was in the class.
pub(crate) fn judge_applied(
    j: &Judge,
    before: &[GroupSnap],
    now: &[GroupSnap],
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
    external: bool,
    what: &str,
) -> Result<bool, Violation> {
    let class = j.class && all_within(g1, BOUND_VALUE) && all_within(g2, BOUND_VALUE);
    if class {
        check_finite(now, external, j.keeps_stash, what)?;
        if j.lr_zero && !external {
            for (i, (b, n)) in before.iter().zip(now).enumerate() {
                if !same(&b.w, &n.w) {
                    return Err(Violation::new(
                        None,
                        format!(
                            "{what} with lr = 0 changed weights of group {i} ({})",
                            first_diff(&b.w, &n.w)
                        ),
                    ));
                }
            }
        }
    }
    Ok(class)
}

/// Judges the error (or clean skip) of a first half (first step, closure step, base step)
/// against the prediction: the predicted kind, and nothing changed (the averages included).
pub(crate) fn judge_first_error(
    j: &Judge,
    got: Pred,
    name: &str,
    before: &[GroupSnap],
    now: &[GroupSnap],
    what: &str,
) -> Result<(), Violation> {
    if got != j.pred() {
        return Err(Violation::new(
            None,
            format!("{what} returned {name}, predicted {:?}", j.pred()),
        ));
    }
    let what = format!("{what} ({name})");
    check_unchanged(before, now, &what)?;
    check_stash(j, before, now, &[], false, &what)
}
