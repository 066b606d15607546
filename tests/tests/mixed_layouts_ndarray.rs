//! sam-ndarray's mixed-precision layouts equal the reference backend's bit for bit: `f32`
//! master weights and slots with 16-bit gradients (`NdGroup::<f32, G>::mixed`), with and
//! without a 16-bit model copy (`with_model_copy`), under a loss scale, through every variant,
//! over steps that include an overflowing gradient (a skipped step).
//!
//! The reference is [`SliceBuffer::mixed`] (with [`SliceBuffer::with_model_copy`]) on the flat
//! concatenation of the same tensors; its layouts are checked against their definitions
//! (restore exactness, the model copy as the rounding of the master weights, scaled = unscaled
//! runs) in `mixed_precision.rs`. The gradient is computed from the model copy when there is one
//! (as a model computing in 16 bits does), from the master weights otherwise, so a copy that
//! lagged behind the master weights would change the trajectory.

use half::{bf16, f16};
use ndarray::ArrayD;
use sam_core::backend::{Real, Slot};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{Error, Group, GroupOptions, Optimizer};
use sam_ndarray::{NdError, NdGroup};
use sam_tests::variants::ALL_NAMES;
use sam_tests::{Bits, MasterStore, flat, standard_groups, with_variant};

/// `∂L/∂w = c·(w − t) + w³/20` at element `i` (in the group's flat order) of step `salt`.
fn grad_at(i: usize, salt: usize, w: f64) -> f64 {
    let c = 0.5 + ((i + salt) % 7) as f64 * 0.5;
    let t = ((i * 5 + salt) % 9) as f64 * 0.5 - 2.0;
    c * (w - t) + w * w * w / 20.0
}

/// The loss-scaled 16-bit gradient of element `i` at weight `w`, or ∞ at `overflow`.
fn scaled<G: Real>(i: usize, salt: usize, w: f64, scale: f64, overflow: Option<usize>) -> G {
    if overflow == Some(i) {
        return G::from_f64(f64::INFINITY);
    }
    G::from_f64(scale * grad_at(i, salt, w))
}

fn write_nd<G: Real>(g: &mut NdGroup<f32, G>, salt: usize, scale: f64, overflow: Option<usize>) {
    let x: Vec<f64> = match g.model() {
        Some(m) => m
            .iter()
            .flat_map(|a| a.iter().map(|v| v.to_f64()))
            .collect(),
        None => flat(g.weights()).iter().map(|&v| f64::from(v)).collect(),
    };
    let mut i = 0;
    for mut t in g.grads_mut().iter_mut() {
        for v in t.iter_mut() {
            *v = scaled(i, salt, x[i], scale, overflow);
            i += 1;
        }
    }
}

fn write_ref<G: Real>(b: &mut SliceBuffer<'_, f32, G>, salt: usize, scale: f64, o: Option<usize>) {
    let x: Vec<f64> = match b.model() {
        Some(m) => m.iter().map(|v| v.to_f64()).collect(),
        None => b.weights().iter().map(|&v| f64::from(v)).collect(),
    };
    for (i, v) in b.weights_and_grad().1.iter_mut().enumerate() {
        *v = scaled(i, salt, x[i], scale, o);
    }
}

