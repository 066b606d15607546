//! Replays with 16-bit storage: how far a case's trajectory moves when its weights, gradients
//! and optimizer state are stored in `bf16` or `f16` ([`Storage16`]), or when only the
//! gradients and a model copy of the weights are, with `f32` master weights and optimizer state
//! ([`Master16`]). The objective still computes in the case's dtype, at the 16-bit weights. A
//! measurement, not a verdict: the cases' tolerances are for their own dtype.

use half::{bf16, f16};
use ndarray::ArrayD;
use sam_core::backend::Real;
use sam_core::reference::VecBuffer;
use sam_ndarray::NdGroup;

use crate::backend::{Element, ReplayBackend, average_of, convert_into, tensors};
use crate::case::{Case, Dtype};
use crate::replay::{ReplayError, Trajectory, replay};

/// The reference backend with every stored value in `H` (`bf16` or `f16`): weights are rounded
/// into it, gradients rounded on write, weights and averages widened on read.
#[derive(Debug, Clone, Copy, Default)]
pub struct Storage16<H>(core::marker::PhantomData<H>);

impl<H> Storage16<H> {
    /// The backend.
    pub fn new() -> Self {
        Storage16(core::marker::PhantomData)
    }
}

fn narrow<T: Real, H: Real>(v: &[T]) -> Vec<H> {
    v.iter().map(|x| H::from_f64(x.to_f64())).collect()
}

impl<H: Real> ReplayBackend for Storage16<H> {
    type Buf<T: Element> = VecBuffer<H>;

    fn name(&self) -> &'static str {
        H::NAME
    }

    fn make<T: Element>(&self, init: Vec<T>, _lens: &[usize]) -> Result<VecBuffer<H>, String> {
        let g = vec![H::default(); init.len()];
        VecBuffer::new(narrow(&init), g).map_err(|e| e.to_string())
    }

    fn read_weights<T: Element>(&self, buf: &VecBuffer<H>, out: &mut [T]) -> Result<(), String> {
        convert_into(out, buf.weights())
    }

    fn write_grad<T: Element>(&self, buf: &mut VecBuffer<H>, grad: &[T]) -> Result<(), String> {
        convert_into(buf.grad_mut(), grad)
    }

    fn read_average<T: Element>(
        &self,
        buf: &VecBuffer<H>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        convert_into(out, average_of(buf, k)?)
    }
}

/// sam-ndarray's master-weight layout (docs/design.md §5a): `f32` master weights and optimizer
/// state, a model copy of the weights and the gradients in `H`. The objective computes at the
/// model copy, and the trajectory is the model copy's (the weights the model computes and is
/// evaluated with); gradients are rounded into `H` on write.
#[derive(Debug, Clone, Copy, Default)]
pub struct Master16<H>(core::marker::PhantomData<H>);

impl<H> Master16<H> {
    /// The backend.
    pub fn new() -> Self {
        Master16(core::marker::PhantomData)
    }
}

/// Every tensor of a group, flattened, in order.
fn flat<X: Copy>(arrays: &[ArrayD<X>]) -> impl Iterator<Item = X> + '_ {
    arrays.iter().flat_map(|a| a.iter().copied())
}

impl<H: Real> ReplayBackend for Master16<H> {
    type Buf<T: Element> = NdGroup<f32, H>;

    fn name(&self) -> &'static str {
        match H::NAME {
            "bf16" => "bf16-master",
            _ => "f16-master",
        }
    }

    fn make<T: Element>(&self, init: Vec<T>, lens: &[usize]) -> Result<NdGroup<f32, H>, String> {
        let master: Vec<f32> = narrow(&init);
        NdGroup::mixed(tensors(&master, lens)?)
            .and_then(NdGroup::with_model_copy)
            .map_err(|e| e.to_string())
    }

    fn read_weights<T: Element>(&self, buf: &NdGroup<f32, H>, out: &mut [T]) -> Result<(), String> {
        let model = buf.model().ok_or("no model copy")?;
        convert_into(out, &flat(model).collect::<Vec<H>>())
    }

    fn write_grad<T: Element>(&self, buf: &mut NdGroup<f32, H>, grad: &[T]) -> Result<(), String> {
        let mut grads = buf.grads_mut();
        let mut at = 0;
        for i in 0..grads.len() {
            let g = grads.slice_mut(i).ok_or("non-contiguous gradient")?;
            let n = g.len();
            convert_into(g, grad.get(at..at + n).ok_or("gradient too short")?)?;
            at += n;
        }
        Ok(())
    }

    fn read_average<T: Element>(
        &self,
        buf: &NdGroup<f32, H>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        let avg = buf
            .slot(sam_core::backend::Slot::Average(k))
            .ok_or_else(|| format!("no average {k}"))?;
        convert_into(out, avg)
    }
}

/// How far a replay is from a case's expected trajectory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deviation {
    /// Steps replayed.
    pub steps: usize,
    /// Elements of θ.
    pub elements: usize,
    /// `max_t ‖θ_t − θ*_t‖∞ / ‖θ*_t‖∞` over the steps (normwise relative).
    pub params_rel: f64,
    /// The same after the last step.
    pub final_rel: f64,
    /// `max_{t,i} |θ_t,i − θ*_t,i|`.
    pub params_abs: f64,
    /// `max_t |L_t − L*_t| / |L*_t|` (loss before each step).
    pub loss_rel: f64,
}

