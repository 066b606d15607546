//! Shared helpers of the workspace integration tests (`sam-tests`, not published).
//!
//! The central check is [`assert_same_bits`]: an [`NdGroup`] and a reference buffer
//! ([`VecBuffer`], the reference passes over owned memory) holding the same group must agree
//! bit for bit in weights, gradients and every slot. Around it: paired fixtures
//! built from tensor shapes ([`Fixture`]), deterministic value generators, proptest strategies
//! for every pass specification ([`strategy`]), a deterministic gradient oracle for end-to-end
//! runs ([`write_grads_nd`], [`write_grads_ref`]), and, with the `rayon` feature, fixed thread
//! pools to rerun a check under (`pools`, with the `rayon` feature).
//!
//! NaN: Rust does not specify the sign and payload of a NaN produced by arithmetic (and LLVM
//! may commute operands), so two NaNs compare equal here whatever their bits; every other
//! value (including `-0.0` vs `0.0` and subnormals) must match exactly.

use ndarray::{ArrayD, IxDyn};
use sam_core::backend::{ParamBuffer, Real, Reduction, Slot};
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{Error, Group, GroupOptions, Optimizer, StepStatus};
use sam_ndarray::NdGroup;

pub mod dp;
pub mod strategy;
pub mod variants;

/// Exact bit access for the two storage types.
pub trait Bits: Real {
    /// The value's bit pattern, widened to `u64`.
    fn bits(self) -> u64;
    /// Whether the value is a NaN.
    fn nan(self) -> bool;
}

