//! `sam-candle` against the reference backend: the same groups, the same initial weights and
//! the same gradients (computed on the host from the current weights and replayed into a
//! `GradStore` and into a `VecBuffer`), the same bits after every step, for every variant, in
//! the two-call form, the closure form and with a candle optimizer of its own.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer as _;
use sam_candle::{SamCandle, VarBuffer};
use sam_core::reference::VecBuffer;
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Group, GroupOptions, Gsam, GsamConfig, LookSam,
    LookSamConfig, Optimizer, Perturbation, RhoSchedule, Sam, SamConfig, SamOptimizer, Schedule,
    SgdConfig, StepStatus, Wasam, Wsam, WsamConfig,
};

/// Shapes of the two groups' Vars.
const SHAPES: [&[&[usize]]; 2] = [&[&[3, 4], &[5]], &[&[2, 3, 2]]];

fn initial(shape_index: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7 + shape_index * 13) % 11) as f32 - 5.0) * 0.25)
        .collect()
}

/// The gradient at `w` (host arithmetic in f64, rounded once): the same bits on both sides.
fn grad_at(w: &[f32], salt: usize) -> Vec<f32> {
    w.iter()
        .enumerate()
        .map(|(i, &x)| {
            let x = f64::from(x);
            let c = 0.5 + ((i + salt) % 5) as f64 * 0.3;
            ((x - 0.7) * c + 0.1 * (3.0 * x).sin()) as f32
        })
        .collect()
}

fn base_rules() -> [GroupOptions; 2] {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-3,
        ..Default::default()
    })
    .expect("valid");
    let adam = BaseRule::adam(AdamConfig {
        lr: 0.01,
        ..Default::default()
    })
    .expect("valid");
    [GroupOptions::new(sgd), GroupOptions::new(adam)]
}

/// The candle side: Vars by group.
fn vars() -> Vec<Vec<Var>> {
    let mut k = 0;
    SHAPES
        .iter()
        .map(|group| {
            group
                .iter()
                .map(|shape| {
                    let n = shape.iter().product();
                    k += 1;
                    let t = Tensor::from_vec(initial(k, n), *shape, &Device::Cpu).expect("tensor");
                    Var::from_tensor(&t).expect("var")
                })
                .collect()
        })
        .collect()
}

fn candle_groups(vars: &[Vec<Var>], opts: &[GroupOptions]) -> Vec<Group<VarBuffer<f32>>> {
    vars.iter()
        .zip(opts)
        .map(|(v, o)| Group::with_options(VarBuffer::new(v.clone()).expect("buffer"), *o))
        .collect()
}

/// The reference side: each group's Vars laid end to end.
fn reference_groups(vars: &[Vec<Var>], opts: &[GroupOptions]) -> Vec<Group<VecBuffer<f32>>> {
    vars.iter()
        .zip(opts)
        .map(|(v, o)| {
            let w: Vec<f32> = v.iter().flat_map(values).collect();
            let n = w.len();
            Group::with_options(VecBuffer::new(w, vec![0.0; n]).expect("buffer"), *o)
        })
        .collect()
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("values")
}

/// Host gradients at the Vars' current values, as a `GradStore`.
fn grad_store(vars: &[Vec<Var>], salt: usize) -> GradStore {
    let mut store = GradStore::default();
    for v in vars.iter().flatten() {
        let g = Tensor::from_vec(grad_at(&values(v), salt), v.shape(), &Device::Cpu).expect("g");
        store.insert(v.as_tensor(), g);
    }
    store
}

/// The same gradients written into the reference buffers.
fn write_reference_grads(groups: &mut [Group<VecBuffer<f32>>], salt: usize) {
    for g in groups {
        let (w, grad) = g.buffer.weights_and_grad();
        grad.copy_from_slice(&grad_at_grouped(w, salt));
    }
}

/// `grad_at` per Var, concatenated: element indices restart at each Var on the candle side.
fn grad_at_grouped(w: &[f32], salt: usize) -> Vec<f32> {
    // Group layouts are fixed by SHAPES; find this group's by its length.
    let sizes: Vec<usize> = SHAPES
        .iter()
        .map(|g| {
            g.iter()
                .map(|s| s.iter().product::<usize>())
                .collect::<Vec<_>>()
        })
        .find(|sizes: &Vec<usize>| sizes.iter().sum::<usize>() == w.len())
        .expect("a group of SHAPES");
    let mut out = Vec::with_capacity(w.len());
    let mut at = 0;
    for n in sizes {
        out.extend(grad_at(&w[at..at + n], salt));
        at += n;
    }
    out
}

