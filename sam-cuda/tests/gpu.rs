//! Tests that need a GPU: agreement with the reference backend, determinism, large groups.
//!
//! Without a usable device (no driver, no GPU, or no libnvrtc) every test prints why it is
//! skipped and passes; set `SAM_CUDA_REQUIRE_GPU=1` to make them fail instead (on a GPU
//! machine, so that a broken setup cannot pass silently).
//!
//! Tolerance: none. The claim under test is bit identity with
//! `sam_core::reference::SliceBuffer` for every pass (elementwise passes: same f64 operations,
//! `--fmad=false`; reduce: sam-core's canonical order), so every comparison is on bit patterns.
//! Reductions are additionally checked against a 1e-14 relative bound first, so that a
//! failure says whether the order or the math is off.

mod common;

use std::error::Error;

use common::{Rng, resnet50_shapes};
use sam_core::backend::{
    AverageFold, BaseStep, GradMix, ParamBuffer, PerturbSpec, PostMix, Real, ReduceSpec, Reduction,
    Slot, SlotSpec, UpdateSpec, Weighting,
};
use sam_core::reference::SliceBuffer;
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Group, GroupOptions, Gsam, GsamConfig, LookSam,
    LookSamConfig, Optimizer, Perturbation, RhoSchedule, Sam, SamConfig, SamOptimizer, Schedule,
    SgdConfig, StepStatus, Wasam, Wsam, WsamConfig,
};
use sam_cuda::{Context, CudaGroup, CudaReal, HostTensor};

type BoxError = Box<dyn Error>;

fn gpu(test: &str) -> Option<Context> {
    match Context::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            let required = std::env::var("SAM_CUDA_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{test}: no usable GPU but SAM_CUDA_REQUIRE_GPU=1: {e}"
            );
            println!("{test}: skipped: no usable GPU ({e})");
            None
        }
    }
}

fn bits<T: Real>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

fn first_difference<T: Real>(a: &[T], b: &[T]) -> Option<(usize, f64, f64)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| x.to_f64().to_bits() != y.to_f64().to_bits())
        .map(|(i, (x, y))| (i, x.to_f64(), y.to_f64()))
}

fn assert_same<T: Real>(what: &str, gpu: &[T], reference: &[T]) {
    assert_eq!(gpu.len(), reference.len(), "{what}: lengths");
    if let Some((i, x, y)) = first_difference(gpu, reference) {
        panic!("{what}: element {i} differs: gpu {x:e} vs reference {y:e}");
    }
}

fn assert_reduction(what: &str, gpu: &Reduction, reference: &Reduction) {
    let pairs = [
        ("perturb_sq", gpu.perturb_sq, reference.perturb_sq),
        ("grad_sq", gpu.grad_sq, reference.grad_sq),
        ("stash_sq", gpu.stash_sq, reference.stash_sq),
        ("dot", gpu.dot, reference.dot),
        ("perturb_max", gpu.perturb_max, reference.perturb_max),
        ("grad_max", gpu.grad_max, reference.grad_max),
        ("stash_max", gpu.stash_max, reference.stash_max),
    ];
    for (name, x, y) in pairs {
        let scale = x.abs().max(y.abs()).max(f64::MIN_POSITIVE);
        assert!(
            (x - y).abs() <= 1e-14 * scale,
            "{what}.{name}: {x:e} vs {y:e} (beyond 1e-14 relative)"
        );
        assert_eq!(
            x.to_bits(),
            y.to_bits(),
            "{what}.{name}: {x:e} vs {y:e} (close, but not bit-identical)"
        );
    }
    assert_eq!(gpu.finite, reference.finite, "{what}.finite");
}

/// The reference side of a group: owned host storage for a `SliceBuffer`.
struct Host<T: Real> {
    w: Vec<T>,
    g: Vec<T>,
    slots: Vec<T>,
}

impl<T: Real> Host<T> {
    fn buffer(&mut self) -> SliceBuffer<'_, T> {
        SliceBuffer::new(&mut self.w, &mut self.g, &mut self.slots).expect("same lengths")
    }
}

fn random_values<T: Real>(rng: &mut Rng, n: usize, e_range: i32) -> Vec<T> {
    (0..n).map(|_| T::from_f64(rng.wide(e_range))).collect()
}

