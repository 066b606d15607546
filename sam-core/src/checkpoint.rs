//! Checkpoints: an optimizer's host state plus the per-element state in every group's slots,
//! saved between steps and loaded into fresh buffers, so that a resumed run continues with the
//! same bits as an uninterrupted one.
//!
//! A checkpoint holds the slots that carry state from one step to the next: LookSAM's stored
//! direction (its stash), the base rule's state (SGD's momentum buffer; Adam's `m`, `v`,
//! `vmax`) and WASAM's averages. The backup, and the stash of the other variants, are scratch
//! between steps (written before they are read in every step) and are not saved. Weights are the model's and are saved by the framework with the model. Values are
//! stored as the bits of their exact `f64` widening, so any serde format round-trips them.

use alloc::vec::Vec;

use crate::backend::{ParamBuffer, Real, Slot, SlotSpec};
use crate::error::Error;
use crate::group::Group;
use crate::optimizer::Optimizer;

/// Copies of a buffer's prepared slots, for checkpoints (implemented by the reference and
/// ndarray backends). Copies, not views, so that device memory can implement it.
pub trait SlotAccess: ParamBuffer {
    /// The slot layout last prepared, if any.
    fn prepared(&self) -> Option<SlotSpec>;
    /// Copies one prepared slot into `out` (`len()` values, in the group's element order).
    /// A slot that is not prepared, or an `out` of another length, is the backend's error.
    fn read_slot(&self, slot: Slot, out: &mut [Self::Scalar]) -> Result<(), Self::Error>;
    /// Overwrites one prepared slot with `values` (`len()` of them). On error nothing changed.
    fn write_slot(&mut self, slot: Slot, values: &[Self::Scalar]) -> Result<(), Self::Error>;
}

/// Copies `src` into `dst` when both exist with the same length, for [`SlotAccess`]
/// implementations over host memory; returns whether it copied.
pub fn copy_slot<T: Copy>(src: Option<&[T]>, dst: Option<&mut [T]>) -> bool {
    match (src, dst) {
        (Some(src), Some(dst)) if src.len() == dst.len() => {
            dst.copy_from_slice(src);
            true
        }
        _ => false,
    }
}

/// The checkpoint format version written by this crate.
pub const FORMAT: u32 = 1;

/// One slot of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SlotValues {
    /// The slot's role.
    pub slot: Slot,
    /// Each value's exact `f64` widening, as bits.
    pub bits: Vec<u64>,
}

/// The saved slots of one group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GroupState {
    /// Elements in the group.
    pub len: u64,
    /// The group's slot layout when saved.
    pub spec: SlotSpec,
    /// The storage type (`"f32"` or `"f64"`).
    pub scalar: alloc::string::String,
    /// The persistent stash (LookSAM), the base-rule state slots, then the averages, in order.
    pub slots: Vec<SlotValues>,
}

/// A complete optimizer checkpoint (host state and slots); see the [module docs](self).
///
/// ```
/// use sam_core::checkpoint::Checkpoint;
/// use sam_core::reference::VecBuffer;
/// use sam_core::{BaseRule, Group, Optimizer, Sam, SamConfig, SgdConfig};
///
/// let base = BaseRule::sgd(SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// let new_groups = || -> Result<_, Box<dyn std::error::Error>> {
///     Ok(vec![Group::new(VecBuffer::new(vec![1.0_f32, -2.0], vec![0.0; 2])?, base)])
/// };
/// let grad = |gs: &mut [Group<VecBuffer<f32>>]| {
///     let (w, g) = gs[0].buffer.weights_and_grad();
///     g.copy_from_slice(w);
///     Ok::<_, sam_core::Error<_>>(())
/// };
/// let mut sam = Sam::new(SamConfig::default())?;
/// let mut groups = new_groups()?;
/// sam.step(&mut groups, grad)?;
/// let ckpt = Checkpoint::save(&sam, &groups)?; // serde-serialisable with the `serde` feature
///
/// // Later, or in another process: a fresh optimizer and fresh buffers holding the saved weights.
/// let mut resumed = Sam::new(SamConfig::default())?;
/// let mut fresh = new_groups()?;
/// fresh[0].buffer.weights_mut().copy_from_slice(groups[0].buffer.weights());
/// ckpt.load(&mut resumed, &mut fresh)?;
/// sam.step(&mut groups, grad)?;
/// resumed.step(&mut fresh, grad)?;
/// assert_eq!(groups[0].buffer.weights(), fresh[0].buffer.weights());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Checkpoint<S> {
    /// [`FORMAT`] when written.
    pub format: u32,
    /// The optimizer's variant ([`Optimizer::variant`]).
    pub variant: alloc::string::String,
    /// The optimizer's host state ([`Optimizer::state`]).
    pub state: S,
    /// One entry per group, in order.
    pub groups: Vec<GroupState>,
}

/// The slots a checkpoint holds for a layout: the stash when it persists (`keeps_stash`),
/// base state, then averages.
fn saved_slots(spec: &SlotSpec, keeps_stash: bool) -> impl Iterator<Item = Slot> {
    (keeps_stash && spec.stash)
        .then_some(Slot::Stash)
        .into_iter()
        .chain((0..spec.state).map(Slot::State))
        .chain((0..spec.averages).map(Slot::Average))
}

