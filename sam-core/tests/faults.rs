//! Backend failures at every point of a step never leave weights perturbed: each group ends
//! either exactly as before the step or exactly as after a successful step.

mod common;

use std::cell::Cell;
use std::rc::Rc;

use common::*;
use sam_core::Optimizer as _;
use sam_core::backend::{
    AverageFold, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, SlotSpec, UpdateSpec,
};
use sam_core::reference::{SliceBuffer, SliceError};
use sam_core::{
    BaseRule, Error, Group, GroupOptions, Gsam, GsamConfig, RhoSchedule, Sam, SamConfig, Schedule,
    SgdConfig, Wasam, Wsam, WsamConfig,
};

/// A reference buffer whose passes fail once a shared budget of calls is used up.
struct Flaky<'a> {
    inner: SliceBuffer<'a, f64>,
    budget: Rc<Cell<usize>>,
}

#[derive(Debug)]
struct Injected;

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected failure")
    }
}

impl Flaky<'_> {
    fn tick(&self) -> Result<(), Injected> {
        match self.budget.get() {
            0 => Err(Injected),
            n => {
                self.budget.set(n - 1);
                Ok(())
            }
        }
    }
}

fn lift(e: SliceError) -> Injected {
    panic!("the reference backend failed by itself: {e}")
}

impl ParamBuffer for Flaky<'_> {
    type Scalar = f64;
    type Error = Injected;
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), Injected> {
        self.tick()?;
        self.inner.prepare(spec).map_err(lift)
    }
    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, Injected> {
        self.tick()?;
        self.inner.reduce(spec).map_err(lift)
    }
    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), Injected> {
        self.tick()?;
        self.inner.perturb(spec).map_err(lift)
    }
    fn restore(&mut self) -> Result<(), Injected> {
        // Restores must not fail here: the test checks what the core does with them.
        self.inner.restore().map_err(lift)
    }
    fn update(&mut self, spec: &UpdateSpec) -> Result<(), Injected> {
        self.tick()?;
        self.inner.update(spec).map_err(lift)
    }
    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), Injected> {
        self.tick()?;
        self.inner.fold_averages(fold).map_err(lift)
    }
    fn swap_average(&mut self, k: u8) -> Result<(), Injected> {
        self.inner.swap_average(k).map_err(lift)
    }
}

enum Which {
    Sam,
    Gsam,
    Wsam,
    Wasam,
}

/// One step of `which` on two groups with `budget` pass calls allowed; returns the weights of
/// each group and whether the step succeeded.
fn step(which: &Which, budget: usize) -> (Vec<Vec<f64>>, bool) {
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    })
    .unwrap();
    let mut stores = [
        Store::new(vec![1.0, -2.0, 0.5], vec![0.0; 3]),
        Store::new(vec![0.25, 3.0], vec![0.0; 2]),
    ];
    let b = Rc::new(Cell::new(budget));
    let mut gs: Vec<Group<Flaky<'_>>> = stores
        .iter_mut()
        .map(|s| {
            let inner = SliceBuffer::new(&mut s.w, &mut s.g, &mut s.slots).unwrap();
            Group::with_options(
                Flaky {
                    inner,
                    budget: b.clone(),
                },
                GroupOptions::new(base),
            )
        })
        .collect();
    let grad = |gs: &mut [Group<Flaky<'_>>]| {
        for g in gs.iter_mut() {
            let (w, gr) = g.buffer.inner.weights_and_grad();
            for (gi, wi) in gr.iter_mut().zip(w) {
                *gi = 2.0 * wi - 1.0;
            }
        }
        Ok::<_, Error<Injected>>(())
    };
    let ok = match which {
        Which::Sam => Sam::new(SamConfig::default())
            .unwrap()
            .step(&mut gs, grad)
            .is_ok(),
        Which::Gsam => {
            let c = GsamConfig::new(RhoSchedule::Schedule(Schedule::constant(0.05).unwrap()));
            Gsam::new(c).unwrap().step(&mut gs, grad).is_ok()
        }
        Which::Wsam => {
            let c = WsamConfig {
                max_norm: Some(1.0),
                ..Default::default()
            };
            Wsam::new(c).unwrap().step(&mut gs, grad).is_ok()
        }
        Which::Wasam => Wasam::new(SamConfig::default(), &[0])
            .unwrap()
            .step(&mut gs, grad)
            .is_ok(),
    };
    (
        gs.iter()
            .map(|g| g.buffer.inner.weights().to_vec())
            .collect(),
        ok,
    )
}

#[test]
fn failures_never_leave_weights_perturbed() {
    for which in [Which::Sam, Which::Gsam, Which::Wsam, Which::Wasam] {
        let (before, _) = step(&which, 0);
        let (after, ok) = step(&which, usize::MAX);
        assert!(ok);
        let mut failures = 0;
        for budget in 0..64 {
            let (w, ok) = step(&which, budget);
            if ok {
                assert_eq!(w, after);
                break;
            }
            failures += 1;
            for (gi, wg) in w.iter().enumerate() {
                assert!(
                    bits(wg) == bits(&before[gi]) || bits(wg) == bits(&after[gi]),
                    "budget {budget}, group {gi}: weights {wg:?} are neither before {:?} nor after {:?}",
                    before[gi],
                    after[gi]
                );
            }
        }
        assert!(
            failures >= 6,
            "every pass was tried ({failures} failure points)"
        );
    }
}
