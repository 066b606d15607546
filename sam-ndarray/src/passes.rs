//! The element-wise passes: fused loops around `sam_core::backend::kernel`'s element functions.
//!
//! Each pass is dispatched once per span on the discriminants of its specification (which
//! operands exist, which base rule), so that the loop itself is a straight-line call of the
//! kernel function with a specification whose discriminants are compile-time constants: the
//! compiler removes the per-element `match`es and can vectorise. The per-element operations
//! are exactly the kernel's, so the results are bit-identical to the reference backend.

use sam_core::backend::kernel;
use sam_core::backend::{
    AdamStep, AverageFold, BaseStep, GradMix, MAX_AVERAGES, PerturbSpec, PostMix, Real, SgdStep,
    UpdateSpec, Weighting,
};

use crate::span::{AVG0, BACKUP, NSLOTS, STASH, STATE0, Span};

/// Elements per chunk when averages are folded in the same pass (the chunk's new weights are
/// still in L1 when they are folded).
const FOLD_CHUNK: usize = 512;

/// Takes a slot range out of a span (empty when absent; the caller checked presence).
#[inline(always)]
fn take<'a, T>(s: &mut Option<&'a mut [T]>) -> &'a mut [T] {
    s.take().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The slot roles each pass reads or writes.

/// A role mask with the given roles set.
fn mask(roles: &[usize]) -> [bool; NSLOTS] {
    let mut m = [false; NSLOTS];
    for &r in roles {
        m[r] = true;
    }
    m
}

/// The roles the perturb pass uses.
pub(crate) fn perturb_needs(spec: &PerturbSpec) -> [bool; NSLOTS] {
    if spec.stash {
        mask(&[BACKUP, STASH])
    } else {
        mask(&[BACKUP])
    }
}

/// The roles the restore pass uses.
pub(crate) fn restore_needs() -> [bool; NSLOTS] {
    mask(&[BACKUP])
}

/// The roles the update pass uses.
pub(crate) fn update_needs(spec: &UpdateSpec) -> [bool; NSLOTS] {
    let mut need = [false; NSLOTS];
    need[BACKUP] = spec.restore;
    need[STASH] = spec.reads_stash();
    for k in 0..spec.base.state_slots().min(3) {
        need[STATE0 + k] = true;
    }
    for (k, w) in spec.average.weights.iter().enumerate() {
        need[AVG0 + k] = w.is_some();
    }
    need
}

/// The roles a fold of the averages uses.
pub(crate) fn fold_needs(fold: &AverageFold) -> [bool; NSLOTS] {
    let mut need = [false; NSLOTS];
    for (k, w) in fold.weights.iter().enumerate() {
        need[AVG0 + k] = w.is_some();
    }
    need
}

// ---------------------------------------------------------------------------------------------
// perturb

/// The perturb pass on one span.
pub(crate) fn perturb<T: Real, G: Real>(spec: &PerturbSpec, span: Span<'_, T, G>) {
    match (spec.stash, spec.weighting) {
        (false, Weighting::Plain) => perturb_loop::<T, G, false, false>(spec, 0.0, span),
        (true, Weighting::Plain) => perturb_loop::<T, G, true, false>(spec, 0.0, span),
        (false, Weighting::Adaptive { eta }) => perturb_loop::<T, G, false, true>(spec, eta, span),
        (true, Weighting::Adaptive { eta }) => perturb_loop::<T, G, true, true>(spec, eta, span),
    }
}

#[inline(never)]
fn perturb_loop<T: Real, G: Real, const S: bool, const A: bool>(
    spec: &PerturbSpec,
    eta: f64,
    mut span: Span<'_, T, G>,
) {
    // The same spec with constant discriminants (its scalars unchanged).
    let spec = PerturbSpec {
        stash: S,
        weighting: if A {
            Weighting::Adaptive { eta }
        } else {
            Weighting::Plain
        },
        ..*spec
    };
    let w = span.w;
    let n = w.len();
    let g = &span.g[..n];
    let backup = &mut take(&mut span.s[BACKUP])[..n];
    let stash = &mut take(&mut span.s[STASH])[..if S { n } else { 0 }];
    for i in 0..n {
        let wi = w[i];
        let gi = g[i];
        backup[i] = wi;
        if S {
            stash[i] = T::from_f64(kernel::stashed(&spec, gi.to_f64()));
        }
        w[i] = T::from_f64(kernel::perturb(&spec, wi.to_f64(), gi.to_f64()));
    }
}

