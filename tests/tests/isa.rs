//! The finiteness check at every instruction-set level this CPU supports
//! (`sam_ndarray::isa`), against the reference backend: one non-finite value (NaN, +∞, −∞) at
//! positions around chunk, block and tensor boundaries, and groups of extreme finite values
//! (largest, smallest subnormal, signed zeros), which must read as finite.

use sam_core::backend::{ParamBuffer, ReduceSpec};
use sam_ndarray::isa::{self, Isa};
use sam_tests::{Bits, Fixture, Palette, assert_same_reduction, write_grad_nd, write_grad_ref};

/// Tensors that put tensor boundaries inside chunks and blocks.
fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![63],
        vec![4096 + 5],
        vec![0],
        vec![2, 4096],
        vec![1],
        vec![129],
    ]
}

fn check<T: Bits>(level: Isa) {
    isa::set_limit(Some(level));
    assert_eq!(isa::active(), level);
    let Fixture {
        mut nd,
        mut reference,
    } = Fixture::<T>::new(&shapes(), 7, Palette::Moderate, Palette::Extreme);
    let len = nd.len();
    // The largest finite value of the storage type, subnormals, signed zeros.
    let max = if T::NAME == "f64" {
        f64::MAX
    } else {
        f64::from(f32::MAX)
    };
    let extreme = [max, f64::MIN_POSITIVE, 5e-324, -0.0, 0.0, 1e-45, 1.0];
    let finite = |i: usize, w: f64| extreme[i % extreme.len()] * if w < 0.0 { -1.0 } else { 1.0 };
    write_grad_nd(&mut nd, finite);
    write_grad_ref(&mut reference, finite);
    let a = nd.reduce(&ReduceSpec::FINITE_ONLY).unwrap();
    let b = reference.reduce(&ReduceSpec::FINITE_ONLY).unwrap();
    assert!(
        a.finite,
        "{level:?}: extreme finite values read as non-finite"
    );
    assert_same_reduction(&a, &b);
    let mut positions = vec![0, 1, 62, 63, 64, 127, 128, 4095, 4096, 4097, 8191, 8192];
    positions.extend([len - 130, len - 129, len - 65, len - 64, len - 2, len - 1]);
    for p in positions {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let f = |i: usize, w: f64| if i == p { bad } else { finite(i, w) };
            write_grad_nd(&mut nd, f);
            write_grad_ref(&mut reference, f);
            let a = nd.reduce(&ReduceSpec::FINITE_ONLY).unwrap();
            let b = reference.reduce(&ReduceSpec::FINITE_ONLY).unwrap();
            assert!(!a.finite, "{level:?}: {bad} at {p} of {len} not detected");
            assert_same_reduction(&a, &b);
        }
    }
}

#[test]
fn every_supported_level_matches_the_reference() {
    let levels: Vec<Isa> = Isa::ALL.into_iter().filter(|l| l.is_supported()).collect();
    assert_eq!(levels[0], Isa::Baseline);
    for &level in &levels {
        check::<f32>(level);
        check::<f64>(level);
    }
    isa::set_limit(None);
    assert_eq!(isa::active(), *levels.last().unwrap());
    isa::set_limit(Some(isa::DEFAULT_LIMIT));
    eprintln!(
        "levels checked: {:?}",
        levels.iter().map(|l| l.name()).collect::<Vec<_>>()
    );
}
