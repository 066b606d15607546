//! Every reduce pass at every instruction-set level this CPU supports (`sam_ndarray::isa`),
//! against the reference backend:
//! - the finiteness check: one non-finite value (NaN, +∞, −∞) at positions around chunk,
//!   block and tensor boundaries, and groups of extreme finite values (largest, smallest
//!   subnormal, signed zeros), which must read as finite;
//! - the norm reductions: every combination of quantities (perturbation norm plain, adaptive
//!   or none; gradient norm; stash norm; dot product), unit and non-unit scales, on moderate,
//!   extreme and non-finite values, over tensors that start and end inside chunks and blocks.

use std::sync::Mutex;

use sam_core::backend::{ParamBuffer, PerturbSpec, ReduceSpec, SlotSpec, Weighting};
use sam_ndarray::isa::{self, Isa};
use sam_tests::{
    Bits, Fixture, Palette, SplitMix, assert_same_reduction, values, write_grad_nd, write_grad_ref,
};

/// Serialises the tests: the level cap is process-wide.
static LEVEL: Mutex<()> = Mutex::new(());

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

/// Tensors for the norm reductions: whole blocks in one tensor, blocks spanning tensors,
/// tensors starting and ending inside chunks.
fn norm_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![3],
        vec![5 * 4096 + 7],
        vec![0],
        vec![17, 9],
        vec![4096],
        vec![2, 2049],
        vec![1],
    ]
}

/// Every reduce spec: each perturbation weighting (or none) with each subset of the other
/// quantities, at unit scales and at power-of-two scales.
fn norm_specs() -> Vec<ReduceSpec> {
    let mut specs = Vec::new();
    for perturb in [
        None,
        Some(Weighting::Plain),
        Some(Weighting::Adaptive { eta: 0.01 }),
    ] {
        for bits in 0..8u8 {
            for (sp, sg, ss, unscale) in [
                (1.0, 1.0, 1.0, 1.0),
                (0.5, 2.0f64.powi(-40), 1024.0, 2.0f64.powi(-16)),
            ] {
                specs.push(ReduceSpec {
                    perturb,
                    grad: bits & 1 != 0,
                    stash: bits & 2 != 0,
                    dot: bits & 4 != 0,
                    scale_perturb: sp,
                    scale_grad: sg,
                    scale_stash: ss,
                    unscale,
                });
            }
        }
    }
    specs
}

fn check_norms<T: Bits>(level: Isa) {
    isa::set_limit(Some(level));
    assert_eq!(isa::active(), level);
    let palettes = [Palette::Moderate, Palette::Extreme, Palette::NonFinite];
    for (k, &weights) in palettes.iter().enumerate() {
        for (j, &grads) in palettes.iter().enumerate() {
            let Fixture {
                mut nd,
                mut reference,
            } = Fixture::<T>::new(&norm_shapes(), 11 + 3 * k as u64 + j as u64, weights, grads);
            let slots = SlotSpec {
                backup: true,
                stash: true,
                state: 0,
                averages: 0,
            };
            nd.prepare(&slots).unwrap();
            reference.prepare(&slots).unwrap();
            // The stash gets this gradient; then a new gradient from the other palette.
            let stash = PerturbSpec {
                stash: true,
                weighting: Weighting::Plain,
                scale: 1.0,
                coeff: 0.0,
                unscale: 1.0,
            };
            nd.perturb(&stash).unwrap();
            reference.perturb(&stash).unwrap();
            let next = palettes[(j + 1) % palettes.len()];
            let v: Vec<T> = values(&mut SplitMix(97 + j as u64), nd.len(), next);
            write_grad_nd(&mut nd, |i, _| v[i].to_f64());
            write_grad_ref(&mut reference, |i, _| v[i].to_f64());
            for spec in norm_specs() {
                let a = nd.reduce(&spec).unwrap();
                let b = reference.reduce(&spec).unwrap();
                assert_same_reduction(&a, &b);
            }
        }
    }
}

#[test]
fn every_supported_level_matches_the_reference_for_norms() {
    let _serial = LEVEL.lock().unwrap_or_else(|e| e.into_inner());
    for level in Isa::ALL.into_iter().filter(|l| l.is_supported()) {
        check_norms::<f32>(level);
        check_norms::<f64>(level);
    }
    isa::set_limit(Some(isa::DEFAULT_LIMIT));
}

#[test]
fn every_supported_level_matches_the_reference() {
    let _serial = LEVEL.lock().unwrap_or_else(|e| e.into_inner());
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