/// A GPU group and its host twin with the same random weights, gradient and slots.
fn pair<T: CudaReal>(
    ctx: &Context,
    shapes: &[Vec<usize>],
    spec: SlotSpec,
    seed: u64,
) -> (CudaGroup<T>, Host<T>) {
    let mut rng = Rng::new(seed);
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let w: Vec<T> = random_values(&mut rng, n, 4);
    let g: Vec<T> = random_values(&mut rng, n, 8);
    let mut tensors = Vec::new();
    let mut at = 0;
    for s in shapes {
        let len: usize = s.iter().product();
        tensors.push(HostTensor::new(&w[at..at + len], s.as_slice()));
        at += len;
    }
    let mut dev = CudaGroup::new(ctx, &tensors).expect("create group");
    dev.upload_grad(&g).expect("upload gradient");
    dev.prepare(&spec).expect("prepare");
    let mut slots = vec![T::default(); spec.count() * n];
    for k in 0..spec.count() {
        let vals: Vec<T> = (0..n).map(|_| T::from_f64(rng.wide(3).abs())).collect();
        slots[k * n..(k + 1) * n].copy_from_slice(&vals);
    }
    for (k, slot) in slot_roles(&spec).into_iter().enumerate() {
        dev.upload_slot(slot, &slots[k * n..(k + 1) * n])
            .expect("upload slot");
    }
    (dev, Host { w, g, slots })
}

fn slot_roles(spec: &SlotSpec) -> Vec<Slot> {
    let mut v = Vec::new();
    if spec.backup {
        v.push(Slot::Backup);
    }
    if spec.stash {
        v.push(Slot::Stash);
    }
    v.extend((0..spec.state).map(Slot::State));
    v.extend((0..spec.averages).map(Slot::Average));
    v
}

fn assert_group_same<T: CudaReal>(what: &str, dev: &CudaGroup<T>, host: &Host<T>, spec: &SlotSpec) {
    let n = host.w.len();
    assert_same(
        &format!("{what}: weights"),
        &dev.download_weights().unwrap(),
        &host.w,
    );
    assert_same(
        &format!("{what}: gradient"),
        &dev.download_grad().unwrap(),
        &host.g,
    );
    for (k, slot) in slot_roles(spec).into_iter().enumerate() {
        assert_same(
            &format!("{what}: {slot:?}"),
            &dev.download_slot(slot).unwrap(),
            &host.slots[k * n..(k + 1) * n],
        );
    }
}

fn reduce_specs() -> Vec<ReduceSpec> {
    vec![
        ReduceSpec::FINITE_ONLY,
        ReduceSpec {
            perturb: Some(Weighting::Plain),
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            perturb: Some(Weighting::Adaptive { eta: 0.01 }),
            grad: true,
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            perturb: Some(Weighting::Adaptive { eta: 0.0 }),
            scale_perturb: 0.25,
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            grad: true,
            stash: true,
            dot: true,
            scale_grad: 2.0,
            scale_stash: 0.5,
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            stash: true,
            ..ReduceSpec::FINITE_ONLY
        },
    ]
}

fn update_specs() -> Vec<UpdateSpec> {
    let sgd = |c: SgdConfig, step: u64| BaseRule::sgd(c).unwrap().step_coefficients(step, c.lr);
    let adam = |c: AdamConfig, w: bool, step: u64| {
        let r = if w {
            BaseRule::adamw(c)
        } else {
            BaseRule::adam(c)
        };
        r.unwrap().step_coefficients(step, c.lr)
    };
    let bases = [
        BaseStep::External,
        sgd(
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
            1,
        ),
        sgd(
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                ..Default::default()
            },
            1,
        ),
        sgd(
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.1,
                weight_decay: 5e-4,
                ..Default::default()
            },
            3,
        ),
        sgd(
            SgdConfig {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-2,
                ..Default::default()
            },
            2,
        ),
        adam(
            AdamConfig {
                lr: 1e-3,
                weight_decay: 1e-2,
                ..Default::default()
            },
            false,
            1,
        ),
        adam(
            AdamConfig {
                lr: 1e-3,
                weight_decay: 1e-2,
                ..Default::default()
            },
            true,
            5,
        ),
        adam(
            AdamConfig {
                lr: 3e-3,
                amsgrad: true,
                beta1: 0.6,
                ..Default::default()
            },
            true,
            2,
        ),
    ];
    let mut out = Vec::new();
    for (i, base) in bases.into_iter().enumerate() {
        for restore in [true, false] {
            for grad in [GradMix::Current, GradMix::Mix { a: 1.3, b: -0.4 }] {
                let post = (i % 2 == 0).then_some(PostMix { a: -0.01, b: 0.02 });
                let restash = (i % 3 != 1).then_some(PostMix { a: 1.0, b: -0.3 });
                let mut average = AverageFold::NONE;
                if i % 3 == 0 {
                    average.weights[0] = Some(0.5);
                    average.weights[1] = Some(1.0 / 3.0);
                }
                out.push(UpdateSpec {
                    restore,
                    grad,
                    base,
                    post,
                    restash,
                    average,
                    unscale: 1.0,
                });
            }
        }
    }
    out
}