fn assert_same(step: usize, vars: &[Vec<Var>], reference: &[Group<VecBuffer<f32>>]) {
    for (gi, (v, r)) in vars.iter().zip(reference).enumerate() {
        let got: Vec<u32> = v.iter().flat_map(values).map(f32::to_bits).collect();
        let want: Vec<u32> = r.buffer.weights().iter().map(|x| x.to_bits()).collect();
        assert_eq!(got, want, "step {step}, group {gi}: weights differ");
    }
}

/// Two-call steps on both sides, compared after every step.
fn two_call<O: SamOptimizer>(make: impl Fn() -> O, opts: &[GroupOptions], steps: usize) {
    let vars = vars();
    let mut reference = reference_groups(&vars, opts);
    let mut sam = SamCandle::new(make(), candle_groups(&vars, opts));
    let mut ref_opt = make();
    for step in 0..steps {
        let perturbed = sam.first_step(&grad_store(&vars, 2 * step)).expect("first");
        let got = perturbed
            .second_step(&grad_store(&vars, 2 * step + 1))
            .expect("second");

        write_reference_grads(&mut reference, 2 * step);
        let mut p = ref_opt.first_step(&mut reference).expect("first");
        write_reference_grads(p.groups_mut(), 2 * step + 1);
        let want = p.second_step().expect("second");
        assert_eq!(got, want, "step {step}: status");
        assert_same(step, &vars, &reference);
    }
}

fn plain_opts() -> Vec<GroupOptions> {
    base_rules().to_vec()
}

fn overridden_opts() -> Vec<GroupOptions> {
    let [a, b] = base_rules();
    vec![a, b.with_rho(0.11).expect("valid").with_adaptive(true)]
}

#[test]
fn sam_and_asam_match_the_reference_bit_for_bit() {
    two_call(
        || Sam::new(Perturbation::sam(0.05).into()).expect("valid"),
        &overridden_opts(),
        8,
    );
    two_call(
        || Sam::new(Perturbation::asam(0.5, 0.01).into()).expect("valid"),
        &plain_opts(),
        8,
    );
}

#[test]
fn gsam_matches_the_reference_bit_for_bit() {
    let make = || {
        let rho = RhoSchedule::Schedule(Schedule::constant(0.05).expect("valid"));
        Gsam::new(GsamConfig::new(rho)).expect("valid")
    };
    two_call(make, &plain_opts(), 8);
}

#[test]
fn wsam_matches_the_reference_bit_for_bit() {
    for decouple in [false, true] {
        let make = || {
            Wsam::new(WsamConfig {
                decouple,
                max_norm: Some(3.0),
                ..WsamConfig::default()
            })
            .expect("valid")
        };
        two_call(make, &overridden_opts(), 8);
    }
}

/// LookSAM's refreshes write the stored direction in the update pass; its other steps take one
/// gradient (the second `GradStore` of the two-call form replaces the first, as in the
/// reference run).
#[test]
fn looksam_matches_the_reference_bit_for_bit() {
    let make = || {
        LookSam::new(LookSamConfig {
            k: 3,
            ..LookSamConfig::default()
        })
        .expect("valid")
    };
    two_call(make, &overridden_opts(), 8);
}

