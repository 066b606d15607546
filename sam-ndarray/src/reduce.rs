//! The reduce pass in the canonical order of `sam_core::backend::kernel`.
//!
//! The group's elements are numbered across the tensor concatenation; block `b` covers elements
//! `b·BLOCK .. (b+1)·BLOCK` (it may span several tensors) and is accumulated by a
//! [`BlockReducer`] with element `i` in lane `i % LANES` (`BLOCK` is a multiple of `LANES`, so
//! this is the kernel's `j % LANES`); blocks are combined by [`kernel::pairwise`], or, with the
//! `rayon` feature, by the same tree whose two halves run under `rayon::join`.

use ndarray::ArrayD;
use sam_core::backend::kernel::{self, BLOCK, BlockReducer, LANES};
use sam_core::backend::{Real, ReduceSpec, Reduction, Weighting};

use crate::isa::{self, Isa};

/// Where a block reads tensor `t`'s elements `lo..hi` from (an empty slice for an operand that
/// is absent or not in standard layout: checked by the caller).
pub(crate) trait Source<T>: Sync {
    /// Weights.
    fn w(&self, t: usize, lo: usize, hi: usize) -> &[T];
    /// Gradient.
    fn g(&self, t: usize, lo: usize, hi: usize) -> &[T];
    /// Stash (empty when the spec does not read it).
    fn stash(&self, t: usize, lo: usize, hi: usize) -> &[T];
}

/// An `NdGroup`'s arrays and its group-wide stash slot.
pub(crate) struct Arrays<'a, T> {
    /// Parameter arrays.
    pub w: &'a [ArrayD<T>],
    /// Gradient arrays.
    pub g: &'a [ArrayD<T>],
    /// The stash slot over the whole group (empty when the spec does not read it).
    pub stash: &'a [T],
    /// Tensor offsets (`w.len() + 1` values).
    pub offsets: &'a [usize],
}

impl<T: Real> Source<T> for Arrays<'_, T> {
    fn w(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        part(self.w.get(t), lo, hi)
    }
    fn g(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        part(self.g.get(t), lo, hi)
    }
    fn stash(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        let o = self.offsets.get(t).copied().unwrap_or(0);
        self.stash.get(o + lo..o + hi).unwrap_or(&[])
    }
}

/// One slice per tensor for each operand (`stash` empty when not read).
pub(crate) struct Slices<'a, T> {
    pub w: &'a [&'a [T]],
    pub g: &'a [&'a [T]],
    pub stash: &'a [&'a [T]],
}

impl<T: Real> Source<T> for Slices<'_, T> {
    fn w(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        self.w.get(t).and_then(|s| s.get(lo..hi)).unwrap_or(&[])
    }
    fn g(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        self.g.get(t).and_then(|s| s.get(lo..hi)).unwrap_or(&[])
    }
    fn stash(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        self.stash.get(t).and_then(|s| s.get(lo..hi)).unwrap_or(&[])
    }
}

/// What a block needs to read.
pub(crate) struct ReduceCtx<'a, S> {
    /// The operands.
    pub src: S,
    /// Tensor offsets (one more than tensors).
    pub offsets: &'a [usize],
    /// Elements in the group.
    pub len: usize,
    /// The specification.
    pub spec: ReduceSpec,
}

