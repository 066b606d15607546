//! The independent model of what a call must produce: the perturbation norm, GSAM's second
//! half on the canonical reduction, WASAM's fold owed, and the scale-safe arithmetic they use.

use super::*;

pub(crate) fn round_to(x: f64, is_f64: bool) -> f64 {
    if is_f64 { x } else { f64::from(x as f32) }
}

/// The fold a WASAM optimizer owes after `restore_with_gradient` (weights `1/(n_k + 1)` of the
/// averages started at step `steps − 1`), if any; `None` when not idle.
pub fn owed_fold(v: &sam_core::Wasam) -> Option<[Option<f64>; MAX_AVERAGES]> {
    let st = v.state().ok()?;
    if !st.pending_fold || st.steps == 0 {
        return None;
    }
    let t = st.steps - 1;
    let mut fold = [None; MAX_AVERAGES];
    for (k, &start) in v.swa_starts().iter().enumerate() {
        if t >= start {
            fold[k] = Some(1.0 / (st.counts[k] as f64 + 1.0));
        }
    }
    Some(fold)
}

/// The groups after a fold: `avg_k ← avg_k + (w − avg_k)·weight_k` (`ParamBuffer::fold_averages`),
/// rounded to the element type.
pub(crate) fn apply_fold(
    snaps: &[GroupSnap],
    fold: Option<&[Option<f64>; MAX_AVERAGES]>,
    is_f64: bool,
) -> Vec<GroupSnap> {
    let mut out = snaps.to_vec();
    let Some(fold) = fold else {
        return out;
    };
    for s in &mut out {
        for (k, weight) in fold.iter().enumerate() {
            let (Some(weight), Some(at)) = (weight, role_index(Slot::Average(k as u8))) else {
                continue;
            };
            if let Some(avg) = &mut s.slots[at] {
                for (a, w) in avg.iter_mut().zip(&s.w) {
                    *a = round_to(*a + (*w - *a) * weight, is_f64);
                }
            }
        }
    }
    out
}

/// Independent Euclidean norm, scaled by the largest magnitude (no overflow or underflow).
pub fn norm(v: &[f64]) -> f64 {
    let m = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    if m == 0.0 || !m.is_finite() {
        return m;
    }
    m * v.iter().map(|x| (x / m) * (x / m)).sum::<f64>().sqrt()
}

pub(crate) fn ulp(x: f64, is_f64: bool) -> f64 {
    if !x.is_finite() {
        return f64::INFINITY;
    }
    if is_f64 {
        let v = x.abs();
        f64::from_bits(v.to_bits() + 1) - v
    } else {
        let v = (x as f32).abs();
        f64::from(f32::from_bits(v.to_bits() + 1)) - f64::from(v)
    }
}

/// `x = f·2^e` with `f` in `[1, 2)` for a finite non-zero `x` (`(x, 0)` otherwise); exact.
pub(crate) fn split(x: f64) -> (f64, i32) {
    if x == 0.0 || !x.is_finite() {
        return (x, 0);
    }
    let (x, bias) = if x.abs() < f64::MIN_POSITIVE {
        (x * 2f64.powi(64), -64)
    } else {
        (x, 0)
    };
    let e = ((x.to_bits() >> 52) & 0x7ff) as i32 - 1023;
    let f = f64::from_bits((x.to_bits() & !(0x7ff << 52)) | (1023 << 52));
    (f, e + bias)
}

/// `m·2^e`, exact unless the result overflows or is subnormal (one rounding at the end).
pub(crate) fn ldexp(m: f64, e: i32) -> f64 {
    let mut x = m;
    let mut e = e;
    while e > 0 {
        let k = e.min(1000);
        x *= 2f64.powi(k);
        e -= k;
    }
    while e < 0 {
        let k = (-e).min(1000);
        // Only the last multiplication can leave the normal range (|m| ≥ 2^-1 here), so the
        // result is rounded once, unless it is 0 anyway.
        x *= 2f64.powi(-k);
        e += k;
    }
    x
}