fn shapes_small() -> Vec<Vec<usize>> {
    vec![
        vec![3, 5, 7],
        vec![],
        vec![4096],
        vec![1],
        vec![2, 4096 + 3],
        vec![0],
        vec![31, 33],
    ]
}

fn every_pass_agrees<T: CudaReal>(ctx: &Context) {
    let spec = SlotSpec {
        backup: true,
        stash: true,
        state: 3,
        averages: 2,
    };
    let shapes = shapes_small();
    for (i, rs) in reduce_specs().into_iter().enumerate() {
        let (mut dev, mut host) = pair::<T>(ctx, &shapes, spec, 100 + i as u64);
        let mut r = host.buffer();
        r.prepare(&spec).unwrap();
        let expected = r.reduce(&rs).unwrap();
        let got = dev.reduce(&rs).unwrap();
        assert_reduction(&format!("{} reduce {rs:?}", T::NAME), &got, &expected);
        // Twice: the same bits.
        assert_reduction("reduce rerun", &dev.reduce(&rs).unwrap(), &got);
    }
    let perturbs = [
        PerturbSpec {
            stash: false,
            weighting: Weighting::Plain,
            scale: 1.0,
            coeff: 0.05 / 3.7,
            unscale: 1.0,
        },
        PerturbSpec {
            stash: true,
            weighting: Weighting::Plain,
            scale: 0.5,
            coeff: 0.0,
            unscale: 1.0,
        },
        PerturbSpec {
            stash: true,
            weighting: Weighting::Adaptive { eta: 0.01 },
            scale: 1.0,
            coeff: 0.1 / 2.9,
            unscale: 1.0,
        },
        PerturbSpec {
            stash: false,
            weighting: Weighting::Adaptive { eta: 0.0 },
            scale: 4.0,
            coeff: 1e-3,
            unscale: 1.0,
        },
    ];
    for (i, ps) in perturbs.into_iter().enumerate() {
        let (mut dev, mut host) = pair::<T>(ctx, &shapes, spec, 200 + i as u64);
        {
            let mut r = host.buffer();
            r.prepare(&spec).unwrap();
            r.perturb(&ps).unwrap();
        }
        dev.perturb(&ps).unwrap();
        assert_group_same(&format!("{} perturb {ps:?}", T::NAME), &dev, &host, &spec);
        {
            let mut r = host.buffer();
            r.prepare(&spec).unwrap();
            r.restore().unwrap();
        }
        dev.restore().unwrap();
        assert_group_same(&format!("{} restore", T::NAME), &dev, &host, &spec);
    }
    for (i, us) in update_specs().into_iter().enumerate() {
        let (mut dev, mut host) = pair::<T>(ctx, &shapes, spec, 300 + i as u64);
        {
            let mut r = host.buffer();
            r.prepare(&spec).unwrap();
            r.update(&us).unwrap();
        }
        dev.update(&us).unwrap();
        assert_group_same(
            &format!("{} update #{i} {us:?}", T::NAME),
            &dev,
            &host,
            &spec,
        );
    }
    let (mut dev, mut host) = pair::<T>(ctx, &shapes, spec, 400);
    let mut fold = AverageFold::NONE;
    fold.weights[1] = Some(0.25);
    {
        let mut r = host.buffer();
        r.prepare(&spec).unwrap();
        r.fold_averages(&fold).unwrap();
        r.swap_average(0).unwrap();
    }
    dev.fold_averages(&fold).unwrap();
    dev.swap_average(0).unwrap();
    assert_group_same(&format!("{} fold + swap", T::NAME), &dev, &host, &spec);
    let before = dev.download_weights().unwrap();
    dev.swap_average(1).unwrap();
    dev.swap_average(1).unwrap();
    assert_eq!(
        bits(&dev.download_weights().unwrap()),
        bits(&before),
        "swap twice is the identity"
    );
    // Errors, not panics, for slots that do not exist.
    assert!(dev.swap_average(3).is_err());
    let (mut bare, _) = pair::<T>(ctx, &shapes, SlotSpec::default(), 500);
    assert!(bare.perturb(&perturbs[0]).is_err());
    assert!(bare.restore().is_err());
}

#[test]
fn every_pass_agrees_with_the_reference_f32() {
    if let Some(ctx) = gpu("every_pass_agrees_with_the_reference_f32") {
        every_pass_agrees::<f32>(&ctx);
    }
}

#[test]
fn every_pass_agrees_with_the_reference_f64() {
    if let Some(ctx) = gpu("every_pass_agrees_with_the_reference_f64") {
        every_pass_agrees::<f64>(&ctx);
    }
}