fn max_abs(v: impl Iterator<Item = f64>) -> f64 {
    v.fold(0.0, |m, x| if x.abs() > m { x.abs() } else { m })
}

/// The deviation of `traj` from `case.expected`; `None` if the shapes differ.
pub fn deviation(case: &Case, traj: &Trajectory) -> Option<Deviation> {
    let e = &case.expected;
    if traj.params.len() != e.params.len() || traj.loss.len() != e.loss.len() {
        return None;
    }
    let mut d = Deviation {
        steps: e.params.len(),
        elements: e.params.first().map_or(0, Vec::len),
        params_rel: 0.0,
        final_rel: 0.0,
        params_abs: 0.0,
        loss_rel: 0.0,
    };
    for (got, exp) in traj.params.iter().zip(&e.params) {
        if got.len() != exp.len() {
            return None;
        }
        let diff = max_abs(got.iter().zip(exp).map(|(a, b)| a - b));
        let scale = max_abs(exp.iter().copied());
        let rel = if scale > 0.0 { diff / scale } else { diff };
        d.params_abs = d.params_abs.max(diff);
        d.params_rel = d.params_rel.max(rel);
        d.final_rel = rel;
    }
    for (a, b) in traj.loss.iter().zip(&e.loss) {
        let rel = if *b != 0.0 {
            (a - b).abs() / b.abs()
        } else {
            (a - b).abs()
        };
        d.loss_rel = d.loss_rel.max(rel);
    }
    Some(d)
}

/// Replays `case` on `backend` (computing in the case's dtype) and measures its deviation
/// from the expected trajectory.
pub fn measure<B: ReplayBackend>(case: &Case, backend: &B) -> Result<Deviation, ReplayError> {
    let traj = match case.dtype {
        Dtype::F32 => replay::<f32, _>(case, backend)?,
        Dtype::F64 => replay::<f64, _>(case, backend)?,
    };
    deviation(case, &traj)
        .ok_or_else(|| ReplayError("the replay's trajectory has another shape".into()))
}

/// The storage layouts [`measure_named`] knows, as named on the command line.
pub const STORAGE_NAMES: [&str; 4] = ["bf16", "f16", "bf16-master", "f16-master"];

/// [`measure`] for a storage layout named on the command line: `bf16` or `f16` (everything
/// stored in it, [`Storage16`]), `bf16-master` or `f16-master` ([`Master16`]).
pub fn measure_named(storage: &str, case: &Case) -> Result<Deviation, ReplayError> {
    match storage {
        "bf16" => measure(case, &Storage16::<bf16>::new()),
        "f16" => measure(case, &Storage16::<f16>::new()),
        "bf16-master" => measure(case, &Master16::<bf16>::new()),
        "f16-master" => measure(case, &Master16::<f16>::new()),
        other => Err(ReplayError(format!(
            "unknown storage `{other}` (one of {})",
            STORAGE_NAMES.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str) -> Case {
        let path = format!("{}/cases/{name}.json", env!("CARGO_MANIFEST_DIR"));
        crate::case::parse_case(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn bf16_storage_deviates_by_about_its_precision_and_f16_by_less() {
        let c = case("f32_sam_sgd_momentum");
        let b = measure_named("bf16", &c).unwrap();
        let h = measure_named("f16", &c).unwrap();
        // bf16 keeps 8 significant bits (relative spacing 2^-8), f16 11 (2^-11): neither is
        // exact, bf16 is the coarser, and both stay within a few hundred of their ulps.
        assert!(b.params_rel > 2f64.powi(-12) && b.params_rel < 0.2, "{b:?}");
        assert!(h.params_rel < b.params_rel, "{h:?} vs {b:?}");
        assert_eq!(b.steps, c.expected.params.len());
    }

    #[test]
    fn the_case_dtype_itself_has_no_deviation_beyond_its_tolerance() {
        let c = case("f32_sam_sgd_momentum");
        let traj = replay::<f32, _>(&c, &crate::backend::CoreBackend).unwrap();
        let d = deviation(&c, &traj).unwrap();
        assert!(d.params_rel < 1e-5, "{d:?}");
        assert!(measure_named("f8", &c).is_err());
    }

    #[test]
    fn master_weights_deviate_by_about_the_model_copy_rounding_and_less_than_pure_storage() {
        // Pure bf16 storage loses updates below half an ulp of the weight; the f32 master
        // keeps them, so its model copy stays within a few roundings of the expected weights.
        let c = case("f32_sam_sgd_momentum");
        let pure = measure_named("bf16", &c).unwrap();
        let master = measure_named("bf16-master", &c).unwrap();
        assert!(
            master.params_rel < pure.params_rel,
            "{master:?} vs {pure:?}"
        );
        assert!(master.params_rel < 4.0 * 2f64.powi(-8), "{master:?}");
        assert!(master.params_rel > 0.0, "{master:?}");
    }
}