#[test]
fn wasam_matches_the_reference_and_swaps_to_the_same_average() {
    let make = || Wasam::new(SamConfig::default(), &[2, 4]).expect("valid");
    let opts = plain_opts();
    let vars = vars();
    let mut reference = reference_groups(&vars, &opts);
    let mut sam = SamCandle::new(make(), candle_groups(&vars, &opts));
    let mut ref_opt = make();
    for step in 0..7 {
        let p = sam.first_step(&grad_store(&vars, 2 * step)).expect("first");
        p.second_step(&grad_store(&vars, 2 * step + 1))
            .expect("second");
        write_reference_grads(&mut reference, 2 * step);
        let mut p = ref_opt.first_step(&mut reference).expect("first");
        write_reference_grads(p.groups_mut(), 2 * step + 1);
        p.second_step().expect("second");
        assert_same(step, &vars, &reference);
    }
    let before: Vec<Vec<f32>> = vars.iter().flatten().map(values).collect();
    for k in [0, 1] {
        let (opt, groups) = sam.parts_mut();
        let swapped = opt.swap(groups, k).expect("swap");
        let r = ref_opt.swap(&mut reference, k).expect("swap");
        assert_same(100 + usize::from(k), &vars, r.groups());
        r.swap_back().expect("back");
        swapped.swap_back().expect("back");
    }
    let after: Vec<Vec<f32>> = vars.iter().flatten().map(values).collect();
    assert_eq!(before, after, "swapping back restores the live weights");
}

/// A loss whose gradient candle's backward gives exactly: `Σ c ⊙ w` has gradient `c`.
fn linear_loss(vars: &[Vec<Var>]) -> candle_core::Result<Tensor> {
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for (k, v) in vars.iter().flatten().enumerate() {
        let c = Tensor::from_vec(coefficients(k, v.elem_count()), v.shape(), &Device::Cpu)?;
        total = (total + (v.as_tensor() * c)?.sum_all()?)?;
    }
    Ok(total)
}

fn coefficients(k: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i + 3 * k) % 7) as f32 * 0.25 - 0.75)
        .collect()
}

#[test]
fn the_closure_form_runs_backward_itself_for_sam_and_the_base_optimizer() {
    fn run<O: Optimizer>(make: impl Fn() -> O, calls_per_step: usize) {
        let opts = plain_opts();
        let vars = vars();
        let mut reference = reference_groups(&vars, &opts);
        let mut opt = SamCandle::new(make(), candle_groups(&vars, &opts));
        let mut ref_opt = make();
        let mut calls = 0;
        for step in 0..5 {
            let report = opt
                .step(|| {
                    calls += 1;
                    linear_loss(&vars)
                })
                .expect("step");
            assert_eq!(report.status, StepStatus::Applied);
            ref_opt
                .step(&mut reference, |gs: &mut [Group<VecBuffer<f32>>]| {
                    let mut k = 0;
                    for (g, shapes) in gs.iter_mut().zip(SHAPES) {
                        let mut at = 0;
                        for s in shapes {
                            let n: usize = s.iter().product();
                            g.buffer.grad_mut()[at..at + n].copy_from_slice(&coefficients(k, n));
                            at += n;
                            k += 1;
                        }
                    }
                    Ok::<_, sam_core::Error<_>>(())
                })
                .expect("step");
            assert_same(step, &vars, &reference);
        }
        assert_eq!(calls, 5 * calls_per_step);
    }
    run(
        || Sam::new(Perturbation::sam(0.05).into()).expect("valid"),
        2,
    );
    run(BaseOptimizer::new, 1);
}

#[test]
fn bring_your_own_optimizer_gets_the_variant_gradient_with_the_weights_restored() {
    // WSAM (coupled) mixes the two gradients: the direction written into the GradStore is not
    // the second gradient itself, and candle's own SGD applies it.
    let make = || {
        Wsam::new(WsamConfig {
            decouple: false,
            ..WsamConfig::default()
        })
        .expect("valid")
    };
    let opts = plain_opts();
    let vars = vars();
    let mut reference = reference_groups(&vars, &opts);
    let mut sam = SamCandle::new(make(), candle_groups(&vars, &opts));
    let mut ref_opt = make();
    let lr = 0.1;
    let mut sgd = candle_nn::SGD::new(vars.iter().flatten().cloned().collect(), lr).expect("sgd");
    for step in 0..5 {
        let p = sam.first_step(&grad_store(&vars, 2 * step)).expect("first");
        let grads = grad_store(&vars, 2 * step + 1);
        assert_eq!(
            p.restore_with_gradient(&grads).expect("restore"),
            StepStatus::Applied
        );
        sgd.step(&grads).expect("sgd");

        write_reference_grads(&mut reference, 2 * step);
        let mut p = ref_opt.first_step(&mut reference).expect("first");
        write_reference_grads(p.groups_mut(), 2 * step + 1);
        p.restore_with_gradient().expect("restore");
        for g in &mut reference {
            let (w, d) = g.buffer.weights_and_grad();
            // candle's SGD: w − (d·lr + 0), in f32.
            let stepped: Vec<f32> = w
                .iter()
                .zip(d.iter())
                .map(|(w, d)| w - (d * lr as f32 + 0.0))
                .collect();
            g.buffer.weights_mut().copy_from_slice(&stepped);
        }
        assert_same(step, &vars, &reference);
    }
}

