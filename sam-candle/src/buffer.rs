//! [`VarBuffer`]: one param group of candle `Var`s as a sam-core [`ParamBuffer`].
//!
//! Each element-wise pass runs sam-ndarray's fused CPU passes ([`sam_ndarray::slices`]) on
//! every parameter in turn, directly on the `Var`'s storage and its gradient's (see
//! [`crate::storage`]), with the parameter's slots in a [`SlotMemory`] the buffer owns. The
//! reduction runs in the canonical order over the concatenation of the group's parameters, so a
//! group gives the same bits as the reference backend over the same values laid end to end.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use sam_core::backend::{
    AverageFold, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, Slot, SlotSpec, UpdateSpec,
};
use sam_core::reference::{SliceError, SlotMemory};
use sam_ndarray::NdError;
use sam_ndarray::slices::{self, TensorMut};

use crate::element::Element;
use crate::error::{CandleError, Role};
use crate::storage::{self, read_all, write, write2};

/// One parameter: the `Var`, its slots, and its gradient in the current step.
#[derive(Debug)]
struct Param<T> {
    name: String,
    var: Var,
    len: usize,
    slots: SlotMemory<T>,
    /// The gradient of the current step; `None` leaves the parameter out of the step.
    grad: Option<Tensor>,
}

/// A group of candle `Var`s (a torch param group) whose passes run in place on the `Var`s'
/// storage, the gradients read from a [`GradStore`].
///
/// Load each backward pass's gradients with [`load_grads`](Self::load_grads) (the
/// [`SamCandle`](crate::SamCandle) driver does it for you). A `Var` without a gradient in the
/// first backward pass of a step is left out of the whole step, as upstream skips
/// `p.grad is None`: it is not perturbed, adds nothing to the norms, and neither it nor its base
/// state moves (WASAM's averages still fold its unchanged weights, as SWA averages every
/// parameter). One that had a gradient in the first pass must have one in the second
/// ([`CandleError::MissingGradient`] otherwise).
///
/// Only CPU `Var`s of the element type `T` (`f32` or `f64`), contiguous, are served; anything
/// else is refused with an error that names the parameter.
#[derive(Debug)]
pub struct VarBuffer<T: Element> {
    params: Vec<Param<T>>,
    len: usize,
    spec: Option<SlotSpec>,
    /// Set by `perturb`, cleared when the step ends: the second gradient must cover the same
    /// parameters as the first.
    perturbed: bool,
}

impl<T: Element> VarBuffer<T> {
    /// A group of `vars`, named `#0`, `#1`, … in errors.
    pub fn new(vars: Vec<Var>) -> Result<Self, CandleError> {
        Self::named(
            vars.into_iter()
                .enumerate()
                .map(|(i, v)| (format!("#{i}"), v)),
        )
    }

    /// A group of named `Var`s (for example a `VarMap`'s, whose names errors then use).
    pub fn named(vars: impl IntoIterator<Item = (String, Var)>) -> Result<Self, CandleError> {
        let mut params: Vec<Param<T>> = Vec::new();
        let mut storages = Vec::new();
        for (name, var) in vars {
            check_tensor::<T>(&name, Role::Weight, var.as_tensor())?;
            let id = storage::storage_id(var.as_tensor());
            if storages.contains(&id) {
                return Err(CandleError::DuplicateVar { param: name });
            }
            storages.push(id);
            params.push(Param {
                len: var.elem_count(),
                name,
                var,
                slots: SlotMemory::new(),
                grad: None,
            });
        }
        let len = params.iter().map(|p| p.len).sum();
        Ok(Self {
            params,
            len,
            spec: None,
            perturbed: false,
        })
    }