impl Bits for f32 {
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

impl Bits for f64 {
    fn bits(self) -> u64 {
        self.to_bits()
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

impl Bits for half::bf16 {
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

impl Bits for half::f16 {
    fn bits(self) -> u64 {
        u64::from(self.to_bits())
    }
    fn nan(self) -> bool {
        self.is_nan()
    }
}

/// Whether two values are the same: equal bits, or both NaN.
pub fn same<T: Bits>(a: T, b: T) -> bool {
    a.bits() == b.bits() || (a.nan() && b.nan())
}

/// Whether two `f64` are the same: equal bits, or both NaN.
pub fn same_f64(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Checks that two slices are the same element by element (see [`same`]).
pub fn check_slices<T: Bits>(what: &str, nd: &[T], reference: &[T]) -> Result<(), String> {
    if nd.len() != reference.len() {
        return Err(format!(
            "{what}: lengths differ ({} vs {})",
            nd.len(),
            reference.len()
        ));
    }
    match (0..nd.len()).find(|&i| !same(nd[i], reference[i])) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} of {} differs: ndarray {:?} ({:#x}) vs reference {:?} ({:#x})",
            nd.len(),
            nd[i],
            nd[i].bits(),
            reference[i],
            reference[i].bits()
        )),
    }
}

/// Asserts that two slices are the same element by element (see [`same`]).
#[track_caller]
pub fn assert_slices<T: Bits>(what: &str, nd: &[T], reference: &[T]) {
    if let Err(e) = check_slices(what, nd, reference) {
        panic!("{e}");
    }
}

/// The concatenation of a group's arrays, flattened row-major (the group's flat order).
pub fn flat<T: Real>(arrays: &[ArrayD<T>]) -> Vec<T> {
    arrays.iter().flat_map(|a| a.iter().copied()).collect()
}

/// The owned storage of one reference-backend group in the master-weight layouts: `f32` master
/// weights, an optional model copy and a gradient in `G`, `f32` slots (room for every slot any
/// variant uses).
#[derive(Debug, Clone)]
pub struct MasterStore<G> {
    /// The master weights.
    pub master: Vec<f32>,
    /// The model copy (the rounding of `master` when made by [`new`](Self::new)).
    pub model: Option<Vec<G>>,
    /// The gradient.
    pub grad: Vec<G>,
    /// Slot memory.
    pub slots: Vec<f32>,
}

impl<G: Real> MasterStore<G> {
    /// These master weights, a zero gradient, and a model copy if `model_copy`.
    pub fn new(master: Vec<f32>, model_copy: bool) -> Self {
        let n = master.len();
        MasterStore {
            model: model_copy.then(|| master.iter().map(|&w| G::from_f64(w.into())).collect()),
            grad: vec![G::default(); n],
            slots: vec![0.0; 9 * n],
            master,
        }
    }

    /// The reference buffer over this memory (`SliceBuffer::mixed`, with the model copy).
    pub fn buffer(&mut self) -> sam_core::reference::SliceBuffer<'_, f32, G> {
        let b = sam_core::reference::SliceBuffer::mixed(
            &mut self.master,
            &mut self.grad,
            &mut self.slots,
        )
        .expect("consistent lengths");
        match self.model.as_mut() {
            Some(m) => b.with_model_copy(m).expect("model copy length"),
            None => b,
        }
    }
}

/// Checks that an [`NdGroup`] and a reference buffer hold the same bits: weights, gradients,
/// and every slot (present in both with the same values, or absent in both).
pub fn check_same_bits<T: Bits>(nd: &NdGroup<T>, reference: &VecBuffer<T>) -> Result<(), String> {
    check_slices("weights", &flat(nd.weights()), reference.weights())?;
    check_slices("gradient", &flat(nd.grads()), reference.grad())?;
    for slot in Slot::ALL {
        match (nd.slot(slot), reference.slot(slot)) {
            (None, None) => {}
            (Some(a), Some(b)) => check_slices(&format!("slot {slot:?}"), a, b)?,
            (a, b) => {
                return Err(format!(
                    "slot {slot:?}: present in ndarray: {}, in reference: {}",
                    a.is_some(),
                    b.is_some()
                ));
            }
        }
    }
    Ok(())
}

/// Asserts that an [`NdGroup`] and a reference buffer hold the same bits: weights, gradients,
/// and every slot (present in both with the same values, or absent in both).
#[track_caller]
pub fn assert_same_bits<T: Bits>(nd: &NdGroup<T>, reference: &VecBuffer<T>) {
    if let Err(e) = check_same_bits(nd, reference) {
        panic!("{e}");
    }
}

/// Checks that two [`NdGroup`]s hold the same bits (weights, gradients, every slot).
pub fn check_nd_same<T: Bits>(a: &NdGroup<T>, b: &NdGroup<T>) -> Result<(), String> {
    check_slices("weights", &flat(a.weights()), &flat(b.weights()))?;
    check_slices("gradient", &flat(a.grads()), &flat(b.grads()))?;
    for slot in Slot::ALL {
        match (a.slot(slot), b.slot(slot)) {
            (None, None) => {}
            (Some(x), Some(y)) => check_slices(&format!("slot {slot:?}"), x, y)?,
            _ => return Err(format!("slot {slot:?}: present in one group only")),
        }
    }
    Ok(())
}

/// Asserts that two reductions are the same field by field (see [`same_f64`]).
#[track_caller]
pub fn assert_same_reduction(nd: &Reduction, reference: &Reduction) {
    let fields = [
        ("perturb_sq", nd.perturb_sq, reference.perturb_sq),
        ("grad_sq", nd.grad_sq, reference.grad_sq),
        ("stash_sq", nd.stash_sq, reference.stash_sq),
        ("dot", nd.dot, reference.dot),
        ("perturb_max", nd.perturb_max, reference.perturb_max),
        ("grad_max", nd.grad_max, reference.grad_max),
        ("stash_max", nd.stash_max, reference.stash_max),
    ];
    for (name, a, b) in fields {
        assert!(
            same_f64(a, b),
            "reduction.{name}: ndarray {a:e} ({:#x}) vs reference {b:e} ({:#x})",
            a.to_bits(),
            b.to_bits()
        );
    }
    assert_eq!(nd.finite, reference.finite, "reduction.finite");
}

/// Asserts that two groups of [`NdGroup`]s and of reference buffers agree (see
/// [`assert_same_bits`]), group by group.
#[track_caller]
pub fn assert_groups_same<T: Bits>(nd: &[Group<NdGroup<T>>], reference: &[Group<VecBuffer<T>>]) {
    assert_eq!(nd.len(), reference.len(), "number of groups");
    for (a, b) in nd.iter().zip(reference) {
        assert_same_bits(&a.buffer, &b.buffer);
    }
}

/// A reference buffer holding the flat concatenation of an [`NdGroup`]'s weights and gradients
/// (no slots yet).
pub fn reference_of<T: Real>(nd: &NdGroup<T>) -> VecBuffer<T> {
    match VecBuffer::new(flat(nd.weights()), flat(nd.grads())) {
        Ok(b) => b,
        Err(e) => panic!("reference buffer: {e}"),
    }
}

/// Groups of these buffers with these options (one per buffer).
pub fn groups<B: ParamBuffer>(buffers: Vec<B>, opts: &[GroupOptions]) -> Vec<Group<B>> {
    buffers
        .into_iter()
        .zip(opts)
        .map(|(b, o)| Group::with_options(b, *o))
        .collect()
}

/// A deterministic generator (SplitMix64) for test data.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[-1, 1)`.
    pub fn signed(&mut self) -> f64 {
        2.0 * self.unit() - 1.0
    }
}

/// How test values are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Palette {
    /// Moderate values in (-1, 1), some exact zeros.
    Moderate,
    /// Every magnitude class: ±0, subnormal, 1e-30, moderate, 1e30, and the type's extremes.
    Extreme,
    /// Like `Extreme`, plus rare NaN and ±∞.
    NonFinite,
}

