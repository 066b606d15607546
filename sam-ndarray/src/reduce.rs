//! The reduce pass in the canonical order of `sam_core::backend::kernel`.
//!
//! The group's elements are numbered across the tensor concatenation; block `b` covers elements
//! `b·BLOCK .. (b+1)·BLOCK` (it may span several tensors) and is accumulated with element `i`
//! in lane `i % LANES` (`BLOCK` is a multiple of `LANES`, so this is the kernel's `j % LANES`);
//! blocks are combined by [`kernel::pairwise`], or, with the `rayon` feature, by the same tree
//! whose two halves run under `rayon::join`.
//!
//! The lanes of a block live in SIMD registers: [`Accumulators`] over the lane type of the
//! instruction-set level ([`isa::dispatch`]), each operation the one IEEE instruction the
//! core's lane math names, so every level gives the same bits. Blocks are read one after
//! another: accumulating several blocks side by side, to shorten the dependent addition chains,
//! measured slower (four read streams 16 KiB apart) than one block at a time.

use ndarray::ArrayD;
use sam_core::backend::kernel::{self, Accumulators, BLOCK, BlockReducer, LANES, Lanes};
use sam_core::backend::{Real, ReduceSpec, Reduction, Weighting};

use core::marker::PhantomData;

use crate::isa::{self, Isa, WithLanes};

/// Where a block reads tensor `t`'s elements `lo..hi` from (an empty slice for an operand that
/// is absent or not in standard layout: checked by the caller): weights and stash in `T`, the
/// gradient in `Gr`.
pub(crate) trait Source<T, Gr>: Sync {
    /// Weights.
    fn w(&self, t: usize, lo: usize, hi: usize) -> &[T];
    /// Gradient.
    fn g(&self, t: usize, lo: usize, hi: usize) -> &[Gr];
    /// Stash (empty when the spec does not read it).
    fn stash(&self, t: usize, lo: usize, hi: usize) -> &[T];
}

/// An `NdGroup`'s arrays and its group-wide stash slot.
pub(crate) struct Arrays<'a, T, Gr> {
    /// Parameter arrays.
    pub w: &'a [ArrayD<T>],
    /// Gradient arrays.
    pub g: &'a [ArrayD<Gr>],
    /// The stash slot over the whole group (empty when the spec does not read it).
    pub stash: &'a [T],
    /// Tensor offsets (`w.len() + 1` values).
    pub offsets: &'a [usize],
}

impl<T: Real, Gr: Real> Source<T, Gr> for Arrays<'_, T, Gr> {
    fn w(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        part(self.w.get(t), lo, hi)
    }
    fn g(&self, t: usize, lo: usize, hi: usize) -> &[Gr] {
        part(self.g.get(t), lo, hi)
    }
    fn stash(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        let o = self.offsets.get(t).copied().unwrap_or(0);
        self.stash.get(o + lo..o + hi).unwrap_or(&[])
    }
}

/// One slice per tensor for each operand (`stash` empty when not read).
pub(crate) struct Slices<'a, T, Gr = T> {
    pub w: &'a [&'a [T]],
    pub g: &'a [&'a [Gr]],
    pub stash: &'a [&'a [T]],
}