/// Weights, model copy, gradient and every prepared slot, as bits, of each side.
fn assert_same<G: Bits>(nd: &[Group<NdGroup<f32, G>>], rf: &[Group<SliceBuffer<'_, f32, G>>]) {
    let bits = |x: &[f32]| x.iter().map(|v| v.bits()).collect::<Vec<_>>();
    let bits16 = |x: &[G]| x.iter().map(|v| v.bits()).collect::<Vec<_>>();
    for (k, (a, b)) in nd.iter().zip(rf).enumerate() {
        let (a, b) = (&a.buffer, &b.buffer);
        assert_eq!(
            bits(&flat(a.weights())),
            bits(b.weights()),
            "group {k}: weights"
        );
        let model_a = a.model().map(|m| bits16(&flat(m)));
        assert_eq!(model_a, b.model().map(bits16), "group {k}: model copy");
        assert_eq!(
            bits16(&flat(a.grads())),
            bits16(b.grad()),
            "group {k}: gradient"
        );
        for slot in Slot::ALL {
            assert_eq!(
                a.slot(slot).map(bits),
                b.slot(slot).map(bits),
                "group {k}: {slot:?}"
            );
        }
    }
}

fn runs_as_reference<G: Bits, O: Optimizer + Clone>(
    opt: &O,
    map: fn(GroupOptions) -> GroupOptions,
    model_copy: bool,
) {
    let (nds, _, opts) = standard_groups::<f32>();
    let opts: Vec<GroupOptions> = opts.into_iter().map(map).collect();
    let mut stores: Vec<MasterStore<G>> = nds
        .iter()
        .map(|nd| MasterStore::new(flat(nd.weights()), model_copy))
        .collect();
    let mut a: Vec<Group<NdGroup<f32, G>>> = nds
        .iter()
        .zip(&opts)
        .map(|(nd, o)| {
            let w: Vec<ArrayD<f32>> = nd.weights().to_vec();
            #[allow(unused_mut)]
            let mut g = NdGroup::<f32, G>::mixed(w).unwrap();
            if model_copy {
                g = g.with_model_copy().unwrap();
            }
            #[cfg(feature = "rayon")]
            g.set_min_parallel_len(500);
            Group::with_options(g, *o)
        })
        .collect();
    let mut b: Vec<Group<SliceBuffer<'_, f32, G>>> = stores
        .iter_mut()
        .zip(&opts)
        .map(|(s, o)| Group::with_options(s.buffer(), *o))
        .collect();
    assert_same(&a, &b);
    let (mut oa, mut ob) = (opt.clone(), opt.clone());
    let scale = 256.0;
    oa.set_grad_scale(scale).unwrap();
    ob.set_grad_scale(scale).unwrap();
    let mut skipped = 0;
    for step in 0..7 {
        // Step 3's first gradient overflows in group 1; step 5's second gradient in group 0.
        let overflow = |k: usize, call: usize| match (step, k, call) {
            (3, 1, 0) => Some(4000),
            (5, 0, 1) => Some(17),
            _ => None,
        };
        let (mut ca, mut cb) = (0, 0);
        let ra = oa.step(&mut a, |gs: &mut [Group<NdGroup<f32, G>>]| {
            for (k, g) in gs.iter_mut().enumerate() {
                write_nd(&mut g.buffer, step + ca, scale, overflow(k, ca));
            }
            ca += 1;
            Ok::<_, Error<NdError>>(())
        });
        let rb = ob.step(&mut b, |gs: &mut [Group<SliceBuffer<'_, f32, G>>]| {
            for (k, g) in gs.iter_mut().enumerate() {
                write_ref(&mut g.buffer, step + cb, scale, overflow(k, cb));
            }
            cb += 1;
            Ok::<_, Error<SliceError>>(())
        });
        match (ra, rb) {
            (Ok(x), Ok(y)) => {
                assert_eq!(x.status, y.status, "step {step}");
                skipped += usize::from(x.status.is_skipped());
            }
            (x, y) => panic!("step {step} failed: {:?} / {:?}", x.err(), y.err()),
        }
        assert_eq!(ca, cb, "step {step}: gradient calls");
        assert_same(&a, &b);
    }
    assert!(skipped >= 1, "the overflowing gradient skipped a step");
}

#[test]
fn ndarray_equals_reference_with_master_weights_and_16_bit_gradients() {
    for (name, map) in ALL_NAMES {
        for model_copy in [false, true] {
            with_variant!(name, |opt| {
                runs_as_reference::<bf16, _>(&opt, map, model_copy);
                runs_as_reference::<f16, _>(&opt, map, model_copy);
            });
        }
    }
}

#[test]
fn model_copy_is_the_rounding_of_the_master_weights() {
    let w = vec![ArrayD::from_shape_vec(vec![3], vec![0.1_f32, -3.0, 1e-9]).unwrap()];
    let mut g = NdGroup::<f32, bf16>::mixed(w).unwrap();
    assert!(g.model().is_none());
    g = g.with_model_copy().unwrap();
    let want = |w: &[f32]| -> Vec<u16> {
        w.iter()
            .map(|&x| <bf16 as Real>::from_f64(x.into()).to_bits())
            .collect()
    };
    let model = |g: &NdGroup<f32, bf16>| -> Vec<u16> {
        flat(g.model().unwrap())
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    assert_eq!(model(&g), want(&flat(g.weights())));
    g.weights_mut().next().unwrap()[1] = 2.5;
    g.refresh_model();
    assert_eq!(model(&g), want(&flat(g.weights())));
    let (m, grads) = g.model_and_grads_mut();
    assert_eq!((m.map(<[_]>::len), grads.len()), (Some(1), 1));
    assert_eq!(g.len(), 3);
}