#[test]
fn f64_extremes_rescale_identically() {
    // Gradients at 1e±200 make the core repeat the reduce with power-of-two scales.
    let Some(ctx) = gpu("f64_extremes_rescale_identically") else {
        return;
    };
    for (seed, scale) in [(1u64, 1e200), (2, 1e-200), (3, 1.0)] {
        let mut rng = Rng::new(seed);
        let n = 70_001;
        let w: Vec<f64> = rng.vec(n, |r| r.wide(3));
        let g: Vec<f64> = rng.vec(n, |r| r.wide(5) * scale);
        let mut dev = CudaGroup::<f64>::from_slices(&ctx, &[&w]).unwrap();
        dev.upload_grad(&g).unwrap();
        let (mut hw, mut hg, mut hs) = (w.clone(), g.clone(), vec![0.0; 2 * n]);
        let base = BaseRule::sgd(SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            ..Default::default()
        })
        .unwrap();
        let mut dg = [Group::new(dev, base)];
        let mut hgp = [Group::new(
            SliceBuffer::new(&mut hw, &mut hg, &mut hs).unwrap(),
            base,
        )];
        let cfg = SamConfig::from(sam_core::Perturbation::sam(0.05));
        let (mut a, mut b) = (Sam::new(cfg).unwrap(), Sam::new(cfg).unwrap());
        let ga = a.first_step(&mut dg).unwrap();
        let gb = b.first_step(&mut hgp).unwrap();
        assert_eq!(ga.second_step().unwrap(), gb.second_step().unwrap());
        assert_same(
            "extreme f64 SAM step",
            &dg[0].buffer.download_weights().unwrap(),
            hgp[0].buffer.weights(),
        );
    }
}

// ---- every variant, through the optimizers -------------------------------------------------

/// What both backends provide to the variant tests.
trait TestBuffer: ParamBuffer {
    fn weights_host(&self) -> Result<Vec<Self::Scalar>, BoxError>;
    fn set_grad(&mut self, g: &[Self::Scalar]) -> Result<(), BoxError>;
}

impl<T: Real> TestBuffer for SliceBuffer<'_, T> {
    fn weights_host(&self) -> Result<Vec<T>, BoxError> {
        Ok(self.weights().to_vec())
    }
    fn set_grad(&mut self, g: &[T]) -> Result<(), BoxError> {
        self.grad_mut().copy_from_slice(g);
        Ok(())
    }
}

impl<T: CudaReal> TestBuffer for CudaGroup<T> {
    fn weights_host(&self) -> Result<Vec<T>, BoxError> {
        Ok(self.download_weights()?)
    }
    fn set_grad(&mut self, g: &[T]) -> Result<(), BoxError> {
        Ok(self.upload_grad(g)?)
    }
}

/// A deterministic gradient of the weights: `(w − target)·scale + noise(call)`.
fn gradient<T: Real>(w: &[T], group: usize, call: usize) -> Vec<T> {
    w.iter()
        .enumerate()
        .map(|(i, x)| {
            let i = i as f64;
            let target = (0.37 * i + group as f64).sin();
            let scale = 1.0 + (i as usize % 7) as f64 * 0.5;
            let noise = 0.05 * (1.3 * i + call as f64).cos();
            T::from_f64((x.to_f64() - target) * scale + noise)
        })
        .collect()
}

/// Writes the gradient of every group (counting calls, so that both backends see the same
/// sequence).
fn write_gradients<B: TestBuffer>(
    groups: &mut [Group<B>],
    calls: &mut usize,
) -> Result<(), BoxError> {
    for (k, grp) in groups.iter_mut().enumerate() {
        let w = grp.buffer.weights_host()?;
        let g = gradient(&w, k, *calls);
        grp.buffer.set_grad(&g)?;
    }
    *calls += 1;
    Ok(())
}

/// One step of an optimizer under test, with gradients from [`write_gradients`].
trait Stepper {
    fn run<B: TestBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        calls: &mut usize,
    ) -> Result<StepStatus, BoxError>
    where
        B::Error: Error + 'static;
}

/// Every optimizer steps through `Optimizer::step`.
impl<O: Optimizer> Stepper for O {
    fn run<B: TestBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        calls: &mut usize,
    ) -> Result<StepStatus, BoxError>
    where
        B::Error: Error + 'static,
    {
        Ok(self
            .step(groups, |gs: &mut [Group<B>]| write_gradients(gs, calls))?
            .status)
    }
}

/// SAM finished by an external optimizer (the final gradient is left in the buffers).
struct External(Sam);

impl Stepper for External {
    fn run<B: TestBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        calls: &mut usize,
    ) -> Result<StepStatus, BoxError>
    where
        B::Error: Error + 'static,
    {
        write_gradients(groups, calls)?;
        let mut guard = self.0.first_step(groups)?;
        write_gradients(guard.groups_mut(), calls)?;
        Ok(guard.restore_with_gradient()?)
    }
}