impl<T: Real, Gr: Real> Source<T, Gr> for Slices<'_, T, Gr> {
    fn w(&self, t: usize, lo: usize, hi: usize) -> &[T] {
        self.w.get(t).and_then(|s| s.get(lo..hi)).unwrap_or(&[])
    }
    fn g(&self, t: usize, lo: usize, hi: usize) -> &[Gr] {
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

/// A block function specialised for one combination of a spec's discriminants and an
/// instruction-set level.
pub(crate) type BlockFn<S> = fn(&ReduceCtx<'_, S>, usize) -> Reduction;

/// The whole reduction: the canonical pairwise tree over the blocks.
pub(crate) fn run<T: Real, Gr: Real, S: Source<T, Gr>>(
    ctx: &ReduceCtx<'_, S>,
    _min_blocks: usize,
) -> Reduction {
    let f = select::<T, Gr, S>(&ctx.spec, isa::active());
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

/// Picks the block function for a spec's discriminants and the instruction-set level.
fn select<T: Real, Gr: Real, S: Source<T, Gr>>(spec: &ReduceSpec, level: Isa) -> BlockFn<S> {
    match level {
        Isa::Baseline => select_p::<T, Gr, S, { isa::BASELINE }>(spec),
        Isa::Avx2 => select_p::<T, Gr, S, { isa::AVX2 }>(spec),
        Isa::Avx512 => select_p::<T, Gr, S, { isa::AVX512 }>(spec),
    }
}

fn select_p<T: Real, Gr: Real, S: Source<T, Gr>, const I: u8>(spec: &ReduceSpec) -> BlockFn<S> {
    let computes = spec.perturb.is_some() || spec.grad || spec.stash || spec.dot;
    if !computes {
        // The AVX-512 version of the check measured slower than the AVX2 one (module doc of
        // `isa`): the AVX-512 level runs the AVX2 code for it.
        return if I == isa::BASELINE {
            finite_block::<T, Gr, S, { isa::BASELINE }>
        } else {
            finite_block::<T, Gr, S, { isa::AVX2 }>
        };
    }
    match spec.perturb {
        None => select_gsd::<T, Gr, S, 0, I>(spec),
        Some(Weighting::Plain) => select_gsd::<T, Gr, S, 1, I>(spec),
        Some(Weighting::Adaptive { .. }) => select_gsd::<T, Gr, S, 2, I>(spec),
    }
}

fn select_gsd<T: Real, Gr: Real, S: Source<T, Gr>, const P: u8, const I: u8>(
    spec: &ReduceSpec,
) -> BlockFn<S> {
    // Unit scales (every first try without a loss scale) as constants: the compiler drops the
    // multiplications by 1 (exact: `x · 1 = x`).
    let unit = spec.scale_perturb == 1.0
        && spec.scale_grad == 1.0
        && spec.scale_stash == 1.0
        && spec.unscale == 1.0;
    match (spec.grad, spec.stash, spec.dot, unit) {
        (false, false, false, false) => block::<T, Gr, S, P, false, false, false, false, I>,
        (false, false, true, false) => block::<T, Gr, S, P, false, false, true, false, I>,
        (false, true, false, false) => block::<T, Gr, S, P, false, true, false, false, I>,
        (false, true, true, false) => block::<T, Gr, S, P, false, true, true, false, I>,
        (true, false, false, false) => block::<T, Gr, S, P, true, false, false, false, I>,
        (true, false, true, false) => block::<T, Gr, S, P, true, false, true, false, I>,
        (true, true, false, false) => block::<T, Gr, S, P, true, true, false, false, I>,
        (true, true, true, false) => block::<T, Gr, S, P, true, true, true, false, I>,
        (false, false, false, true) => block::<T, Gr, S, P, false, false, false, true, I>,
        (false, false, true, true) => block::<T, Gr, S, P, false, false, true, true, I>,
        (false, true, false, true) => block::<T, Gr, S, P, false, true, false, true, I>,
        (false, true, true, true) => block::<T, Gr, S, P, false, true, true, true, I>,
        (true, false, false, true) => block::<T, Gr, S, P, true, false, false, true, I>,
        (true, false, true, true) => block::<T, Gr, S, P, true, false, true, true, I>,
        (true, true, false, true) => block::<T, Gr, S, P, true, true, false, true, I>,
        (true, true, true, true) => block::<T, Gr, S, P, true, true, true, true, I>,
    }
}

/// Block `b` at instruction-set level `I`.
fn block<
    T: Real,
    Gr: Real,
    Src: Source<T, Gr>,
    const P: u8,
    const G: bool,
    const S: bool,
    const D: bool,
    const U: bool,
    const I: u8,
>(
    ctx: &ReduceCtx<'_, Src>,
    b: usize,
) -> Reduction {
    isa::dispatch::<I, _>(Block::<T, Gr, Src, P, G, S, D, U> {
        ctx,
        b,
        _storage: PhantomData,
    })
}

/// The arguments of [`block`], run with the lanes of the level.
struct Block<
    'r,
    'c,
    T,
    Gr,
    Src,
    const P: u8,
    const G: bool,
    const S: bool,
    const D: bool,
    const U: bool,
> {
    ctx: &'r ReduceCtx<'c, Src>,
    b: usize,
    _storage: PhantomData<(T, Gr)>,
}

impl<
    T: Real,
    Gr: Real,
    Src: Source<T, Gr>,
    const P: u8,
    const G: bool,
    const S: bool,
    const D: bool,
    const U: bool,
> WithLanes for Block<'_, '_, T, Gr, Src, P, G, S, D, U>
{
    type Output = Reduction;

    #[inline(always)]
    fn with<V: Lanes>(self) -> Reduction {
        let spec = const_spec::<P, G, S, D, U>(&self.ctx.spec);
        one_block::<T, Gr, Src, V, P, S, D>(self.ctx, &spec, self.b)
    }
}

/// The spec with constant discriminants (and the original scalars, or unit scales and no
/// unscaling for `U`), so
/// the inlined element math has no per-element branches on it.
#[inline(always)]
fn const_spec<const P: u8, const G: bool, const S: bool, const D: bool, const U: bool>(
    spec: &ReduceSpec,
) -> ReduceSpec {
    let eta = match spec.perturb {
        Some(Weighting::Adaptive { eta }) => eta,
        _ => 0.0,
    };
    ReduceSpec {
        perturb: match P {
            0 => None,
            1 => Some(Weighting::Plain),
            _ => Some(Weighting::Adaptive { eta }),
        },
        grad: G,
        stash: S,
        dot: D,
        scale_perturb: if U { 1.0 } else { spec.scale_perturb },
        scale_grad: if U { 1.0 } else { spec.scale_grad },
        scale_stash: if U { 1.0 } else { spec.scale_stash },
        unscale: if U { 1.0 } else { spec.unscale },
    }
}

/// Block `b`, which may span tensors: whole chunks of [`LANES`] elements in the lanes `V`, the
/// elements of a segment before its first and after its last whole chunk one at a time.
#[inline(always)]
fn one_block<
    T: Real,
    Gr: Real,
    Src: Source<T, Gr>,
    V: Lanes,
    const P: u8,
    const S: bool,
    const D: bool,
>(
    ctx: &ReduceCtx<'_, Src>,
    spec: &ReduceSpec,
    b: usize,
) -> Reduction {
    let mut acc = Accumulators::<V>::new();
    segments(
        ctx,
        b,
        #[inline(always)]
        |t, lo, hi, lane0| {
            // Operands the spec does not read stand in as the weights (same type and length,
            // never loaded).
            let g = ctx.src.g(t, lo, hi);
            let w = ctx.src.w(t, lo, hi);
            let s = if S || D { ctx.src.stash(t, lo, hi) } else { w };
            let n = g.len().min(w.len()).min(s.len());
            let head = ((LANES - lane0 % LANES) % LANES).min(n);
            let full = head + (n - head) / LANES * LANES;
            one_at_a_time(&mut acc, spec, lane0, &w[..head], &g[..head], &s[..head]);
            let (wc, gc, sc) = (
                w[head..full].as_chunks::<LANES>().0,
                g[head..full].as_chunks::<LANES>().0,
                s[head..full].as_chunks::<LANES>().0,
            );
            for ((w, g), s) in wc.iter().zip(gc).zip(sc) {
                push::<T, Gr, V, P, S, D>(&mut acc, spec, w, g, s);
            }
            one_at_a_time(
                &mut acc,
                spec,
                lane0 + full,
                &w[full..n],
                &g[full..n],
                &s[full..n],
            );
        },
    );
    BlockReducer::from_lanes(spec, acc.map(V::to_array)).finish()
}

/// One chunk of [`LANES`] elements, widened; operands the spec does not read are not loaded.
#[inline(always)]
fn push<T: Real, Gr: Real, V: Lanes, const P: u8, const S: bool, const D: bool>(
    acc: &mut Accumulators<V>,
    spec: &ReduceSpec,
    w: &[T; LANES],
    g: &[Gr; LANES],
    s: &[T; LANES],
) {
    let load = |x: &[T; LANES]| V::from_array(x.map(T::to_f64));
    let zero = V::splat(0.0);
    let w = if P == 2 { load(w) } else { zero };
    let s = if S || D { load(s) } else { zero };
    acc.push(spec, w, V::from_array(g.map(Gr::to_f64)), s);
}

/// Consecutive elements, the first in lane `lane0`, pushed one at a time into `acc`'s lanes.
#[inline(always)]
fn one_at_a_time<T: Real, Gr: Real, V: Lanes>(
    acc: &mut Accumulators<V>,
    spec: &ReduceSpec,
    lane0: usize,
    w: &[T],
    g: &[Gr],
    s: &[T],
) {
    if g.is_empty() {
        return;
    }
    let mut r = BlockReducer::from_lanes(spec, acc.map(V::to_array));
    for (j, ((w, g), s)) in w.iter().zip(g).zip(s).enumerate() {
        r.push(lane0 + j, w.to_f64(), g.to_f64(), s.to_f64());
    }
    *acc = r.lanes().map(V::from_array);
}

/// Block `b` of a spec that computes no quantity (the finiteness check of a second gradient),
/// compiled for instruction-set level `I`: whether every gradient value is finite, read in the
/// storage type with no widening. The sums and maxima are the zeros a [`BlockReducer`] with
/// nothing to accumulate returns, so the result is bit-identical to it.
fn finite_block<T: Real, Gr: Real, Src: Source<T, Gr>, const I: u8>(
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

// Lanes are counted from the block start.
const _: () = assert!(BLOCK.is_multiple_of(LANES));
