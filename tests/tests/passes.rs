//! Property tests: every pass of `NdGroup` equals the reference backend bit for bit, for random
//! groups (any number of tensors of random shapes, empty ones included, blocks spanning tensor
//! boundaries), random values (zeros, subnormals, 1e±30, extremes, NaN/∞), random slot
//! specifications and random sequences of random pass specifications.
//!
//! With the `rayon` feature each case also runs inside pools of 1, 2, 3 and 7 threads, with a
//! random (small) parallel split size so that the passes really split.

use proptest::prelude::*;
use sam_core::backend::{ParamBuffer, Reduction, SlotSpec};
use sam_core::reference::SliceError;
use sam_ndarray::{NdError, NdGroup};
use sam_tests::strategy::{self, Op};
use sam_tests::{
    Bits, Fixture, Palette, SplitMix, assert_same_bits, assert_same_reduction, check_nd_same,
    check_same_bits, values, write_grad_nd, write_grad_ref,
};

/// One generated case.
#[derive(Debug, Clone)]
struct Case {
    shapes: Vec<Vec<usize>>,
    seed: u64,
    weights: Palette,
    grads: Palette,
    slots: SlotSpec,
    ops: Vec<Op>,
    min_par: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        strategy::shapes(),
        any::<u64>(),
        strategy::palette(),
        strategy::palette(),
        strategy::slot_spec(),
        prop::collection::vec(strategy::op(), 1..8),
        prop::sample::select(vec![3usize, 64, 1000, 4096, 5000, 1 << 15]),
    )
        .prop_map(|(shapes, seed, weights, grads, slots, ops, min_par)| Case {
            shapes,
            seed,
            weights,
            grads,
            slots,
            ops,
            min_par,
        })
}

/// Applies one operation to both backends.
#[allow(clippy::type_complexity)]
fn apply<T: Bits>(
    op: &Op,
    nd: &mut NdGroup<T>,
    r: &mut sam_core::reference::VecBuffer<T>,
) -> (
    Result<Option<Reduction>, NdError>,
    Result<Option<Reduction>, SliceError>,
) {
    match op {
        Op::Reduce(s) => (nd.reduce(s).map(Some), r.reduce(s).map(Some)),
        Op::Perturb(s) => (nd.perturb(s).map(|_| None), r.perturb(s).map(|_| None)),
        Op::Restore => (nd.restore().map(|_| None), r.restore().map(|_| None)),
        Op::Update(s) => (nd.update(s).map(|_| None), r.update(s).map(|_| None)),
        Op::Fold(f) => (
            nd.fold_averages(f).map(|_| None),
            r.fold_averages(f).map(|_| None),
        ),
        Op::Swap(k) => (
            nd.swap_average(*k).map(|_| None),
            r.swap_average(*k).map(|_| None),
        ),
        Op::NewGradient(seed, palette) => {
            let v: Vec<T> = values(&mut SplitMix(*seed), nd.len(), *palette);
            write_grad_nd(nd, |i, _| v[i].to_f64());
            write_grad_ref(r, |i, _| v[i].to_f64());
            (Ok(None), Ok(None))
        }
    }
}

fn run_case<T: Bits>(case: &Case) {
    let Fixture {
        mut nd,
        reference: mut r,
    } = Fixture::<T>::new(&case.shapes, case.seed, case.weights, case.grads);
    #[cfg(feature = "rayon")]
    nd.set_min_parallel_len(case.min_par);
    let _ = case.min_par;
    nd.prepare(&case.slots).expect("prepare (ndarray)");
    r.prepare(&case.slots).expect("prepare (reference)");
    assert_same_bits(&nd, &r);
    for (step, op) in case.ops.iter().enumerate() {
        let before = nd.clone();
        match apply(op, &mut nd, &mut r) {
            (Ok(a), Ok(b)) => {
                if let (Some(a), Some(b)) = (a, b) {
                    assert_same_reduction(&a, &b);
                }
                if let Err(e) = check_same_bits(&nd, &r) {
                    panic!("after op {step} ({op:?}): {e}");
                }
            }
            (Err(_), Err(_)) => {
                // A failed pass changes nothing in the ndarray backend. (The reference may have
                // folded some averages before finding a missing one: stop comparing then.)
                if let Err(e) = check_nd_same(&nd, &before) {
                    panic!("op {step} ({op:?}) failed but changed the group: {e}");
                }
                if check_same_bits(&nd, &r).is_err() {
                    return;
                }
            }
            (a, b) => panic!("op {step} ({op:?}): ndarray {a:?} but reference {b:?}"),
        }
    }
}

fn config() -> ProptestConfig {
    // PROPTEST_CASES overrides; the rayon build runs each case five times.
    let default = if cfg!(feature = "rayon") { 48 } else { 128 };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn passes_match_reference_f32(case in case()) {
        sam_tests::on_every_pool(|| run_case::<f32>(&case));
    }

    #[test]
    fn passes_match_reference_f64(case in case()) {
        sam_tests::on_every_pool(|| run_case::<f64>(&case));
    }
}