/// The `finish` of [`agree`] for variants with nothing to compare after the steps.
fn no_finish<T: CudaReal, O>(
    _: &mut O,
    _: &mut O,
    _: &mut [Group<CudaGroup<T>>],
    _: &mut [Group<SliceBuffer<'_, T>>],
    _: &str,
) {
}

/// Runs every variant under test through [`agree`].
fn variants_agree<T: CudaReal>(ctx: &Context) {
    let sam = |c: SamConfig| Sam::new(c).unwrap();
    agree::<T, _>(ctx, "SAM", || sam(SamConfig::default()), no_finish);
    agree::<T, _>(
        ctx,
        "ASAM eta=0.01",
        || sam(Perturbation::asam(0.5, 0.01).into()),
        no_finish,
    );
    agree::<T, _>(
        ctx,
        "SAM external",
        || External(sam(Perturbation::sam(0.1).into())),
        no_finish,
    );
    agree::<T, _>(
        ctx,
        "GSAM",
        || {
            let rho = RhoSchedule::Schedule(Schedule::constant(0.05).unwrap());
            Gsam::new(GsamConfig {
                alpha: 0.4,
                ..GsamConfig::new(rho)
            })
            .unwrap()
        },
        no_finish,
    );
    agree::<T, _>(
        ctx,
        "WSAM decoupled, clipped",
        || {
            Wsam::new(WsamConfig {
                max_norm: Some(5.0),
                ..Default::default()
            })
            .unwrap()
        },
        no_finish,
    );
    agree::<T, _>(
        ctx,
        "WSAM coupled, adaptive",
        || {
            Wsam::new(WsamConfig {
                perturbation: Perturbation {
                    adaptive: true,
                    ..Default::default()
                },
                decouple: false,
                gamma: 0.7,
                ..Default::default()
            })
            .unwrap()
        },
        no_finish,
    );
    agree::<T, _>(
        ctx,
        "LookSAM k=3 (the stored direction written by the update kernel)",
        || {
            LookSam::new(LookSamConfig {
                k: 3,
                ..Default::default()
            })
            .unwrap()
        },
        no_finish,
    );
    agree::<T, _>(
        ctx,
        "WASAM",
        || Wasam::new(SamConfig::default(), &[0, 2]).unwrap(),
        |oa: &mut Wasam, ob: &mut Wasam, devs: &mut [_], refs: &mut [_], what: &str| {
            let sa = oa.swap(devs, 0).unwrap();
            let sb = ob.swap(refs, 0).unwrap();
            for (d, r) in sa.groups().iter().zip(sb.groups()) {
                assert_same(
                    &format!("{what}: swapped-in average"),
                    &d.buffer.download_weights().unwrap(),
                    r.buffer.weights(),
                );
            }
            sa.swap_back().unwrap();
            sb.swap_back().unwrap();
        },
    );
    agree::<T, _>(ctx, "base optimizer", BaseOptimizer::new, no_finish);
}

fn group_options() -> Vec<Vec<GroupOptions>> {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        ..Default::default()
    })
    .unwrap();
    let nesterov = BaseRule::sgd(SgdConfig {
        lr: 0.02,
        momentum: 0.9,
        nesterov: true,
        ..Default::default()
    })
    .unwrap();
    let adamw = BaseRule::adamw(AdamConfig {
        lr: 1e-3,
        weight_decay: 1e-2,
        ..Default::default()
    })
    .unwrap();
    let amsgrad = BaseRule::adam(AdamConfig {
        lr: 2e-3,
        amsgrad: true,
        weight_decay: 1e-4,
        ..Default::default()
    })
    .unwrap();
    vec![
        vec![GroupOptions::new(sgd), GroupOptions::new(adamw)],
        vec![GroupOptions::new(nesterov), GroupOptions::new(amsgrad)],
    ]
}