#[test]
fn a_var_without_gradient_is_left_out_of_the_step() {
    let opts = plain_opts();
    let vars = vars();
    let frozen = values(&vars[0][1]);
    let mut sam = SamCandle::new(
        Sam::new(SamConfig::default()).expect("valid"),
        candle_groups(&vars, &opts),
    );
    // The reference sees only the Vars that have gradients: group 0 without its second Var.
    let active = vec![vec![vars[0][0].clone()], vars[1].clone()];
    let mut reference = reference_groups(&active, &opts);
    let mut ref_opt = Sam::new(SamConfig::default()).expect("valid");
    for step in 0..4 {
        let mut first = grad_store(&vars, 2 * step);
        first.remove(vars[0][1].as_tensor());
        let p = sam.first_step(&first).expect("first");
        // A gradient for it in the second pass does not bring it into the step.
        p.second_step(&grad_store(&vars, 2 * step + 1))
            .expect("second");

        write_active(&mut reference, 2 * step);
        let mut p = ref_opt.first_step(&mut reference).expect("first");
        write_active(p.groups_mut(), 2 * step + 1);
        p.second_step().expect("second");
        assert_same(step, &active, &reference);
        assert_eq!(
            values(&vars[0][1]),
            frozen,
            "the Var without gradient moved"
        );
    }
}

/// Gradients of the active layout of `a_var_without_gradient_is_left_out_of_the_step`:
/// group 0 is the [3, 4] Var alone, group 1 as in SHAPES.
fn write_active(groups: &mut [Group<VecBuffer<f32>>], salt: usize) {
    for g in groups {
        let (w, grad) = g.buffer.weights_and_grad();
        let out = if w.len() == 12 {
            grad_at(w, salt)
        } else {
            grad_at_grouped(w, salt)
        };
        grad.copy_from_slice(&out);
    }
}

/// The loss of a small tanh network on a fixed batch, from its `VarMap`.
fn mlp_loss(map: &candle_nn::VarMap) -> candle_core::Result<Tensor> {
    use candle_nn::Module as _;
    let vb = candle_nn::VarBuilder::from_varmap(map, DType::F32, &Device::Cpu);
    let l1 = candle_nn::linear(4, 8, vb.pp("l1"))?;
    let l2 = candle_nn::linear(8, 3, vb.pp("l2"))?;
    let x: Vec<f32> = (0..24).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.3).collect();
    let x = Tensor::from_vec(x, (6, 4), &Device::Cpu)?;
    let y = Tensor::from_vec(vec![0u32, 1, 2, 1, 0, 2], 6, &Device::Cpu)?;
    let logits = l2.forward(&l1.forward(&x)?.tanh()?)?;
    candle_nn::loss::cross_entropy(&logits, &y)
}