/// A block function specialised for one combination of a spec's discriminants.
pub(crate) type BlockFn<S> = fn(&ReduceCtx<'_, S>, usize) -> Reduction;

/// The whole reduction: the canonical pairwise tree over the blocks.
pub(crate) fn run<T: Real, S: Source<T>>(ctx: &ReduceCtx<'_, S>, _min_blocks: usize) -> Reduction {
    let f = select::<T, S>(&ctx.spec, isa::active());
    let n = kernel::block_count(ctx.len);
    #[cfg(feature = "rayon")]
    {
        par_pairwise(0, n, _min_blocks.max(1), &|b| f(ctx, b))
    }
    #[cfg(not(feature = "rayon"))]
    {
        kernel::pairwise(0, n, &mut |b| f(ctx, b))
    }
}

/// [`kernel::pairwise`] with the halves of every range longer than `cut` blocks evaluated by
/// `rayon::join`: the same tree (`mid = lo + (hi − lo)/2`, left combined with right), hence the
/// same bits, whatever the thread count.
#[cfg(feature = "rayon")]
fn par_pairwise<F>(lo: usize, hi: usize, cut: usize, f: &F) -> Reduction
where
    F: Fn(usize) -> Reduction + Sync,
{
    let n = hi.saturating_sub(lo);
    if n <= cut {
        return kernel::pairwise(lo, hi, &mut |b| f(b));
    }
    let mid = lo + n / 2;
    let (left, right) = rayon::join(
        || par_pairwise(lo, mid, cut, f),
        || par_pairwise(mid, hi, cut, f),
    );
    left.combine(right)
}

/// Picks the block function for a spec's discriminants (and, for the finiteness check, the
/// instruction-set level).
fn select<T: Real, S: Source<T>>(spec: &ReduceSpec, level: Isa) -> BlockFn<S> {
    let computes = spec.perturb.is_some() || spec.grad || spec.stash || spec.dot;
    if !computes {
        return match level {
            Isa::Baseline => finite_block::<T, S, { isa::BASELINE }>,
            Isa::Avx2 => finite_block::<T, S, { isa::AVX2 }>,
            Isa::Avx512 => finite_block::<T, S, { isa::AVX512 }>,
        };
    }
    match spec.perturb {
        None => select_gsd::<T, S, 0>(spec),
        Some(Weighting::Plain) => select_gsd::<T, S, 1>(spec),
        Some(Weighting::Adaptive { .. }) => select_gsd::<T, S, 2>(spec),
    }
}

fn select_gsd<T: Real, S: Source<T>, const P: u8>(spec: &ReduceSpec) -> BlockFn<S> {
    // Unit scales (every first try) as constants: the compiler drops the multiplications by
    // 1 (exact: `x · 1 = x`).
    let unit = spec.scale_perturb == 1.0 && spec.scale_grad == 1.0 && spec.scale_stash == 1.0;
    match (spec.grad, spec.stash, spec.dot, unit) {
        (false, false, false, false) => block::<T, S, P, false, false, false, false>,
        (false, false, true, false) => block::<T, S, P, false, false, true, false>,
        (false, true, false, false) => block::<T, S, P, false, true, false, false>,
        (false, true, true, false) => block::<T, S, P, false, true, true, false>,
        (true, false, false, false) => block::<T, S, P, true, false, false, false>,
        (true, false, true, false) => block::<T, S, P, true, false, true, false>,
        (true, true, false, false) => block::<T, S, P, true, true, false, false>,
        (true, true, true, false) => block::<T, S, P, true, true, true, false>,
        (false, false, false, true) => block::<T, S, P, false, false, false, true>,
        (false, false, true, true) => block::<T, S, P, false, false, true, true>,
        (false, true, false, true) => block::<T, S, P, false, true, false, true>,
        (false, true, true, true) => block::<T, S, P, false, true, true, true>,
        (true, false, false, true) => block::<T, S, P, true, false, false, true>,
        (true, false, true, true) => block::<T, S, P, true, false, true, true>,
        (true, true, false, true) => block::<T, S, P, true, true, false, true>,
        (true, true, true, true) => block::<T, S, P, true, true, true, true>,
    }
}

/// Block `b`. The spec is rebuilt with constant discriminants (and the original scalars), so
/// the inlined `BlockReducer::push` has no per-element branches on it.
fn block<
    T: Real,
    Src: Source<T>,
    const P: u8,
    const G: bool,
    const S: bool,
    const D: bool,
    const U: bool,
>(
    ctx: &ReduceCtx<'_, Src>,
    b: usize,
) -> Reduction {
    let eta = match ctx.spec.perturb {
        Some(Weighting::Adaptive { eta }) => eta,
        _ => 0.0,
    };
    let spec = ReduceSpec {
        perturb: match P {
            0 => None,
            1 => Some(Weighting::Plain),
            _ => Some(Weighting::Adaptive { eta }),
        },
        grad: G,
        stash: S,
        dot: D,
        scale_perturb: if U { 1.0 } else { ctx.spec.scale_perturb },
        scale_grad: if U { 1.0 } else { ctx.spec.scale_grad },
        scale_stash: if U { 1.0 } else { ctx.spec.scale_stash },
    };
    let mut r = BlockReducer::new(&spec);
    segments(ctx, b, |t, lo, hi, lane0| {
        let g = ctx.src.g(t, lo, hi);
        let w = if P == 2 { ctx.src.w(t, lo, hi) } else { &[] };
        let s = if S || D {
            ctx.src.stash(t, lo, hi)
        } else {
            &[]
        };
        segment::<T, P, S, D>(&mut r, lane0, w, g, s);
    });
    r.finish()
}

/// Block `b` of a spec that computes no quantity (the finiteness check of a second gradient),
/// compiled for instruction-set level `I`: whether every gradient value is finite, read in the
/// storage type with no widening. The sums and maxima are the zeros a [`BlockReducer`] with
/// nothing to accumulate returns, so the result is bit-identical to it.
fn finite_block<T: Real, Src: Source<T>, const I: u8>(
    ctx: &ReduceCtx<'_, Src>,
    b: usize,
) -> Reduction {
    isa::run::<I, _, _>(
        #[inline(always)]
        || {
            let mut finite = true;
            segments(
                ctx,
                b,
                #[inline(always)]
                |t, lo, hi, _| finite &= all_finite(ctx.src.g(t, lo, hi)),
            );
            Reduction {
                finite,
                ..Reduction::ZERO
            }
        },
    )
}

/// Whether every value is finite, with no branch inside a chunk (so the loop vectorises).
#[inline(always)]
fn all_finite<T: Real>(x: &[T]) -> bool {
    const CHUNK: usize = 64;
    let mut chunks = x.chunks_exact(CHUNK);
    let mut finite = true;
    for c in chunks.by_ref() {
        let mut f = true;
        for v in c {
            f &= v.to_f64().is_finite();
        }
        finite &= f;
    }
    chunks
        .remainder()
        .iter()
        .fold(finite, |f, v| f & v.to_f64().is_finite())
}

/// Calls `f(t, lo, hi, lane)` for each run of block `b`'s elements that lies in one tensor, in
/// order: tensor `t`'s elements `lo..hi`, the first of which is in lane `lane`.
#[inline(always)]
fn segments<Src>(
    ctx: &ReduceCtx<'_, Src>,
    b: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let start = b * BLOCK;
    let end = (start + BLOCK).min(ctx.len);
    // The tensor holding `start` (the last of any empty tensors sharing its offset).
    let mut t = ctx
        .offsets
        .partition_point(|&o| o <= start)
        .saturating_sub(1);
    let mut i = start;
    while i < end && t + 1 < ctx.offsets.len() {
        let (o0, o1) = (ctx.offsets[t], ctx.offsets[t + 1]);
        let seg_end = o1.min(end);
        if seg_end > i {
            f(t, i - o0, seg_end - o0, i % LANES);
            i = seg_end;
        }
        t += 1;
    }
}

/// Elements `lo..hi` of a standard-layout array (empty if it were not: checked by the caller).
#[inline(always)]
fn part<T>(a: Option<&ArrayD<T>>, lo: usize, hi: usize) -> &[T] {
    a.and_then(|a| a.as_slice())
        .and_then(|s| s.get(lo..hi))
        .unwrap_or(&[])
}

// The lane dispatch below is written for 8 lanes, and lanes are counted from the block start.
const _: () = assert!(LANES == 8 && BLOCK.is_multiple_of(LANES));

/// Pushes into a lane given at run time, through constant lane indices (so the reducer's lanes
/// can live in registers).
#[inline(always)]
fn push_dyn(r: &mut BlockReducer, lane: usize, w: f64, g: f64, s: f64) {
    match lane % LANES {
        0 => r.push(0, w, g, s),
        1 => r.push(1, w, g, s),
        2 => r.push(2, w, g, s),
        3 => r.push(3, w, g, s),
        4 => r.push(4, w, g, s),
        5 => r.push(5, w, g, s),
        6 => r.push(6, w, g, s),
        _ => r.push(7, w, g, s),
    }
}

/// One chunk of `LANES` elements of each operand, widened.
#[allow(clippy::type_complexity)]
#[inline(always)]
fn load<T: Real>(w: &[T], g: &[T], s: &[T]) -> ([f64; LANES], [f64; LANES], [f64; LANES]) {
    let (mut wv, mut gv, mut sv) = ([0.0; LANES], [0.0; LANES], [0.0; LANES]);
    for l in 0..LANES {
        wv[l] = w[l].to_f64();
        gv[l] = g[l].to_f64();
        sv[l] = s[l].to_f64();
    }
    (wv, gv, sv)
}

/// Accumulates consecutive elements whose first one is in lane `lane0`. Operands the spec does
/// not read are not loaded (the gradient slice stands in for them; the reducer ignores them).
#[inline(always)]
fn segment<T: Real, const P: u8, const S: bool, const D: bool>(
    r: &mut BlockReducer,
    lane0: usize,
    w: &[T],
    g: &[T],
    s: &[T],
) {
    let w = if P == 2 { w } else { g };
    let s = if S || D { s } else { g };
    let n = g.len().min(w.len()).min(s.len());
    let (w, g, s) = (&w[..n], &g[..n], &s[..n]);
    let head = ((LANES - lane0 % LANES) % LANES).min(n);
    for j in 0..head {
        push_dyn(r, lane0 + j, w[j].to_f64(), g[j].to_f64(), s[j].to_f64());
    }
    let full = head + (n - head) / LANES * LANES;
    let mut chunks = w[head..full]
        .chunks_exact(LANES)
        .zip(g[head..full].chunks_exact(LANES))
        .zip(s[head..full].chunks_exact(LANES));
    if P == 0 {
        // No perturbation term (GSAM/WSAM norms of a second gradient; a pure finiteness check
        // goes to `finite_block` instead).
        // Non-finite values are rare: while a chunk's gradient (and stash, if read) is finite,
        // the compiler knows it inside the inlined `push` and drops its per-element checks;
        // from the first chunk with a non-finite value on, the plain loop below takes over.
        // Both loops make exactly the same `push` calls, in the same order. (With a
        // perturbation term this split measured slower: it is not used there.)
        let mut pending = None;
        for ((wc, gc), sc) in chunks.by_ref() {
            let (wv, gv, sv) = load(wc, gc, sc);
            let mut finite = true;
            for l in 0..LANES {
                finite &= gv[l].is_finite() & (!(S || D) || sv[l].is_finite());
            }
            if !finite {
                pending = Some((wv, gv, sv));
                break;
            }
            r.push_lanes(&wv, &gv, &sv);
        }
        match pending {
            Some((wv, gv, sv)) => r.push_lanes(&wv, &gv, &sv),
            None => return tail(r, lane0, full, w, g, s),
        }
    }
    for ((wc, gc), sc) in chunks {
        let (wv, gv, sv) = load(wc, gc, sc);
        r.push_lanes(&wv, &gv, &sv);
    }
    tail(r, lane0, full, w, g, s);
}

/// The elements of a segment after its last whole chunk.
#[inline(always)]
fn tail<T: Real>(r: &mut BlockReducer, lane0: usize, full: usize, w: &[T], g: &[T], s: &[T]) {
    let n = g.len().min(w.len()).min(s.len());
    for j in full..n {
        push_dyn(r, lane0 + j, w[j].to_f64(), g[j].to_f64(), s[j].to_f64());
    }
}