// ---------------------------------------------------------------------------------------------
// restore, swap, fold

/// Copies the backup into the weights.
pub(crate) fn restore<T: Real, G: Real>(mut span: Span<'_, T, G>) {
    let b = take(&mut span.s[BACKUP]);
    span.w.copy_from_slice(&b[..span.w.len()]);
}

/// Exchanges the weights with average `k`.
pub(crate) fn swap<T: Real, G: Real>(k: usize, mut span: Span<'_, T, G>) {
    let a = take(&mut span.s[AVG0 + k]);
    let n = span.w.len();
    span.w.swap_with_slice(&mut a[..n]);
}

/// `avg ← fold(avg, w, weight)` element by element.
#[inline(always)]
fn fold_loop<T: Real>(avg: &mut [T], w: &[T], weight: f64) {
    for (a, x) in avg.iter_mut().zip(w) {
        *a = T::from_f64(kernel::fold(a.to_f64(), x.to_f64(), weight));
    }
}

/// Folds the weights into the averages named in `fold`.
pub(crate) fn fold<T: Real, G: Real>(fold: &AverageFold, mut span: Span<'_, T, G>) {
    for (k, wgt) in fold.weights.iter().enumerate() {
        if let Some(wgt) = *wgt {
            let a = take(&mut span.s[AVG0 + k]);
            fold_loop(a, span.w, wgt);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// update (restore-and-step)

/// The runtime scalars of an [`UpdateSpec`], split from its discriminants.
#[derive(Clone, Copy)]
pub(crate) struct UpdateScalars {
    restore: bool,
    mix: Option<(f64, f64)>,
    post: Option<(f64, f64)>,
    restash: Option<PostMix>,
    base: u8,
    sgd: SgdStep,
    adam: AdamStep,
    average: [Option<f64>; MAX_AVERAGES],
    unscale: f64,
}

/// Base-rule kinds (each with a fixed number of state slots).
const EXTERNAL: u8 = 0;
const SGD_PLAIN: u8 = 1;
const SGD_MOMENTUM: u8 = 2;
const ADAM: u8 = 3;
const ADAM_AMSGRAD: u8 = 4;
/// SGD with momentum and its flags as constants: `SGD_FLAGS | first | nesterov << 1 |
/// (weight_decay ≠ 0) << 2` (used for the common `GradMix::Current`, no post-correction).
const SGD_FLAGS: u8 = 8;

const NO_SGD: SgdStep = SgdStep {
    neg_lr: 0.0,
    weight_decay: 0.0,
    momentum: 0.0,
    one_minus_dampening: 1.0,
    nesterov: false,
    first: false,
};
const NO_ADAM: AdamStep = AdamStep {
    decay: 1.0,
    l2: 0.0,
    one_minus_beta1: 0.0,
    beta2: 0.0,
    one_minus_beta2: 0.0,
    bc2_sqrt: 1.0,
    neg_step_size: 0.0,
    eps: 0.0,
    amsgrad: false,
};

impl UpdateScalars {
    /// Splits a specification.
    pub(crate) fn new(spec: &UpdateSpec) -> Self {
        let (base, sgd, adam) = match spec.base {
            BaseStep::External => (EXTERNAL, NO_SGD, NO_ADAM),
            // Same test as `BaseStep::state_slots`.
            BaseStep::Sgd(k) if k.momentum != 0.0 => (SGD_MOMENTUM, k, NO_ADAM),
            BaseStep::Sgd(k) => (SGD_PLAIN, k, NO_ADAM),
            BaseStep::Adam(a) if a.amsgrad => (ADAM_AMSGRAD, NO_SGD, a),
            BaseStep::Adam(a) => (ADAM, NO_SGD, a),
        };
        UpdateScalars {
            restore: spec.restore,
            mix: match spec.grad {
                GradMix::Current => None,
                GradMix::Mix { a, b } => Some((a, b)),
            },
            post: spec.post.map(|p| (p.a, p.b)),
            restash: spec.restash,
            base,
            sgd,
            adam,
            average: spec.average.weights,
            unscale: spec.unscale,
        }
    }

    /// The specification again, with the discriminants given as constants. For `SGD_PLAIN`
    /// the momentum is written as the literal `0.0` (it compares equal to the original, the
    /// only way `SgdStep::apply` uses it when it is zero); everything else is the original.
    #[inline(always)]
    fn spec<const R: bool, const M: bool, const P: bool, const BK: u8>(&self) -> UpdateSpec {
        let (ma, mb) = self.mix.unwrap_or((0.0, 0.0));
        let (pa, pb) = self.post.unwrap_or((0.0, 0.0));
        UpdateSpec {
            restore: R,
            grad: if M {
                GradMix::Mix { a: ma, b: mb }
            } else {
                GradMix::Current
            },
            base: match BK {
                EXTERNAL => BaseStep::External,
                SGD_PLAIN => BaseStep::Sgd(SgdStep {
                    momentum: 0.0,
                    ..self.sgd
                }),
                SGD_MOMENTUM => BaseStep::Sgd(self.sgd),
                // A zero weight decay is written as the literal 0.0 (it compares equal: the
                // only way `SgdStep::apply` uses it then).
                SGD_FLAGS.. => BaseStep::Sgd(SgdStep {
                    first: BK & 1 != 0,
                    nesterov: BK & 2 != 0,
                    weight_decay: if BK & 4 != 0 {
                        self.sgd.weight_decay
                    } else {
                        0.0
                    },
                    ..self.sgd
                }),
                ADAM => BaseStep::Adam(AdamStep {
                    amsgrad: false,
                    ..self.adam
                }),
                _ => BaseStep::Adam(AdamStep {
                    amsgrad: true,
                    ..self.adam
                }),
            },
            post: if P {
                Some(PostMix { a: pa, b: pb })
            } else {
                None
            },
            // Written by `update_span` around the loop, never by the element function.
            restash: None,
            average: AverageFold::NONE,
            unscale: self.unscale,
        }
    }
}

/// The update pass on one span.
pub(crate) fn update<T: Real, G: Real>(k: &UpdateScalars, span: Span<'_, T, G>) {
    if k.base == SGD_MOMENTUM && k.mix.is_none() && k.post.is_none() {
        let flags = u8::from(k.sgd.first)
            | u8::from(k.sgd.nesterov) << 1
            | u8::from(k.sgd.weight_decay != 0.0) << 2;
        return match flags {
            0 => update_r::<T, G, { SGD_FLAGS }>(k, span),
            1 => update_r::<T, G, { SGD_FLAGS | 1 }>(k, span),
            2 => update_r::<T, G, { SGD_FLAGS | 2 }>(k, span),
            3 => update_r::<T, G, { SGD_FLAGS | 3 }>(k, span),
            4 => update_r::<T, G, { SGD_FLAGS | 4 }>(k, span),
            5 => update_r::<T, G, { SGD_FLAGS | 5 }>(k, span),
            6 => update_r::<T, G, { SGD_FLAGS | 6 }>(k, span),
            _ => update_r::<T, G, { SGD_FLAGS | 7 }>(k, span),
        };
    }
    match k.base {
        EXTERNAL => update_rmp::<T, G, EXTERNAL>(k, span),
        SGD_PLAIN => update_rmp::<T, G, SGD_PLAIN>(k, span),
        SGD_MOMENTUM => update_rmp::<T, G, SGD_MOMENTUM>(k, span),
        ADAM => update_rmp::<T, G, ADAM>(k, span),
        _ => update_rmp::<T, G, ADAM_AMSGRAD>(k, span),
    }
}

fn update_rmp<T: Real, G: Real, const BK: u8>(k: &UpdateScalars, span: Span<'_, T, G>) {
    match (k.restore, k.mix.is_some(), k.post.is_some()) {
        (false, false, false) => update_span::<T, G, false, false, false, BK>(k, span),
        (false, false, true) => update_span::<T, G, false, false, true, BK>(k, span),
        (false, true, false) => update_span::<T, G, false, true, false, BK>(k, span),
        (false, true, true) => update_span::<T, G, false, true, true, BK>(k, span),
        (true, false, false) => update_span::<T, G, true, false, false, BK>(k, span),
        (true, false, true) => update_span::<T, G, true, false, true, BK>(k, span),
        (true, true, false) => update_span::<T, G, true, true, false, BK>(k, span),
        (true, true, true) => update_span::<T, G, true, true, true, BK>(k, span),
    }
}

fn update_r<T: Real, G: Real, const BK: u8>(k: &UpdateScalars, span: Span<'_, T, G>) {
    if k.restore {
        update_span::<T, G, true, false, false, BK>(k, span)
    } else {
        update_span::<T, G, false, false, false, BK>(k, span)
    }
}

/// Number of state slots of a base-rule kind.
const fn state_count(bk: u8) -> usize {
    match bk {
        EXTERNAL | SGD_PLAIN => 0,
        SGD_MOMENTUM | SGD_FLAGS.. => 1,
        ADAM => 2,
        _ => 3,
    }
}

#[inline(never)]
fn update_span<T: Real, G: Real, const R: bool, const M: bool, const P: bool, const BK: u8>(
    k: &UpdateScalars,
    mut span: Span<'_, T, G>,
) {
    let spec = k.spec::<R, M, P, BK>();
    let w = span.w;
    let g = span.g;
    let backup = take(&mut span.s[BACKUP]);
    let stash = take(&mut span.s[STASH]);
    let s0 = take(&mut span.s[STATE0]);
    let s1 = take(&mut span.s[STATE0 + 1]);
    let s2 = take(&mut span.s[STATE0 + 2]);
    if !k.average.iter().any(Option::is_some) && k.restash.is_none() {
        update_loop::<T, G, R, M, P, BK>(&spec, w, g, backup, stash, s0, s1, s2);
        return;
    }
    // Averages and the new stash: chunk by chunk while the chunk is in cache. The new stash is
    // formed from the chunk's inputs first (the update reads the old stash and may overwrite
    // the gradient), stored after the update; the chunk's (stored, rounded) new weights are
    // folded last. Element-wise, so the same values as one loop doing everything.
    let n = w.len();
    let mut fresh = [T::from_f64(0.0); FOLD_CHUNK];
    let mut start = 0;
    while start < n {
        let end = (start + FOLD_CHUNK).min(n);
        if let Some(m) = &k.restash {
            for ((f, gi), si) in fresh.iter_mut().zip(&g[start..end]).zip(&stash[start..end]) {
                let gi = kernel::unscale(gi.to_f64(), k.unscale);
                *f = T::from_f64(kernel::combine(m, gi, si.to_f64()));
            }
        }
        let r = |s: &[T]| if s.is_empty() { 0..0 } else { start..end };
        let (rb, rs) = (r(backup), r(stash));
        let (r0, r1, r2) = (r(s0), r(s1), r(s2));
        update_loop::<T, G, R, M, P, BK>(
            &spec,
            &mut w[start..end],
            &mut g[start..end],
            &mut backup[rb],
            &mut stash[rs],
            &mut s0[r0],
            &mut s1[r1],
            &mut s2[r2],
        );
        if k.restash.is_some() {
            stash[start..end].copy_from_slice(&fresh[..end - start]);
        }
        for (j, wgt) in k.average.iter().enumerate() {
            if let (Some(wgt), Some(a)) = (*wgt, span.s[AVG0 + j].as_deref_mut()) {
                fold_loop(&mut a[start..end], &w[start..end], wgt);
            }
        }
        start = end;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn update_loop<T: Real, G: Real, const R: bool, const M: bool, const P: bool, const BK: u8>(
    spec: &UpdateSpec,
    w: &mut [T],
    g: &mut [G],
    backup: &mut [T],
    stash: &mut [T],
    s0: &mut [T],
    s1: &mut [T],
    s2: &mut [T],
) {
    let n = w.len();
    let ns = state_count(BK);
    let len = |used: bool| if used { n } else { 0 };
    let g = &mut g[..n];
    let backup = &backup[..len(R)];
    let stash = &stash[..len(M || P)];
    let s0 = &mut s0[..len(ns >= 1)];
    let s1 = &mut s1[..len(ns >= 2)];
    let s2 = &mut s2[..len(ns >= 3)];
    for i in 0..n {
        // Operands the spec does not use are passed as 0.0, like the reference backend.
        let wi = if R { 0.0 } else { w[i].to_f64() };
        let b = if R { backup[i].to_f64() } else { 0.0 };
        let s = if M || P { stash[i].to_f64() } else { 0.0 };
        let mut st = [0.0; 3];
        if ns >= 1 {
            st[0] = s0[i].to_f64();
        }
        if ns >= 2 {
            st[1] = s1[i].to_f64();
        }
        if ns >= 3 {
            st[2] = s2[i].to_f64();
        }
        let out = kernel::update(spec, wi, b, g[i].to_f64(), s, &mut st);
        w[i] = T::from_f64(out.w);
        if BK == EXTERNAL {
            g[i] = G::from_f64(out.d);
        }
        if ns >= 1 {
            s0[i] = T::from_f64(st[0]);
        }
        if ns >= 2 {
            s1[i] = T::from_f64(st[1]);
        }
        if ns >= 3 {
            s2[i] = T::from_f64(st[2]);
        }
    }
}
