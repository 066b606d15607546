//! After the first step (which allocates the slots), a whole optimizer step allocates nothing:
//! `Sam::first_step` + `second_step`, a closure-driven `Sam::step` and a `BaseOptimizer` step,
//! on a group of many tensors. Counted by a global allocator wrapper (single-threaded build:
//! rayon's pool allocates its own job bookkeeping).
//!
//! This is the only test in this binary, so no other test thread allocates while it counts.
#![cfg(not(feature = "rayon"))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ndarray::{ArrayD, IxDyn};
use sam_core::{
    AdamConfig, BaseOptimizer, BaseRule, Group, GroupOptions, Sam, SamConfig, SgdConfig, StepStatus,
};
use sam_core::{Optimizer as _, SamOptimizer as _};
use sam_ndarray::{NdError, NdGroup};

/// Counts allocations while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY (the one `unsafe` of this crate's tests): a `GlobalAlloc` must be an `unsafe impl`;
// every method forwards its arguments unchanged to the system allocator, whose contract is the
// same, and only bumps a counter besides.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made while running `f`.
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

fn group(shapes: &[&[usize]]) -> NdGroup<f32> {
    let w = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let mut x = k as f32;
            ArrayD::from_shape_simple_fn(IxDyn(s), || {
                x += 0.37;
                x.sin()
            })
        })
        .collect();
    NdGroup::new(w).expect("group")
}

/// `g = w − 0.5` into every tensor (no allocation).
fn backward(groups: &mut [Group<NdGroup<f32>>]) {
    for g in groups {
        let (w, mut grads) = g.buffer.weights_and_grads_mut();
        for (t, wt) in w.iter().enumerate() {
            if let Some(gs) = grads.slice_mut(t) {
                for (gi, wi) in gs.iter_mut().zip(wt.iter()) {
                    *gi = wi - 0.5;
                }
            }
        }
    }
}

#[test]
fn steps_after_the_first_do_not_allocate() {
    let shapes: &[&[usize]] = &[
        &[16, 3, 3, 3],
        &[16],
        &[16],
        &[5000],
        &[0],
        &[4097],
        &[3, 7],
    ];
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..Default::default()
    })
    .unwrap();
    let adam = BaseRule::adamw(AdamConfig {
        lr: 1e-3,
        amsgrad: true,
        ..Default::default()
    })
    .unwrap();
    let mut groups = vec![
        Group::new(group(shapes), sgd),
        Group::with_options(
            group(&shapes[3..]),
            GroupOptions::new(adam).with_adaptive(true),
        ),
    ];

    // SAM through the guard: the first step allocates the slots, the next ones nothing.
    let mut sam = Sam::new(SamConfig::default()).unwrap();
    let mut sam_step = |groups: &mut [Group<NdGroup<f32>>]| {
        backward(groups);
        let mut guard = sam.first_step(groups).expect("first step");
        backward(guard.groups_mut());
        assert_eq!(
            guard.second_step().expect("second step"),
            StepStatus::Applied
        );
    };
    sam_step(&mut groups);
    assert_eq!(
        allocations(|| sam_step(&mut groups)),
        0,
        "a SAM step allocated"
    );
    assert_eq!(
        allocations(|| sam_step(&mut groups)),
        0,
        "a SAM step allocated"
    );

    // The closure-driven step.
    let mut sam2 = Sam::new(SamConfig {
        perturbation: sam_core::Perturbation {
            rho: 0.1,
            adaptive: true,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let mut closure_step = |groups: &mut [Group<NdGroup<f32>>]| {
        let report = sam2
            .step(groups, |gs| {
                backward(gs);
                Ok::<_, sam_core::Error<NdError>>(())
            })
            .expect("step");
        assert_eq!(report.status, StepStatus::Applied);
    };
    closure_step(&mut groups);
    assert_eq!(
        allocations(|| closure_step(&mut groups)),
        0,
        "a closure-driven SAM step allocated"
    );

    // The base optimizer (the slot spec changes: the backup is freed on its first step).
    let mut base = BaseOptimizer::new();
    let mut base_step = |groups: &mut [Group<NdGroup<f32>>]| {
        backward(groups);
        assert_eq!(base.apply(groups).expect("base step"), StepStatus::Applied);
    };
    base_step(&mut groups);
    assert_eq!(
        allocations(|| base_step(&mut groups)),
        0,
        "a base step allocated"
    );

    // Sanity: the counter works.
    assert!(allocations(|| drop(std::hint::black_box(vec![1u8; 10]))) >= 1);
}