    /// A group of every `Var` of a `VarMap` whose name starts with `prefix` (`""` for all), in
    /// name order (a deterministic order, hence a deterministic reduction), named as in the map.
    pub fn from_varmap(map: &candle_nn::VarMap, prefix: &str) -> Result<Self, CandleError> {
        let data = map
            .data()
            .lock()
            .map_err(|_| CandleError::Candle("the VarMap's lock is poisoned".into()))?;
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(name, v)| (name.clone(), v.clone()))
            .collect();
        drop(data);
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::named(vars)
    }

    /// The group's `Var`s, in order.
    pub fn vars(&self) -> impl ExactSizeIterator<Item = &Var> {
        self.params.iter().map(|p| &p.var)
    }

    /// The values of one slot of parameter `i`, if prepared (to inspect or checkpoint).
    pub fn slot(&self, i: usize, slot: Slot) -> Option<&[T]> {
        self.params.get(i)?.slots.slot(slot)
    }

    /// Takes each `Var`'s gradient from `grads` for the coming pass. Between the two backward
    /// passes of a step the parameters left out by the first stay out. Everything is checked
    /// before anything is kept: on error the buffer holds the gradients it held before.
    pub fn load_grads(&mut self, grads: &GradStore) -> Result<(), CandleError> {
        let mut storages: Vec<usize> = self
            .params
            .iter()
            .map(|p| storage::storage_id(p.var.as_tensor()))
            .collect();
        let mut found = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let in_step = !self.perturbed || p.grad.is_some();
            let g = match grads.get(p.var.as_tensor()) {
                Some(g) if in_step => g,
                None if self.perturbed && p.grad.is_some() => {
                    return Err(CandleError::MissingGradient {
                        param: p.name.clone(),
                    });
                }
                _ => {
                    found.push(None);
                    continue;
                }
            };
            check_tensor::<T>(&p.name, Role::Gradient, g)?;
            if g.dims() != p.var.dims() {
                return Err(CandleError::ShapeMismatch {
                    param: p.name.clone(),
                    weight: p.var.dims().to_vec(),
                    grad: g.dims().to_vec(),
                });
            }
            let id = storage::storage_id(g);
            if storages.contains(&id) {
                return Err(CandleError::AliasedGradient {
                    param: p.name.clone(),
                });
            }
            storages.push(id);
            found.push(Some(g.clone()));
        }
        for (p, g) in self.params.iter_mut().zip(found) {
            p.grad = g;
        }
        Ok(())
    }

    /// Drops the gradients the buffer holds (they are dropped at the end of every step too).
    pub fn clear_grads(&mut self) {
        for p in &mut self.params {
            p.grad = None;
        }
    }

    fn spec(&self) -> Result<SlotSpec, CandleError> {
        self.spec.ok_or_else(missing_slot)
    }

    /// Runs an element-wise pass on every parameter in the step, on its weights and gradient.
    fn each_in_step(
        &mut self,
        pass: impl Fn(&SlotSpec, TensorMut<'_, T>) -> Result<(), NdError>,
    ) -> Result<(), CandleError> {
        let spec = self.spec()?;
        for p in &mut self.params {
            let Some(g) = &p.grad else { continue };
            let slots = p.slots.values_mut();
            write2(p.var.as_tensor(), g, |w: &mut [T], g: &mut [T]| {
                pass(&spec, TensorMut { w, g, slots })
            })??;
        }
        Ok(())
    }

    /// Runs a weights-only pass on every parameter `which` selects.
    fn each_weight(
        &mut self,
        which: Which,
        pass: impl Fn(&SlotSpec, TensorMut<'_, T>) -> Result<(), NdError>,
    ) -> Result<(), CandleError> {
        let spec = self.spec()?;
        for p in &mut self.params {
            if !which.selects(p.grad.is_some()) {
                continue;
            }
            let slots = p.slots.values_mut();
            write(p.var.as_tensor(), |w: &mut [T]| {
                pass(
                    &spec,
                    TensorMut {
                        w,
                        g: &mut [],
                        slots,
                    },
                )
            })??;
        }
        Ok(())
    }
}
/// Which parameters a weight pass visits.
#[derive(Clone, Copy)]
enum Which {
    InStep,
    OutOfStep,
    All,
}

impl Which {
    fn selects(self, in_step: bool) -> bool {
        match self {
            Which::InStep => in_step,
            Which::OutOfStep => !in_step,
            Which::All => true,
        }
    }
}

/// Slot copies in the group's element order: each parameter's slot, parameter after parameter.
impl<T: Element> sam_core::checkpoint::SlotAccess for VarBuffer<T> {
    fn prepared(&self) -> Option<SlotSpec> {
        self.spec
    }

    fn read_slot(&self, slot: Slot, out: &mut [T]) -> Result<(), CandleError> {
        if out.len() != self.len {
            return Err(missing_slot());
        }
        let mut at = 0;
        for p in &self.params {
            let src = p.slots.slot(slot).ok_or_else(missing_slot)?;
            let dst = out.get_mut(at..at + src.len()).ok_or_else(missing_slot)?;
            dst.copy_from_slice(src);
            at += src.len();
        }
        Ok(())
    }

    fn write_slot(&mut self, slot: Slot, values: &[T]) -> Result<(), CandleError> {
        let lens: Option<usize> = self
            .params
            .iter()
            .map(|p| p.slots.slot(slot).map(<[T]>::len))
            .sum();
        if lens != Some(values.len()) {
            return Err(missing_slot());
        }
        let mut at = 0;
        for p in &mut self.params {
            if let Some(dst) = p.slots.slot_mut(slot) {
                let n = dst.len();
                dst.copy_from_slice(&values[at..at + n]);
                at += n;
            }
        }
        Ok(())
    }
}

fn missing_slot() -> CandleError {
    CandleError::Slots(SliceError::MissingSlot)
}

/// Checks a tensor's dtype, device and layout.
fn check_tensor<T: Element>(param: &str, role: Role, t: &Tensor) -> Result<(), CandleError> {
    if t.dtype() != T::DTYPE {
        return Err(CandleError::DType {
            param: param.to_owned(),
            role,
            expected: T::DTYPE,
            found: t.dtype(),
        });
    }
    if !t.device().is_cpu() {
        return Err(CandleError::Device {
            param: param.to_owned(),
            role,
        });
    }
    if !storage::is_contiguous(t) {
        return Err(CandleError::NotContiguous {
            param: param.to_owned(),
            role,
        });
    }
    Ok(())
}

impl<T: Element> ParamBuffer for VarBuffer<T> {
    type Scalar = T;
    type Error = CandleError;

    fn len(&self) -> usize {
        self.len
    }

    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), CandleError> {
        for p in &mut self.params {
            p.slots.prepare(spec, p.len)?;
        }
        self.spec = Some(*spec);
        Ok(())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, CandleError> {
        let in_step: Vec<&Param<T>> = self.params.iter().filter(|p| p.grad.is_some()).collect();
        let tensors: Vec<&Tensor> = in_step
            .iter()
            .flat_map(|p| [p.var.as_tensor()].into_iter().chain(p.grad.as_ref()))
            .collect();
        let stashes: Vec<&[T]> = if spec.reads_stash() {
            in_step
                .iter()
                .map(|p| p.slots.slot(Slot::Stash))
                .collect::<Option<_>>()
                .ok_or_else(missing_slot)?
        } else {
            Vec::new()
        };
        let r = read_all(&tensors, |wg: &[&[T]]| {
            let w: Vec<&[T]> = wg.iter().step_by(2).copied().collect();
            let g: Vec<&[T]> = wg.iter().skip(1).step_by(2).copied().collect();
            slices::reduce(&w, &g, &stashes, spec)
        })??;
        Ok(r)
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), CandleError> {
        self.each_in_step(|layout, t| slices::perturb(spec, layout, t))?;
        self.perturbed = true;
        Ok(())
    }

    fn restore(&mut self) -> Result<(), CandleError> {
        self.each_weight(Which::InStep, slices::restore)?;
        self.perturbed = false;
        Ok(())
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), CandleError> {
        self.each_in_step(|layout, t| slices::update(spec, layout, t))?;
        // Parameters left out of the step still enter the averages with their weights.
        let fold = spec.average;
        self.each_weight(Which::OutOfStep, |layout, t| {
            slices::fold_averages(&fold, layout, t)
        })?;
        self.perturbed = false;
        self.clear_grads();
        Ok(())
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), CandleError> {
        self.each_weight(Which::All, |layout, t| {
            slices::fold_averages(fold, layout, t)
        })
    }

    fn swap_average(&mut self, k: u8) -> Result<(), CandleError> {
        self.each_weight(Which::All, |layout, t| slices::swap_average(k, layout, t))
    }
}