/// `a/(t·ρ·2^unit)` from the parts of each factor: no intermediate overflows or underflows.
pub(crate) fn in_units(a: f64, t: f64, rho: f64, unit: i32) -> f64 {
    if a == 0.0 || !a.is_finite() {
        return if a == 0.0 { 0.0 } else { a };
    }
    let (fa, ea) = split(a);
    let (ft, et) = split(t);
    let (fr, er) = split(rho);
    ldexp(fa / (ft * fr), ea - et - er - unit)
}

pub(crate) fn t_of(p: &Option<PerturbParams>, w: f64) -> f64 {
    match p.and_then(|p| p.eta) {
        Some(eta) => w.abs() + eta,
        None => 1.0,
    }
}

/// Checks the state right after a successful first step: backup = clean weights, stash = clean
/// gradient, kept slots unchanged, and the perturbation norm of every group.
///
/// The bound, per group, in units of `ρ·2^k` with `k` chosen so that `expected` is of order 1
/// (exact power-of-two bookkeeping, so that subnormal perturbations and radii near `f64::MAX`
/// compare without an intermediate rounding): `|measured − expected| ≤
/// NORM_RTOL·expected + allowance`, where
/// `measured = ‖(w_p − w)/T‖` over elements with `T ≠ 0`, `expected = ρ_g·‖T_g⊙g_g‖/(n+ε)`
/// (`0` if `n = 0`) with the global `n` computed independently, and `allowance` is the norm of
/// `(ulp(w_p)/2 + ulp₆₄(w_p − w)/2)/T` (the rounding of `w + e` to the storage type and of the
/// subtraction). Groups where some `w_p` is not finite are not measurable and skipped.
pub fn check_perturbation(
    before: &[GroupSnap],
    now: &[GroupSnap],
    params: &[Option<PerturbParams>],
    stashes: bool,
    is_f64: bool,
) -> Result<(), Violation> {
    let mut all_tg = Vec::new();
    for ((b, p), _) in before.iter().zip(params).zip(now) {
        all_tg.extend(b.w.iter().zip(&b.g).map(|(w, g)| t_of(p, *w) * g));
    }
    if all_tg.iter().any(|x| !x.is_finite()) {
        return Ok(());
    }
    // Everything relative to the largest |T⊙g|, so that norms beyond f64::MAX still compare.
    let big = all_tg.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let n_rel = if big > 0.0 {
        norm(&all_tg.iter().map(|x| x / big).collect::<Vec<_>>())
    } else {
        0.0
    };
    for (i, ((b, a), p)) in before.iter().zip(now).zip(params).enumerate() {
        if let Some(bk) = a.slot(Slot::Backup) {
            if !same(bk, &b.w) {
                return Err(Violation::new(
                    None,
                    format!(
                        "first step: backup of group {i} is not the clean weights ({})",
                        first_diff(bk, &b.w)
                    ),
                ));
            }
        }
        if stashes {
            if let Some(st) = a.slot(Slot::Stash) {
                if !same(st, &b.g) {
                    return Err(Violation::new(
                        None,
                        format!(
                            "first step: stash of group {i} is not the clean gradient ({})",
                            first_diff(st, &b.g)
                        ),
                    ));
                }
            }
        }
        let Some(p) = p else { continue };
        if a.w.iter().any(|x| !x.is_finite()) || b.w.iter().any(|x| !x.is_finite()) {
            continue;
        }
        // Everything below is in units of `ρ·2^unit`, with `unit` chosen so that the expected
        // norm is of order 1: `ρ·‖T_g⊙g_g‖/(n+ε)` and every element's displacement are then
        // compared without an overflow or a subnormal intermediate (a group whose gradient is
        // tiny next to the global norm has a subnormal perturbation, and a radius near
        // f64::MAX must not overflow). Mantissas and exponents are carried separately.
        let tg: Vec<f64> =
            b.w.iter()
                .zip(&b.g)
                .map(|(w, g)| t_of(&Some(*p), *w) * g)
                .collect();
        let m_g = tg.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let n = n_rel * big;
        if p.rho == 0.0 {
            if !same(&a.w, &b.w) {
                return Err(Violation::new(
                    None,
                    format!(
                        "first step: rho = 0 moved weights of group {i} ({})",
                        first_diff(&a.w, &b.w)
                    ),
                ));
            }
            continue;
        }
        // expected/ρ = ‖T_g⊙g_g‖/(n + ε) = a_g·m_g/(big·(n_rel + ε/big)), or a_g·m_g/ε once
        // ε/big overflows (then ε ≫ n).
        let (expected, unit) = if m_g == 0.0 {
            (0.0, 0)
        } else {
            let a_g = norm(&tg.iter().map(|x| x / m_g).collect::<Vec<_>>());
            let (fm, em) = split(m_g);
            let inv = n_rel + p.eps / big;
            let (den, eden) = if inv.is_finite() {
                let (fb, eb) = split(big);
                let (fi, ei) = split(inv);
                (fb * fi, eb + ei)
            } else {
                split(p.eps)
            };
            (a_g * fm / den, em - eden)
        };
        let mut scaled = Vec::with_capacity(tg.len());
        let mut allow = Vec::with_capacity(tg.len());
        let mut measurable = true;
        for (wp, w) in a.w.iter().zip(&b.w) {
            let t = t_of(&Some(*p), *w);
            if t == 0.0 {
                if wp.to_bits() != w.to_bits() {
                    return Err(Violation::new(
                        None,
                        format!(
                            "first step: group {i} moved a weight whose T is 0 ({w:e} -> {wp:e})"
                        ),
                    ));
                }
                continue;
            }
            let d = wp - w;
            let x = in_units(d, t, p.rho, unit);
            let tol = (in_units(ulp(*wp, is_f64), t, p.rho, unit)
                + in_units(ulp(d, true), t, p.rho, unit))
                * 0.5;
            measurable &= x.is_finite() && !tol.is_nan();
            scaled.push(x);
            allow.push(tol);
        }
        if !measurable {
            continue;
        }
        let measured = norm(&scaled);
        let bound = NORM_RTOL * expected + norm(&allow);
        let within = (measured - expected).abs() <= bound;
        if !within || (!expected.is_finite() && expected != measured) {
            // The core computes the coefficient at a power-of-two scale s ≤ 2^997 of the norm; a
            // zero perturbation where ε·s overflows is a regression of the fixed HugeEpsFlush.
            let flushed = measured == 0.0 && big < 1e-140 && (p.eps * 2f64.powi(997)).is_infinite();
            // A zero perturbation where ρ/n is below the smallest normal f64 is a regression of
            // the fixed TinyRhoFlush.
            let tiny = measured == 0.0 && !flushed && p.rho / n < f64::MIN_POSITIVE;
            let finding = if flushed {
                Some(Finding::HugeEpsFlush)
            } else {
                tiny.then_some(Finding::TinyRhoFlush)
            };
            return Err(Violation::new(
                finding,
                format!(
                    "first step: group {i} perturbation norm {measured:e}·u, expected {expected:e}·u with u = rho·2^{unit} (rho {}, eps {}, n {n:e}, bound {bound:e}·u)",
                    p.rho, p.eps
                ),
            ));
        }
    }
    Ok(())
}