/// One value from a palette.
pub fn draw<T: Real>(rng: &mut SplitMix, palette: Palette) -> T {
    let m = rng.signed();
    let class = rng.next_u64() % 64;
    let x = match palette {
        Palette::Moderate => {
            if class < 3 {
                0.0
            } else {
                m
            }
        }
        Palette::Extreme | Palette::NonFinite => match class {
            0..=3 => 0.0,
            4..=5 => -0.0,
            6..=9 => m * if T::NAME == "f32" { 1e-40 } else { 1e-310 },
            10..=15 => m * 1e-30,
            16..=21 => m * 1e30,
            22 => m * if T::NAME == "f32" { 3.0e38 } else { 1.0e300 },
            23 if palette == Palette::NonFinite => f64::NAN,
            24 if palette == Palette::NonFinite => f64::INFINITY * m.signum(),
            _ => m * 2.0,
        },
    };
    T::from_f64(x)
}

/// `n` values from a palette.
pub fn values<T: Real>(rng: &mut SplitMix, n: usize, palette: Palette) -> Vec<T> {
    (0..n).map(|_| draw(rng, palette)).collect()
}

/// An array of this shape filled from a palette.
pub fn array<T: Real>(rng: &mut SplitMix, shape: &[usize], palette: Palette) -> ArrayD<T> {
    let n = shape.iter().product();
    match ArrayD::from_shape_vec(IxDyn(shape), values(rng, n, palette)) {
        Ok(a) => a,
        Err(e) => panic!("shape {shape:?}: {e}"),
    }
}

/// The same group in both backends: an [`NdGroup`] and the reference storage of its flat
/// concatenation.
#[derive(Debug, Clone)]
pub struct Fixture<T: Real> {
    /// The ndarray group.
    pub nd: NdGroup<T>,
    /// The reference buffer.
    pub reference: VecBuffer<T>,
}

impl<T: Real> Fixture<T> {
    /// A group of tensors of these shapes, weights from `weights`, gradients from `grads`.
    pub fn new(shapes: &[Vec<usize>], seed: u64, weights: Palette, grads: Palette) -> Self {
        let mut rng = SplitMix(seed);
        let w: Vec<ArrayD<T>> = shapes.iter().map(|s| array(&mut rng, s, weights)).collect();
        let g: Vec<ArrayD<T>> = shapes.iter().map(|s| array(&mut rng, s, grads)).collect();
        let nd = match NdGroup::with_grads(w, g) {
            Ok(nd) => nd,
            Err(e) => panic!("fixture: {e}"),
        };
        let reference = reference_of(&nd);
        Fixture { nd, reference }
    }
}

/// Writes `g_i = f(i, w_i)` (flat index `i` over the group, computed in `f64`, rounded once)
/// into an [`NdGroup`]'s gradient arrays.
pub fn write_grad_nd<T: Real>(nd: &mut NdGroup<T>, f: impl Fn(usize, f64) -> f64) {
    let (w, mut g) = nd.weights_and_grads_mut();
    let mut i = 0;
    for (t, wt) in w.iter().enumerate() {
        let Some(gs) = g.slice_mut(t) else {
            panic!("gradient {t} not contiguous")
        };
        for (gi, wi) in gs.iter_mut().zip(wt.iter()) {
            *gi = T::from_f64(f(i, wi.to_f64()));
            i += 1;
        }
    }
}

/// Writes `g_i = f(i, w_i)` into a reference buffer's gradient (see [`write_grad_nd`]).
pub fn write_grad_ref<T: Real>(r: &mut VecBuffer<T>, f: impl Fn(usize, f64) -> f64) {
    let (w, g) = r.weights_and_grad();
    for (i, (gi, wi)) in g.iter_mut().zip(w).enumerate() {
        *gi = T::from_f64(f(i, wi.to_f64()));
    }
}