/// Four steps of fresh optimizers from `make` on the GPU and on the reference backend, for
/// every set of group options: status, weights, gradients and every slot bit-identical after
/// each step; then `finish` on both.
fn agree<T: CudaReal, O: Stepper>(
    ctx: &Context,
    name: &str,
    make: impl Fn() -> O,
    finish: impl Fn(&mut O, &mut O, &mut [Group<CudaGroup<T>>], &mut [Group<SliceBuffer<'_, T>>], &str),
) {
    let shapes: [Vec<Vec<usize>>; 2] = [shapes_small(), vec![vec![513], vec![64, 3, 3]]];
    {
        for opts in group_options() {
            let what = format!(
                "{} {name} {:?}",
                T::NAME,
                opts.iter().map(|o| o.base()).collect::<Vec<_>>()
            );
            // Host twins (with the same initial weights) and GPU groups.
            let mut hosts: Vec<Host<T>> = Vec::new();
            let mut devs: Vec<Group<CudaGroup<T>>> = Vec::new();
            for (k, s) in shapes.iter().enumerate() {
                let (dev, mut host) = pair::<T>(ctx, s, SlotSpec::default(), 900 + k as u64);
                // The optimizer prepares the slots; state and averages start at zero.
                host.slots = vec![T::default(); 8 * host.w.len()];
                devs.push(Group::with_options(dev, opts[k]));
                hosts.push(host);
            }
            let mut refs: Vec<Group<SliceBuffer<'_, T>>> = hosts
                .iter_mut()
                .zip(&opts)
                .map(|(h, o)| Group::with_options(h.buffer(), *o))
                .collect();
            let (mut a, mut b) = (make(), make());
            let (mut ca, mut cb) = (0, 0);
            for step in 0..4 {
                let sa = a
                    .run(&mut devs, &mut ca)
                    .unwrap_or_else(|e| panic!("{what}: gpu step {step}: {e}"));
                let sb = b
                    .run(&mut refs, &mut cb)
                    .unwrap_or_else(|e| panic!("{what}: reference step {step}: {e}"));
                assert_eq!(sa, sb, "{what}: status of step {step}");
                for (k, (d, r)) in devs.iter().zip(&refs).enumerate() {
                    assert_same(
                        &format!("{what}: step {step} group {k} weights"),
                        &d.buffer.download_weights().unwrap(),
                        r.buffer.weights(),
                    );
                    assert_same(
                        &format!("{what}: step {step} group {k} gradient"),
                        &d.buffer.download_grad().unwrap(),
                        r.buffer.grad(),
                    );
                    let spec = d.buffer.slot_spec().expect("prepared");
                    for slot in slot_roles(&spec) {
                        assert_same(
                            &format!("{what}: step {step} group {k} {slot:?}"),
                            &d.buffer.download_slot(slot).unwrap(),
                            r.buffer.slot(slot).unwrap(),
                        );
                    }
                }
            }
            finish(&mut a, &mut b, &mut devs, &mut refs, &what);
        }
    }
}

#[test]
fn every_variant_agrees_with_the_reference_f32() {
    if let Some(ctx) = gpu("every_variant_agrees_with_the_reference_f32") {
        variants_agree::<f32>(&ctx);
    }
}

#[test]
fn every_variant_agrees_with_the_reference_f64() {
    if let Some(ctx) = gpu("every_variant_agrees_with_the_reference_f64") {
        variants_agree::<f64>(&ctx);
    }
}

/// 16-bit storage: the device's conversions (sam_common.cuh) against sam-core's, every pass
/// and every variant, bit for bit.
#[cfg(feature = "half")]
#[test]
fn every_pass_and_variant_agrees_in_16_bit_storage() {
    if let Some(ctx) = gpu("every_pass_and_variant_agrees_in_16_bit_storage") {
        every_pass_agrees::<half::bf16>(&ctx);
        every_pass_agrees::<half::f16>(&ctx);
        variants_agree::<half::bf16>(&ctx);
        variants_agree::<half::f16>(&ctx);
    }
}

#[test]
fn non_finite_second_gradient_restores_exactly() {
    let Some(ctx) = gpu("non_finite_second_gradient_restores_exactly") else {
        return;
    };
    let w: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.01).sin()).collect();
    let dev = CudaGroup::from_slices(&ctx, &[&w]).unwrap();
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let mut groups = [Group::new(dev, base)];
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let mut calls = 0;
    let report = sam
        .step(&mut groups, |gs| -> Result<(), BoxError> {
            let mut g = gradient(&gs[0].buffer.download_weights()?, 0, calls);
            if calls == 1 {
                g[7777] = f32::NAN;
            }
            calls += 1;
            gs[0].buffer.upload_grad(&g)?;
            Ok(())
        })
        .unwrap();
    assert!(matches!(report.status, StepStatus::Skipped(_)));
    assert_eq!(
        bits(&groups[0].buffer.download_weights().unwrap()),
        bits(&w)
    );
}

// ---- determinism and scale -----------------------------------------------------------------

fn sam_step_bits(ctx: &Context, shapes: &[Vec<usize>], seed: u64) -> (Vec<u64>, Reduction) {
    let (mut dev, _) = pair::<f32>(
        ctx,
        shapes,
        SlotSpec {
            backup: true,
            stash: false,
            state: 1,
            averages: 0,
        },
        seed,
    );
    let r = dev
        .reduce(&ReduceSpec {
            perturb: Some(Weighting::Plain),
            ..ReduceSpec::FINITE_ONLY
        })
        .unwrap();
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let mut groups = [Group::new(dev, base)];
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let guard = sam.first_step(&mut groups).unwrap();
    guard.second_step().unwrap();
    (bits(&groups[0].buffer.download_weights().unwrap()), r)
}

