//! Read and write access to a backend's storage, for the checks: [`Inspect`] for the reference
//! backend ([`SliceBuffer`]) and for `sam-ndarray` ([`NdGroup`]).

use sam_core::backend::{ParamBuffer, Real, Slot};
use sam_core::checkpoint::SlotAccess;
use sam_core::reference::SliceBuffer;
use sam_ndarray::NdGroup;

/// Whether a role holds state that must survive an error or a skip (base-rule state and
/// averages); backup and stash are scratch.
pub fn kept(role: Slot) -> bool {
    matches!(role, Slot::State(_) | Slot::Average(_))
}

/// Whether a role carries state from one step to the next (what a checkpoint saves): the
/// [`kept`] roles, and the stash of an optimizer that keeps it (LookSAM's stored direction).
pub fn persistent(role: Slot, keeps_stash: bool) -> bool {
    kept(role) || (keeps_stash && role == Slot::Stash)
}

/// Storage access the checks need, on top of [`ParamBuffer`]
/// and checkpoints' [`SlotAccess`].
pub trait Inspect: SlotAccess {
    /// The weights, widened to `f64`, in the flat element order.
    fn weights_f64(&self) -> Vec<f64>;
    /// The gradient, widened.
    fn grads_f64(&self) -> Vec<f64>;
    /// One slot's values, widened, if the buffer holds it now.
    fn slot_f64(&self, slot: Slot) -> Option<Vec<f64>>;
    /// Overwrites the gradient (values rounded to the element type); `g.len() == len()`.
    fn set_grads(&mut self, g: &[f64]);
    /// Overwrites the weights (as a framework might between steps).
    fn set_weights(&mut self, w: &[f64]);
    /// Makes the buffer as a fresh one holding the same weights and gradient, for a checkpoint
    /// round trip: `sam-ndarray` builds a new `NdGroup` (no slots); the reference backend
    /// cannot forget its slot layout and overwrites every prepared slot with `fill` instead.
    fn refresh(&mut self, fill: f64);
}

/// The bits of `x` widened to `f64`, every NaN as `u64::MAX` (NaN payloads are not
/// reproducible).
pub fn canonical_bits<T: Real>(x: T) -> u64 {
    let v = x.to_f64();
    if v.is_nan() { u64::MAX } else { v.to_bits() }
}

fn widen<T: Real>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

impl<T: Real> Inspect for SliceBuffer<'_, T> {
    fn weights_f64(&self) -> Vec<f64> {
        widen(self.weights())
    }

    fn grads_f64(&self) -> Vec<f64> {
        widen(self.grad())
    }

    fn slot_f64(&self, slot: Slot) -> Option<Vec<f64>> {
        self.slot(slot).map(widen)
    }

    fn set_grads(&mut self, g: &[f64]) {
        for (d, s) in self.grad_mut().iter_mut().zip(g) {
            *d = T::from_f64(*s);
        }
    }

    fn set_weights(&mut self, w: &[f64]) {
        for (d, s) in self.weights_mut().iter_mut().zip(w) {
            *d = T::from_f64(*s);
        }
    }

    fn refresh(&mut self, fill: f64) {
        let values = vec![T::from_f64(fill); self.len()];
        for role in Slot::ALL {
            if self.slot(role).is_some() {
                // A prepared slot of the group's length: cannot fail.
                let _ = self.write_slot(role, &values);
            }
        }
    }
}

impl<T: Real> Inspect for NdGroup<T> {
    fn weights_f64(&self) -> Vec<f64> {
        self.weights()
            .iter()
            .flat_map(|a| a.iter().map(|x| x.to_f64()))
            .collect()
    }

    fn grads_f64(&self) -> Vec<f64> {
        self.grads()
            .iter()
            .flat_map(|a| a.iter().map(|x| x.to_f64()))
            .collect()
    }

    fn slot_f64(&self, slot: Slot) -> Option<Vec<f64>> {
        self.slot(slot).map(widen)
    }

    fn set_grads(&mut self, g: &[f64]) {
        let mut it = g.iter();
        let mut grads = self.grads_mut();
        for mut a in grads.iter_mut() {
            for (d, s) in a.iter_mut().zip(&mut it) {
                *d = T::from_f64(*s);
            }
        }
    }

    fn set_weights(&mut self, w: &[f64]) {
        let mut it = w.iter();
        for mut a in self.weights_mut() {
            for (d, s) in a.iter_mut().zip(&mut it) {
                *d = T::from_f64(*s);
            }
        }
    }

    fn refresh(&mut self, _: f64) {
        if let Ok(fresh) = NdGroup::with_grads(self.weights().to_vec(), self.grads().to_vec()) {
            *self = fresh;
        }
    }
}

/// The storage of one group at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSnap {
    /// Weights.
    pub w: Vec<f64>,
    /// Gradient.
    pub g: Vec<f64>,
    /// Each role of [`Slot::ALL`], if held.
    pub slots: [Option<Vec<f64>>; 9],
}

impl GroupSnap {
    /// Takes a snapshot.
    pub fn of<B: Inspect>(b: &B) -> Self {
        GroupSnap {
            w: b.weights_f64(),
            g: b.grads_f64(),
            slots: Slot::ALL.map(|r| b.slot_f64(r)),
        }
    }

    /// One role's values.
    pub fn slot(&self, role: Slot) -> Option<&[f64]> {
        Slot::ALL
            .iter()
            .position(|r| *r == role)
            .and_then(|i| self.slots[i].as_deref())
    }
}

/// Bit-for-bit equality (tells `-0.0` from `0.0`, compares NaN payloads).
pub fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Bit-for-bit equality except that any NaN equals any NaN (payloads and signs of NaNs produced
/// by arithmetic are unspecified).
pub fn same_modulo_nan(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

/// The first index where two vectors differ bitwise, for messages.
pub fn first_diff(a: &[f64], b: &[f64]) -> String {
    if a.len() != b.len() {
        return format!("lengths {} and {}", a.len(), b.len());
    }
    match a
        .iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
    {
        Some(i) => format!("element {i}: {:e} vs {:e}", a[i], b[i]),
        None => "equal".into(),
    }
}