/// A deterministic gradient oracle for end-to-end runs: the gradient of a sum of shifted
/// quadratics and a small periodic term, different per group, element and call (`salt`).
/// Returns NaN where `nan_at == Some(i)`.
pub fn oracle(group: usize, salt: u64, nan_at: Option<usize>) -> impl Fn(usize, f64) -> f64 {
    move |i, w| {
        if nan_at == Some(i) {
            return f64::NAN;
        }
        let target = ((i * 7 + group * 13) % 11) as f64 * 0.25 - 1.0;
        let curvature = 0.5 + ((i + group) % 5) as f64 * 0.3;
        curvature * (w - target) + 0.05 * ((i as f64) * 0.37 + salt as f64 * 0.11).sin()
    }
}

/// Writes the [`oracle`] gradient into every [`NdGroup`] group.
pub fn write_grads_nd<T: Real>(
    groups: &mut [Group<NdGroup<T>>],
    salt: u64,
    nan_at: Option<(usize, usize)>,
) {
    for (k, g) in groups.iter_mut().enumerate() {
        let nan = nan_at.and_then(|(gk, i)| (gk == k).then_some(i));
        write_grad_nd(&mut g.buffer, oracle(k, salt, nan));
    }
}

/// Writes the [`oracle`] gradient into every reference group.
pub fn write_grads_ref<T: Real>(
    groups: &mut [Group<VecBuffer<T>>],
    salt: u64,
    nan_at: Option<(usize, usize)>,
) {
    for (k, g) in groups.iter_mut().enumerate() {
        let nan = nan_at.and_then(|(gk, i)| (gk == k).then_some(i));
        write_grad_ref(&mut g.buffer, oracle(k, salt, nan));
    }
}

/// The standard end-to-end setup: three groups, each as [`NdGroup`]s and as reference storage,
/// with their options: conv-like tensors with SGD (momentum, Nesterov, weight decay); a long
/// vector and a matrix with ASAM around Adam (L2 decay); an empty tensor, a 5-vector and a
/// scalar with AMSGrad AdamW and their own ρ = 0.2. Weights and gradients are moderate values;
/// with the `rayon` feature the groups split work down to 500 elements.
pub fn standard_groups<T: Real>() -> (Vec<NdGroup<T>>, Vec<VecBuffer<T>>, Vec<GroupOptions>) {
    use sam_core::{AdamConfig, BaseRule, SgdConfig};
    let shapes = [
        vec![vec![16, 3, 3, 3], vec![16], vec![16]],
        vec![vec![4100], vec![7, 13]],
        vec![vec![0], vec![5], vec![]],
    ];
    let sgd = SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
        ..Default::default()
    };
    let adam = AdamConfig {
        lr: 0.01,
        weight_decay: 1e-3,
        ..Default::default()
    };
    let adamw = AdamConfig {
        lr: 0.02,
        weight_decay: 1e-2,
        amsgrad: true,
        ..Default::default()
    };
    let (Ok(sgd), Ok(adam), Ok(adamw)) = (
        BaseRule::sgd(sgd),
        BaseRule::adam(adam),
        BaseRule::adamw(adamw),
    ) else {
        panic!("base rules")
    };
    let Ok(third) = GroupOptions::new(adamw).with_rho(0.2) else {
        panic!("rho")
    };
    let opts = vec![
        GroupOptions::new(sgd),
        GroupOptions::new(adam).with_adaptive(true),
        third,
    ];
    let mut nds = Vec::new();
    let mut stores = Vec::new();
    for (k, s) in shapes.iter().enumerate() {
        #[allow(unused_mut)]
        let Fixture { mut nd, reference } =
            Fixture::<T>::new(s, 7 + k as u64, Palette::Moderate, Palette::Moderate);
        #[cfg(feature = "rayon")]
        nd.set_min_parallel_len(500);
        nds.push(nd);
        stores.push(reference);
    }
    (nds, stores, opts)
}

/// Thread pools of 1, 2, 3 and 7 threads (built once), to rerun a check under each.
#[cfg(feature = "rayon")]
pub fn pools() -> &'static [rayon::ThreadPool] {
    use std::sync::OnceLock;
    static POOLS: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        [1, 2, 3, 7]
            .into_iter()
            .map(
                |k| match rayon::ThreadPoolBuilder::new().num_threads(k).build() {
                    Ok(p) => p,
                    Err(e) => panic!("thread pool of {k}: {e}"),
                },
            )
            .collect()
    })
}