#[test]
fn a_small_network_trained_by_candle_matches_the_reference_with_its_gradients_replayed() {
    // Every variant's two halves see candle's own backward-pass gradients; the reference
    // backend is fed the same gradients (copied out of the GradStore) and must hold the same
    // weights after every step.
    fn run<O: SamOptimizer>(make: impl Fn() -> O) {
        let map = candle_nn::VarMap::new();
        mlp_loss(&map).expect("build the network");
        let buffer = VarBuffer::<f32>::from_varmap(&map, "").expect("buffer");
        let vars: Vec<Var> = buffer.vars().cloned().collect();
        let base = base_rules()[1];
        let mut sam = SamCandle::new(make(), vec![Group::with_options(buffer, base)]);
        let w0: Vec<f32> = vars.iter().flat_map(values).collect();
        let n = w0.len();
        let mut reference = vec![Group::with_options(
            VecBuffer::new(w0, vec![0.0; n]).expect("buffer"),
            base,
        )];
        let mut ref_opt = make();
        let flat = |grads: &GradStore| -> Vec<f32> {
            vars.iter()
                .flat_map(|v| {
                    grads
                        .get(v.as_tensor())
                        .expect("a gradient")
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .expect("values")
                })
                .collect()
        };
        for step in 0..6 {
            let g1 = mlp_loss(&map).and_then(|l| l.backward()).expect("backward");
            reference[0].buffer.grad_mut().copy_from_slice(&flat(&g1));
            let p = sam.first_step(&g1).expect("first");
            let g2 = mlp_loss(&map).and_then(|l| l.backward()).expect("backward");
            let mut rp = ref_opt.first_step(&mut reference).expect("first");
            // The perturbed weights agree before the second gradient is replayed.
            let perturbed: Vec<u32> = vars.iter().flat_map(values).map(f32::to_bits).collect();
            let want: Vec<u32> = rp.groups()[0]
                .buffer
                .weights()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(perturbed, want, "step {step}: perturbed weights differ");
            rp.groups_mut()[0]
                .buffer
                .grad_mut()
                .copy_from_slice(&flat(&g2));
            assert_eq!(
                p.second_step(&g2).expect("second"),
                rp.second_step().expect("second")
            );
            let got: Vec<u32> = vars.iter().flat_map(values).map(f32::to_bits).collect();
            let want: Vec<u32> = reference[0]
                .buffer
                .weights()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(got, want, "step {step}: weights differ");
        }
    }
    run(|| Sam::new(Perturbation::asam(0.5, 0.01).into()).expect("valid"));
    run(|| {
        let rho = RhoSchedule::Schedule(Schedule::constant(0.05).expect("valid"));
        Gsam::new(GsamConfig::new(rho)).expect("valid")
    });
    run(|| Wsam::new(WsamConfig::default()).expect("valid"));
    run(|| Wasam::new(SamConfig::default(), &[2]).expect("valid"));
}

/// A checkpoint of the candle groups after 3 steps, loaded into fresh Vars (holding the saved
/// weights) and a fresh optimizer, continues with the bits of the reference run that never
/// stopped; the candle slots save exactly what the reference slots save.
#[test]
fn a_checkpoint_resumes_candle_groups_with_the_same_bits() {
    use sam_core::checkpoint::Checkpoint;
    let opts = plain_opts();
    let make = || Sam::new(SamConfig::default()).expect("SAM");
    let vars = vars();
    let mut reference = reference_groups(&vars, &opts);
    let mut ref_opt = make();
    let mut sam = SamCandle::new(make(), candle_groups(&vars, &opts));
    let step_both = |sam: &mut SamCandle<Sam, f32>,
                     ref_opt: &mut Sam,
                     reference: &mut Vec<Group<VecBuffer<f32>>>,
                     vars: &[Vec<Var>],
                     step: usize| {
        let perturbed = sam.first_step(&grad_store(vars, 2 * step)).expect("first");
        perturbed
            .second_step(&grad_store(vars, 2 * step + 1))
            .expect("second");
        write_reference_grads(reference, 2 * step);
        let mut p = ref_opt.first_step(reference).expect("first");
        write_reference_grads(p.groups_mut(), 2 * step + 1);
        p.second_step().expect("second");
    };
    for step in 0..3 {
        step_both(&mut sam, &mut ref_opt, &mut reference, &vars, step);
    }
    let ckpt = Checkpoint::save(sam.optimizer(), sam.groups()).expect("save");
    assert_eq!(
        ckpt,
        Checkpoint::save(&ref_opt, &reference).expect("save reference")
    );

    // Fresh Vars with the saved weights, a fresh optimizer, the checkpoint loaded.
    let fresh: Vec<Vec<Var>> = vars
        .iter()
        .map(|g| {
            g.iter()
                .map(|v| Var::from_tensor(&v.as_tensor().copy().expect("copy")).expect("var"))
                .collect()
        })
        .collect();
    let mut resumed = SamCandle::new(make(), candle_groups(&fresh, &opts));
    let (opt, groups) = resumed.parts_mut();
    ckpt.load(opt, groups).expect("load");
    for step in 3..6 {
        step_both(&mut resumed, &mut ref_opt, &mut reference, &fresh, step);
        assert_same(step, &fresh, &reference);
    }
}