/// Refusal of a checkpoint that does not fit.
fn mismatch<E>(message: &'static str) -> Error<E> {
    Error::InvalidState { message }
}

impl<S: Clone> Checkpoint<S> {
    /// Saves `opt` and the slots of `groups` (only between steps: a perturbed or swapped
    /// optimizer is [`Error::WrongPhase`]). Groups that have not stepped yet save zeros, which
    /// is what their slots would hold.
    pub fn save<O, B>(opt: &O, groups: &[Group<B>]) -> Result<Self, Error<B::Error>>
    where
        O: Optimizer<State = S>,
        B: SlotAccess,
    {
        let state = opt.state().map_err(Error::widen)?;
        let mut saved = Vec::with_capacity(groups.len());
        for g in groups {
            let spec = opt.slot_spec(&g.options);
            let n = g.buffer.len();
            let mut values = alloc::vec![<B::Scalar as Default>::default(); n];
            let mut slots = Vec::new();
            for slot in saved_slots(&spec, opt.keeps_stash()) {
                let bits = if g.buffer.prepared() == Some(spec) {
                    g.buffer
                        .read_slot(slot, &mut values)
                        .map_err(Error::Backend)?;
                    values.iter().map(|x| x.to_f64().to_bits()).collect()
                } else {
                    alloc::vec![0.0f64.to_bits(); n]
                };
                slots.push(SlotValues { slot, bits });
            }
            saved.push(GroupState {
                len: n as u64,
                spec,
                scalar: B::Scalar::NAME.into(),
                slots,
            });
        }
        Ok(Checkpoint {
            format: FORMAT,
            variant: opt.variant().into(),
            state,
            groups: saved,
        })
    }

    /// Loads the checkpoint into `opt` and `groups` (fresh buffers of the same shapes and
    /// options, or the ones saved). Everything is checked first: the format, the variant, the
    /// number of groups, each group's length, storage type and slot layout (against what `opt`
    /// needs for the group's options), every slot's presence and length, and that every value
    /// is one of the storage type. On any mismatch it is [`Error::InvalidState`] and nothing
    /// changes. A backend error while preparing or writing the slots (which the checks make
    /// unreachable for the reference and ndarray backends) restores the host state but may
    /// leave some slots loaded.
    pub fn load<O, B>(&self, opt: &mut O, groups: &mut [Group<B>]) -> Result<(), Error<B::Error>>
    where
        O: Optimizer<State = S>,
        B: SlotAccess,
    {
        if self.format != FORMAT {
            return Err(mismatch("checkpoint: unknown format version"));
        }
        if self.variant != opt.variant() {
            return Err(mismatch("checkpoint: saved by another variant"));
        }
        if self.groups.len() != groups.len() {
            return Err(mismatch("checkpoint: the number of groups differs"));
        }
        for (saved, g) in self.groups.iter().zip(groups.iter()) {
            let n = g.buffer.len();
            if saved.len != n as u64 {
                return Err(mismatch("checkpoint: a group's number of elements differs"));
            }
            if saved.scalar != B::Scalar::NAME {
                return Err(mismatch("checkpoint: a group's storage type differs"));
            }
            if saved.spec != opt.slot_spec(&g.options) {
                return Err(mismatch(
                    "checkpoint: a group's slot layout differs (other base rule or variant)",
                ));
            }
            let expected = saved_slots(&saved.spec, opt.keeps_stash());
            if !saved.slots.iter().map(|s| s.slot).eq(expected) {
                return Err(mismatch("checkpoint: a group's slots are missing or extra"));
            }
            for s in &saved.slots {
                if s.bits.len() != n {
                    return Err(mismatch("checkpoint: a slot's length differs (truncated?)"));
                }
                if !s.bits.iter().all(|&b| representable::<B::Scalar>(b)) {
                    return Err(mismatch(
                        "checkpoint: a value is not one of the storage type",
                    ));
                }
            }
        }
        let before = opt.state().map_err(Error::widen)?;
        opt.load_state(&self.state).map_err(Error::widen)?;
        for g in groups.iter_mut() {
            let spec = opt.slot_spec(&g.options);
            if let Err(e) = g.buffer.prepare(&spec) {
                // Only allocation happened so far: undo the host state.
                let _ = opt.load_state(&before);
                return Err(Error::Backend(e));
            }
        }
        let mut values = Vec::new();
        for (saved, g) in self.groups.iter().zip(groups.iter_mut()) {
            for s in &saved.slots {
                values.clear();
                values.extend(
                    s.bits
                        .iter()
                        .map(|&b| B::Scalar::from_f64(f64::from_bits(b))),
                );
                if let Err(e) = g.buffer.write_slot(s.slot, &values) {
                    let _ = opt.load_state(&before);
                    return Err(Error::Backend(e));
                }
            }
        }
        Ok(())
    }
}

/// Whether the `f64` with these bits is a value of `T` (rounds to `T` and back unchanged).
fn representable<T: Real>(bits: u64) -> bool {
    let x = f64::from_bits(bits);
    T::from_f64(x).to_f64().to_bits() == bits
}