#[test]
fn runs_are_bit_identical() {
    let Some(ctx) = gpu("runs_are_bit_identical") else {
        return;
    };
    let shapes = vec![vec![3_000_017]];
    let (w1, r1) = sam_step_bits(&ctx, &shapes, 5);
    let (w2, r2) = sam_step_bits(&ctx, &shapes, 5);
    assert_eq!(r1.perturb_sq.to_bits(), r2.perturb_sq.to_bits());
    assert!(w1 == w2, "two runs gave different weights");
}

#[test]
fn resnet50_shaped_group_agrees() {
    let Some(ctx) = gpu("resnet50_shaped_group_agrees") else {
        return;
    };
    let shapes = resnet50_shapes();
    assert_eq!(shapes.len(), 161);
    let spec = SlotSpec {
        backup: true,
        stash: false,
        state: 1,
        averages: 0,
    };
    let (dev, mut host) = pair::<f32>(&ctx, &shapes, spec, 50);
    assert_eq!(dev.len(), 25_557_032);
    assert_eq!(dev.tensors().count(), 161);
    assert_eq!(
        dev.tensors().iter().map(|t| t.len).sum::<usize>(),
        dev.len()
    );
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..Default::default()
    })
    .unwrap();
    // The same SAM step on both (the gradient is the one uploaded, used twice).
    let cfg = SamConfig::default();
    {
        let mut rg = [Group::new(host.buffer(), base)];
        let mut sam = Sam::new(cfg).unwrap();
        sam.first_step(&mut rg).unwrap().second_step().unwrap();
    }
    let t0 = std::time::Instant::now();
    let mut dg = [Group::new(dev, base)];
    let mut sam = Sam::new(cfg).unwrap();
    sam.first_step(&mut dg).unwrap().second_step().unwrap();
    ctx.synchronize().unwrap();
    println!(
        "ResNet-50-shaped SAM step (161 tensors, one launch per pass): {:?}",
        t0.elapsed()
    );
    assert_group_same(
        "ResNet-50-shaped group",
        &dg[0].buffer,
        &host,
        &dg[0].buffer.slot_spec().unwrap(),
    );
    // Per-tensor views address the right elements.
    let t = dg[0].buffer.tensors().get(100).unwrap().clone();
    assert_same(
        "tensor 100 weights",
        &dg[0].buffer.download_weights_tensor(100).unwrap(),
        &host.w[t.range()],
    );
}

#[test]
fn large_group_1e8_f32() {
    let Some(ctx) = gpu("large_group_1e8_f32") else {
        return;
    };
    let n: usize = 100_000_000;
    // weights, gradient, backup, momentum: 4 · 4 · 1e8 bytes, plus headroom.
    let need = 4 * 4 * n + (512 << 20);
    match ctx.memory_info() {
        Ok((free, _)) if free >= need => {}
        Ok((free, _)) => {
            println!("large_group_1e8_f32: skipped: {free} bytes free, {need} needed");
            return;
        }
        Err(e) => panic!("cuMemGetInfo: {e}"),
    }
    let mut rng = Rng::new(77);
    let w: Vec<f32> = (0..n).map(|_| rng.wide(2) as f32).collect();
    let g: Vec<f32> = (0..n).map(|_| rng.wide(6) as f32).collect();
    let mut dev = CudaGroup::from_slices(&ctx, &[&w]).unwrap();
    dev.upload_grad(&g).unwrap();
    let spec = ReduceSpec {
        perturb: Some(Weighting::Plain),
        grad: true,
        ..ReduceSpec::FINITE_ONLY
    };
    let got = dev.reduce(&spec).unwrap();
    let expected = sam_core::backend::kernel::reduce_flat(n, &spec, |i| {
        (f64::from(w[i]), f64::from(g[i]), 0.0)
    });
    assert_reduction("1e8 reduce", &got, &expected);
    // A full SAM + SGD-momentum step, compared with the reference.
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let (mut hw, mut hg, mut hs) = (w, g, vec![0.0f32; 2 * n]);
    {
        let mut rg = [Group::new(
            SliceBuffer::new(&mut hw, &mut hg, &mut hs).unwrap(),
            base,
        )];
        Sam::new(SamConfig::default())
            .unwrap()
            .first_step(&mut rg)
            .unwrap()
            .second_step()
            .unwrap();
    }
    let mut dg = [Group::new(dev, base)];
    Sam::new(SamConfig::default())
        .unwrap()
        .first_step(&mut dg)
        .unwrap()
        .second_step()
        .unwrap();
    assert_same(
        "1e8 SAM step",
        &dg[0].buffer.download_weights().unwrap(),
        &hw,
    );
    assert_same(
        "1e8 momentum",
        &dg[0].buffer.download_slot(Slot::State(0)).unwrap(),
        &hs[n..],
    );
}