/// Runs `check` once on the current thread; with the `rayon` feature, also inside each of
/// `pools` (so the same check sees 1, 2, 3 and 7 threads).
pub fn on_every_pool(check: impl Fn() + Sync) {
    check();
    #[cfg(feature = "rayon")]
    for pool in pools() {
        pool.install(&check);
    }
}

/// One closure-driven step on reference groups with the [`oracle`] gradient of evaluation
/// `calls` (incremented by each evaluation).
pub fn oracle_step<O: Optimizer>(
    opt: &mut O,
    gs: &mut [Group<VecBuffer<f64>>],
    calls: &std::cell::Cell<u64>,
) -> StepStatus {
    let report = opt.step(gs, |gs: &mut [Group<VecBuffer<f64>>]| {
        write_grads_ref(gs, calls.replace(calls.get() + 1), None);
        Ok::<_, Error<SliceError>>(())
    });
    match report {
        Ok(r) => r.status,
        Err(e) => panic!("step failed: {e}"),
    }
}

/// The weights and base-rule state (and the averages, with `averages`) of two reference group
/// sets, bit for bit: what carries a run from one step to the next (for every variant but
/// LookSAM, whose stash carries its stored direction; the backup is scratch).
pub fn check_same_state<T: Bits>(
    a: &[Group<VecBuffer<T>>],
    b: &[Group<VecBuffer<T>>],
    averages: bool,
) -> Result<(), String> {
    for (k, (ga, gb)) in a.iter().zip(b).enumerate() {
        let (sa, sb) = (&ga.buffer, &gb.buffer);
        let mut roles = vec![];
        if let Some(spec) = sa.spec() {
            roles.extend((0..spec.state).map(Slot::State));
            if averages {
                roles.extend((0..spec.averages).map(Slot::Average));
            }
        }
        check_slices("w", sa.weights(), sb.weights())
            .and_then(|_| {
                roles.iter().try_for_each(|&r| {
                    let (x, y) = (sa.slot(r).unwrap_or(&[]), sb.slot(r).unwrap_or(&[]));
                    check_slices(&format!("{r:?}"), x, y)
                })
            })
            .map_err(|e| format!("group {k}: {e}"))?;
    }
    Ok(())
}

/// Runs `opt` for `steps` closure steps on the [`standard_groups`] in `f32`, as [`NdGroup`]s and
/// as reference buffers side by side with the [`oracle`] gradients, asserting after every step
/// that they agree bit for bit ([`assert_groups_same`]); returns the gradient evaluations.
pub fn assert_nd_runs_as_reference<O: Optimizer + Clone>(opt: &O, steps: usize) -> u64 {
    assert_nd_runs_as_reference_in::<f32, O>(opt, variants::keep, steps)
}

/// [`assert_nd_runs_as_reference`] with storage type `T` and the group options changed by `map`.
pub fn assert_nd_runs_as_reference_in<T: Bits, O: Optimizer + Clone>(
    opt: &O,
    map: variants::MapOptions,
    steps: usize,
) -> u64 {
    use sam_ndarray::NdError;
    use std::cell::Cell;
    let (nds, stores, opts) = standard_groups::<T>();
    let opts: Vec<GroupOptions> = opts.into_iter().map(map).collect();
    let mut a = groups(nds, &opts);
    let mut b = groups(stores, &opts);
    let (mut oa, mut ob) = (opt.clone(), opt.clone());
    let (ca, cb) = (Cell::new(0u64), Cell::new(0u64));
    for _ in 0..steps {
        let ra = oa.step(&mut a, |gs: &mut [Group<NdGroup<T>>]| {
            write_grads_nd(gs, ca.replace(ca.get() + 1), None);
            Ok::<_, Error<NdError>>(())
        });
        let rb = ob.step(&mut b, |gs: &mut [Group<VecBuffer<T>>]| {
            write_grads_ref(gs, cb.replace(cb.get() + 1), None);
            Ok::<_, Error<SliceError>>(())
        });
        match (ra, rb) {
            (Ok(x), Ok(y)) => assert_eq!(x.status, y.status),
            (x, y) => panic!("steps failed: {:?} / {:?}", x.err(), y.err()),
        }
        assert_groups_same(&a, &b);
    }
    assert_eq!(ca.get(), cb.get());
    ca.get()
}
