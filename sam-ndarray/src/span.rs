//! Walking a group's tensors as contiguous spans, sequentially or (feature `rayon`) in parallel.
//!
//! A [`Span`] is a run of consecutive elements of one tensor: its weights, its gradient, its
//! model copy (if the group keeps one) and the matching ranges of the slots a pass uses.
//! Element-wise passes are a function applied to every span; since each element is computed
//! independently, how the group is cut into spans (and on which thread each runs) cannot change
//! any result.

use ndarray::ArrayD;
use sam_core::backend::Real;

use crate::NdError;

/// Number of slot roles: backup, stash, 3 base-rule states, the running averages.
pub(crate) const NSLOTS: usize = 5 + sam_core::backend::MAX_AVERAGES;
/// Role index of the backup.
pub(crate) const BACKUP: usize = 0;
/// Role index of the stash.
pub(crate) const STASH: usize = 1;
/// Role index of base-rule state 0 (states are `STATE0..STATE0 + 3`).
pub(crate) const STATE0: usize = 2;
/// Role index of average 0 (averages are `AVG0..AVG0 + MAX_AVERAGES`).
pub(crate) const AVG0: usize = 5;

/// The slot ranges a pass uses (`None` for slots it does not touch).
pub(crate) type SlotRefs<'a, T> = [Option<&'a mut [T]>; NSLOTS];

/// Elements per chunk of [`with_model`] (the chunk's new weights are still in L1 when they are
/// rounded into the model copy).
const MODEL_CHUNK: usize = 2048;

/// Consecutive elements of one tensor: weights in `T`, gradient and model copy in `G`.
pub(crate) struct Span<'a, T, G = T> {
    /// Weights.
    pub w: &'a mut [T],
    /// Gradient (empty for a pass that does not read it).
    pub g: &'a mut [G],
    /// The model copy of the weights, if the group keeps one.
    pub m: Option<&'a mut [G]>,
    /// Slot ranges, indexed by role.
    pub s: SlotRefs<'a, T>,
}

impl<'a, T, G> Span<'a, T, G> {
    /// Cuts the span at element `mid` (of the weights; operands shorter than that, such as an
    /// absent gradient, are cut at their end).
    fn split_at(self, mid: usize) -> (Span<'a, T, G>, Span<'a, T, G>) {
        let Span { w, g, m, s } = self;
        let (wl, wr) = w.split_at_mut(mid);
        let (gl, gr) = g.split_at_mut(mid.min(g.len()));
        let (ml, mr) = match m {
            Some(m) => {
                let (a, b) = m.split_at_mut(mid.min(m.len()));
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        let (sl, sr) = split_slots(s, mid);
        (
            Span {
                w: wl,
                g: gl,
                m: ml,
                s: sl,
            },
            Span {
                w: wr,
                g: gr,
                m: mr,
                s: sr,
            },
        )
    }
}

/// Runs the weight-writing pass `f` on `span` and keeps its model copy (if any) the rounding of
/// the new weights: chunk by chunk, each chunk rounded right after `f` wrote it, so the copy
/// costs a write of `G` per element and no second read of the weights from memory.
pub(crate) fn with_model<T: Real, G: Real>(span: Span<'_, T, G>, f: &impl Fn(Span<'_, T, G>)) {
    if span.m.is_none() {
        return f(span);
    }
    let mut rest = span;
    while !rest.w.is_empty() {
        let k = MODEL_CHUNK.min(rest.w.len());
        let (head, tail) = rest.split_at(k);
        rest = tail;
        let Span { w, g, m, s } = head;
        f(Span {
            w: &mut *w,
            g,
            m: None,
            s,
        });
        for (c, x) in m.into_iter().flatten().zip(w.iter()) {
            *c = G::from_f64(x.to_f64());
        }
    }
}

/// Cuts every slot range at `mid`.
fn split_slots<T>(s: SlotRefs<'_, T>, mid: usize) -> (SlotRefs<'_, T>, SlotRefs<'_, T>) {
    let mut left: SlotRefs<'_, T> = Default::default();
    let mut right: SlotRefs<'_, T> = Default::default();
    for (k, o) in s.into_iter().enumerate() {
        if let Some(x) = o {
            let (a, b) = x.split_at_mut(mid.min(x.len()));
            left[k] = Some(a);
            right[k] = Some(b);
        }
    }
    (left, right)
}

/// A run of whole tensors with their slot ranges.
pub(crate) struct Tensors<'a, T, G> {
    /// Parameter arrays.
    pub w: &'a mut [ArrayD<T>],
    /// Gradient arrays.
    pub g: &'a mut [ArrayD<G>],
    /// The model copy, one array per tensor, if the group keeps one.
    pub m: Option<&'a mut [ArrayD<G>]>,
    /// Element offsets of the tensors (`w.len() + 1` values, absolute; the slot ranges start at
    /// `offsets[0]`).
    pub offsets: &'a [usize],
    /// Index of the first tensor in the group (for error messages).
    pub first: usize,
    /// Slot ranges covering exactly these tensors.
    pub slots: SlotRefs<'a, T>,
}