#[test]
fn prepare_keeps_slots_by_role() {
    let Some(ctx) = gpu("prepare_keeps_slots_by_role") else {
        return;
    };
    let (mut dev, host) = pair::<f64>(
        &ctx,
        &[vec![1000]],
        SlotSpec {
            backup: true,
            stash: false,
            state: 2,
            averages: 1,
        },
        8,
    );
    let n = 1000;
    dev.prepare(&SlotSpec {
        backup: true,
        stash: true,
        state: 3,
        averages: 2,
    })
    .unwrap();
    // backup stays slot 0; state 0/1 move from 1/2 to 2/3; average 0 moves from 3 to 5.
    assert_same(
        "backup",
        &dev.download_slot(Slot::Backup).unwrap(),
        &host.slots[..n],
    );
    assert_same(
        "state 1",
        &dev.download_slot(Slot::State(1)).unwrap(),
        &host.slots[2 * n..3 * n],
    );
    assert_same(
        "average 0",
        &dev.download_slot(Slot::Average(0)).unwrap(),
        &host.slots[3 * n..4 * n],
    );
    assert!(
        dev.download_slot(Slot::State(2))
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    );
    assert!(
        dev.download_slot(Slot::Average(1))
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    );
    // Per-tensor access errors.
    assert!(dev.upload_grad_tensor(1, &[0.0]).is_err());
    assert!(dev.upload_grad(&[0.0; 3]).is_err());
}

/// A checkpoint of GPU groups equals the reference's after the same steps; loaded into fresh
/// GPU groups (holding the saved weights) and a fresh optimizer, it continues bit for bit with
/// the reference run that never stopped.
#[test]
fn checkpoints_resume_gpu_groups_with_the_same_bits() {
    use sam_core::checkpoint::Checkpoint;
    let Some(ctx) = gpu("checkpoints_resume_gpu_groups_with_the_same_bits") else {
        return;
    };
    let opts = group_options().remove(0);
    let shapes = [shapes_small(), vec![vec![513], vec![64, 3, 3]]];
    let mut hosts: Vec<Host<f32>> = Vec::new();
    let mut devs: Vec<Group<CudaGroup<f32>>> = Vec::new();
    for (k, s) in shapes.iter().enumerate() {
        let (dev, mut host) = pair::<f32>(&ctx, s, SlotSpec::default(), 700 + k as u64);
        host.slots = vec![0.0; 8 * host.w.len()];
        devs.push(Group::with_options(dev, opts[k]));
        hosts.push(host);
    }
    let mut refs: Vec<Group<SliceBuffer<'_, f32>>> = hosts
        .iter_mut()
        .zip(&opts)
        .map(|(h, o)| Group::with_options(h.buffer(), *o))
        .collect();
    let make = || Sam::new(SamConfig::default()).unwrap();
    let (mut a, mut b) = (make(), make());
    let (mut ca, mut cb) = (0, 0);
    for _ in 0..3 {
        a.run(&mut devs, &mut ca).unwrap();
        b.run(&mut refs, &mut cb).unwrap();
    }
    let ckpt = Checkpoint::save(&a, &devs).unwrap();
    assert_eq!(
        ckpt,
        Checkpoint::save(&b, &refs).unwrap(),
        "GPU and reference checkpoints"
    );

    // Fresh GPU groups with the saved weights, a fresh optimizer, the checkpoint loaded.
    let mut fresh: Vec<Group<CudaGroup<f32>>> = Vec::new();
    for (k, (s, d)) in shapes.iter().zip(&devs).enumerate() {
        let (mut dev, _) = pair::<f32>(&ctx, s, SlotSpec::default(), 800 + k as u64);
        dev.upload_weights(&d.buffer.download_weights().unwrap())
            .unwrap();
        fresh.push(Group::with_options(dev, opts[k]));
    }
    let mut resumed = make();
    ckpt.load(&mut resumed, &mut fresh).unwrap();
    for step in 0..3 {
        resumed.run(&mut fresh, &mut ca).unwrap();
        b.run(&mut refs, &mut cb).unwrap();
        for (k, (d, r)) in fresh.iter().zip(&refs).enumerate() {
            assert_same(
                &format!("resumed step {step} group {k} weights"),
                &d.buffer.download_weights().unwrap(),
                r.buffer.weights(),
            );
        }
    }
}