/// The predicted second half: `Ok(None)` applied, `Ok(Some(skip))`, or an error's name; with
/// the open finding a different outcome would be an instance of, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondPred {
    /// The outcome.
    pub outcome: Result<Option<SkipReason>, &'static str>,
    /// The known finding a different outcome is an instance of.
    pub finding: Option<Finding>,
}

impl SecondPred {
    pub(crate) fn of(outcome: Result<Option<SkipReason>, &'static str>) -> Self {
        SecondPred {
            outcome,
            finding: None,
        }
    }
}

/// The second-half prediction (`g1` the clean gradient as stored, `g2` the second one).
pub(crate) fn predict_second(
    j: &Judge,
    finish: Finish,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<SecondPred, Violation> {
    if finish == Finish::External && j.wsam_decoupled {
        return Ok(SecondPred::of(Err("InvalidGroups")));
    }
    if let Some((alpha, eps)) = j.gsam {
        return gsam_second(alpha, eps, g1, g2);
    }
    if j.checks_second && any_nonfinite(g2) {
        return Ok(SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond))));
    }
    Ok(SecondPred::of(Ok(None)))
}

/// The exact prediction of GSAM's second half (`gsam.rs`, `second`) for clean gradient `g1`
/// (the stash) and second gradient `g2`, per group.
///
/// The norms are those of `Engine::norms`: the canonical reduction of `sam_core::backend::kernel`
/// (which every backend reproduces bit for bit), repeated at power-of-two scales `s₂`, `s₁`
/// when a sum overflows or the values are tiny. Then, as documented: a skip if `g₂` (or the
/// stash) is not finite; `NormOverflow` unless `‖g₂‖` and `‖g₁‖` are finite; the cosine
/// `⟨g₁,g₂⟩/(‖g₂‖‖g₁‖ + ε)` evaluated at the reduction's scales, `dot_s/(n₂ₛ·n₁ₛ + ε·s₂·s₁)`
/// (`0` when that denominator is 0 or infinite); `a = 1` when `cos = 0`, else
/// `1 + α·cos·‖g₁‖/(‖g₂‖ + ε)`; `NormOverflow` if `a` is not finite; else applied. The norms and
/// the cosine are cross-checked against independent ones ([`norm`], a scaled dot product).
///
/// `ε·s₂·s₁` is `ε` times the (exact) product of the scales whenever that product is
/// representable, else `(ε·s₂)·s₁` (past finding [`Finding::GsamScaledEps`]: the core used to
/// multiply in turn always, overflowing or underflowing in between).
pub fn gsam_second(
    alpha: f64,
    eps: f64,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<SecondPred, Violation> {
    let reduce = |scales: [f64; 3]| {
        let spec = ReduceSpec {
            grad: true,
            stash: true,
            dot: true,
            scale_grad: scales[1],
            scale_stash: scales[2],
            ..ReduceSpec::FINITE_ONLY
        };
        g2.iter().zip(g1).fold(Reduction::ZERO, |acc, (g, s)| {
            acc.combine(kernel::reduce_flat(g.len(), &spec, |i| (0.0, g[i], s[i])))
        })
    };
    let mut r = reduce([1.0; 3]);
    let mut scales = [1.0; 3];
    if r.finite
        && (kernel::needs_rescale(r.perturb_sq, r.perturb_max)
            || kernel::needs_rescale(r.grad_sq, r.grad_max)
            || kernel::needs_rescale(r.stash_sq, r.stash_max)
            || !r.dot.is_finite())
    {
        scales = [
            kernel::scale_for(r.perturb_max),
            kernel::scale_for(r.grad_max),
            kernel::scale_for(r.stash_max),
        ];
        r = reduce(scales);
    }
    if !r.finite {
        return Ok(SecondPred::of(Ok(Some(SkipReason::NonFiniteSecond))));
    }
    let (grad_s, stash_s) = (r.grad_sq.sqrt(), r.stash_sq.sqrt());
    let (grad, stash) = (grad_s / scales[1], stash_s / scales[2]);
    if !(grad.is_finite() && stash.is_finite()) {
        return Ok(SecondPred::of(Err("NormOverflow")));
    }
    // Both scales are powers of two: ε times their product is one rounding whenever the product
    // is representable (a product of 0 or ∞ means scales on the same side of 1, and then the
    // two steps lose nothing a single one would keep). The two steps differ from it only when
    // they overflow, or underflow below the normal range (where a subnormal ε·s₂·s₁ next to
    // n₂ₛ·n₁ₛ ≥ 4e-47 does not change the cosine).
    let p = scales[1] * scales[2];
    let eps_s = if eps == 0.0 {
        0.0
    } else if p != 0.0 && p.is_finite() {
        eps * p
    } else {
        (eps * scales[1]) * scales[2]
    };
    let finding = None;
    let pred = |outcome| Ok(SecondPred { outcome, finding });
    let den = grad_s * stash_s + eps_s;
    let cos = if den > 0.0 && den.is_finite() {
        r.dot / den
    } else {
        0.0
    };
    // Products of the dot product below the subnormal range are lost (at most 2^-1074 each at
    // the reduction's scales). An infinite denominator is documented to mean that ε dwarfs the
    // norms: the cosine is then 0 by definition (it matters only through `a`, where
    // α·cos·‖g₁‖/(‖g₂‖+ε) is then below the rounding of 1 unless α is astronomical).
    let lost = if !den.is_finite() {
        f64::INFINITY
    } else if den > 0.0 {
        (g1.iter().map(Vec::len).sum::<usize>() as f64 + 1.0) * f64::from_bits(1) / den
    } else {
        0.0
    };
    cross_check(grad, stash, cos, lost, eps, g1, g2)?;
    let a = if cos == 0.0 {
        1.0
    } else {
        1.0 + alpha * cos * stash / (grad + eps)
    };
    if !a.is_finite() {
        return pred(Err("NormOverflow"));
    }
    pred(Ok(None))
}

/// GSAM's norms and cosine (as the core computes them) against independent ones: a coarse bound
/// (`1e-6` relative, an absolute `1e-300`, and `lost` for the cosine: the products lost below
/// the subnormal range) that catches a wrong reduction, scaling or formula, not rounding.
pub(crate) fn cross_check(
    grad: f64,
    stash: f64,
    cos: f64,
    lost: f64,
    eps: f64,
    g1: &[Vec<f64>],
    g2: &[Vec<f64>],
) -> Result<(), Violation> {
    const RTOL: f64 = 1e-6;
    const ATOL: f64 = 1e-300;
    let (a, b) = (g1.concat(), g2.concat());
    let close = |x: f64, y: f64, scale: f64| {
        !(x.is_finite() && y.is_finite() && scale.is_finite())
            || (x - y).abs() <= RTOL * scale + ATOL
    };
    let (n1, n2) = (norm(&a), norm(&b));
    let ma = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mb = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    // cos = ⟨a,b⟩/(‖a‖‖b‖ + ε), everything relative to the largest magnitudes (‖·‖ ≥ 1 there).
    let (cos_i, scale) = if ma > 0.0 && mb > 0.0 {
        let (d, s) = a.iter().zip(&b).fold((0.0, 0.0), |(d, s), (x, y)| {
            let p = (x / ma) * (y / mb);
            (d + p, s + p.abs())
        });
        let ra: Vec<f64> = a.iter().map(|x| x / ma).collect();
        let rb: Vec<f64> = b.iter().map(|y| y / mb).collect();
        // ε/(max|a|·max|b|) in logarithms (the product of the maxima may leave the range).
        let e = if eps == 0.0 {
            0.0
        } else {
            (eps.ln() - ma.ln() - mb.ln()).exp()
        };
        let den = norm(&ra) * norm(&rb) + e;
        (d / den, s / den)
    } else {
        (0.0, 0.0)
    };
    if close(grad, n2, n2) && close(stash, n1, n1) && close(cos, cos_i, scale + lost / RTOL) {
        return Ok(());
    }
    Err(Violation::new(
        None,
        format!(
            "GSAM second half: the reduction gives ‖g₂‖ = {grad:e}, ‖g₁‖ = {stash:e}, cos = {cos:e}; independently {n2:e}, {n1:e}, {cos_i:e} (Σ|g₁g₂|/(‖g₁‖‖g₂‖+ε) = {scale:e})"
        ),
    ))
}