/// Tensor `i`'s storage as one span (its slot ranges are given).
fn tensor_span<'a, T, G>(
    w: &'a mut ArrayD<T>,
    g: &'a mut ArrayD<G>,
    m: Option<&'a mut ArrayD<G>>,
    tensor: usize,
    s: SlotRefs<'a, T>,
) -> Result<Span<'a, T, G>, NdError> {
    let not_contiguous = |array| NdError::NotContiguous { tensor, array };
    let w = w.as_slice_mut().ok_or(not_contiguous("weight"))?;
    let g = g.as_slice_mut().ok_or(not_contiguous("gradient"))?;
    let m = match m {
        Some(m) => Some(m.as_slice_mut().ok_or(not_contiguous("model copy"))?),
        None => None,
    };
    Ok(Span { w, g, m, s })
}

/// Calls `f` on every tensor of `t`, in order, on this thread.
pub(crate) fn for_each_seq<T, G, F>(t: Tensors<'_, T, G>, f: &F) -> Result<(), NdError>
where
    F: Fn(Span<'_, T, G>),
{
    let Tensors {
        w,
        g,
        mut m,
        offsets,
        first,
        mut slots,
    } = t;
    for (i, (wa, ga)) in w.iter_mut().zip(g.iter_mut()).enumerate() {
        let n = offsets[i + 1] - offsets[i];
        let (head, tail) = split_slots(slots, n);
        slots = tail;
        let ma = m.as_deref_mut().and_then(|m| m.get_mut(i));
        f(tensor_span(wa, ga, ma, first + i, head)?);
    }
    Ok(())
}

/// Calls `f` on spans covering every tensor of `t`, in parallel on the current rayon pool: the
/// tensor list is halved (by element count) until a part holds at most `min_len` elements or a
/// single tensor, and a single large tensor is halved until its parts hold at most `min_len`.
/// Many small tensors thus cost no task each.
#[cfg(feature = "rayon")]
pub(crate) fn for_each_par<T, G, F>(
    t: Tensors<'_, T, G>,
    min_len: usize,
    f: &F,
) -> Result<(), NdError>
where
    T: Send,
    G: Send,
    F: Fn(Span<'_, T, G>) + Sync,
{
    let n_tensors = t.w.len();
    let total = t.offsets[n_tensors] - t.offsets[0];
    if total <= min_len || n_tensors == 0 {
        return for_each_seq(t, f);
    }
    let Tensors {
        w,
        g,
        m,
        offsets,
        first,
        slots,
    } = t;
    if n_tensors == 1 {
        let m0 = m.and_then(|m| m.first_mut());
        span_par(
            tensor_span(&mut w[0], &mut g[0], m0, first, slots)?,
            min_len,
            f,
        );
        return Ok(());
    }
    let half = offsets[0] + total / 2;
    let k = offsets
        .partition_point(|&o| o < half)
        .clamp(1, n_tensors - 1);
    let (wl, wr) = w.split_at_mut(k);
    let (gl, gr) = g.split_at_mut(k);
    let (ml, mr) = match m {
        Some(m) => {
            let (a, b) = m.split_at_mut(k.min(m.len()));
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    let (sl, sr) = split_slots(slots, offsets[k] - offsets[0]);
    let left = Tensors {
        w: wl,
        g: gl,
        m: ml,
        offsets: &offsets[..=k],
        first,
        slots: sl,
    };
    let right = Tensors {
        w: wr,
        g: gr,
        m: mr,
        offsets: &offsets[k..],
        first: first + k,
        slots: sr,
    };
    let (a, b) = rayon::join(
        || for_each_par(left, min_len, f),
        || for_each_par(right, min_len, f),
    );
    a.and(b)
}

/// Halves one span until its parts hold at most `min_len` elements.
#[cfg(feature = "rayon")]
fn span_par<T, G, F>(span: Span<'_, T, G>, min_len: usize, f: &F)
where
    T: Send,
    G: Send,
    F: Fn(Span<'_, T, G>) + Sync,
{
    let n = span.w.len();
    if n <= min_len.max(1) {
        f(span);
        return;
    }
    // Cut at a multiple of 64 elements where possible (keeps vector loops aligned).
    let mid = match (n / 2) & !63 {
        0 => n / 2,
        m => m,
    };
    let (l, r) = span.split_at(mid);
    rayon::join(|| span_par(l, min_len, f), || span_par(r, min_len, f));
}
