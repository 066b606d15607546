//! Data-parallel semantics of `sam_core::collective`, with the workers as threads of this
//! process and the collective a barrier over shared memory (rank-order sums, the order an MPI
//! or NCCL implementation is asked for). For every variant:
//!
//! - sharded: two workers holding the halves of every group (cut at a block boundary) take,
//!   bit for bit, the steps of one process holding the whole groups; three workers with
//!   uneven cuts differ from it only by the reassociation of the norm sums (stated tolerance);
//! - replicated, `SyncPolicy::Global` (both gradients averaged): every worker takes, bit for bit,
//!   the step of one process given the averaged gradients;
//! - replicated, `SyncPolicy::Local` (m-sharpness): each worker's perturbation is the one a
//!   single process computes from that worker's own gradient, and the final step is the base
//!   rule's on the averaged second gradient, the same on every worker;
//! - a NaN in one worker's gradient makes every worker skip the step, with no second gradient
//!   asked for and every weight unchanged.

use std::sync::{Barrier, Mutex};

use sam_core::collective::{Collective, Layout, SyncPolicy};
use sam_core::reference::VecBuffer;
use sam_core::{BaseOptimizer, Group, Optimizer, SamOptimizer, StepStatus, Wsam, WsamConfig};
use sam_tests::dp::{
    self, Run, SIZES, STEPS, Snapshot, Workers, bits, grad_at, initial, options, whole_groups,
    worker_groups,
};
use sam_tests::variants::{ALL_NAMES, MapOptions, NAMES};
use sam_tests::with_variant;

/// The memory the workers exchange through.
struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f64>>>,
}

impl Shared {
    fn new(n: usize) -> Self {
        Shared {
            barrier: Barrier::new(n),
            slots: Mutex::new(vec![vec![]; n]),
        }
    }
}

/// One worker's end of the collective.
struct ThreadComm<'s> {
    rank: usize,
    n: usize,
    shared: &'s Shared,
}

impl ThreadComm<'_> {
    /// `x[i] ← op(…op(op(x_0[i], x_1[i]), x_2[i])…)` over the workers, in rank order.
    fn combine(&self, x: &mut [f64], op: fn(f64, f64) -> f64) {
        self.shared.slots.lock().unwrap()[self.rank] = x.to_vec();
        self.shared.barrier.wait();
        {
            let all = self.shared.slots.lock().unwrap();
            for (i, v) in x.iter_mut().enumerate() {
                *v = (1..self.n).fold(all[0][i], |acc, k| op(acc, all[k][i]));
            }
        }
        self.shared.barrier.wait();
    }
}

impl Workers for ThreadComm<'_> {
    /// The mean over the workers (summed in f64 in rank order, rounded once).
    fn average(&self, g: &mut [f32]) {
        let mut x: Vec<f64> = g.iter().map(|&v| f64::from(v)).collect();
        self.combine(&mut x, |a, b| a + b);
        for (v, s) in g.iter_mut().zip(x) {
            *v = (s / self.n as f64) as f32;
        }
    }
}

impl Collective for ThreadComm<'_> {
    type Error = std::convert::Infallible;
    fn rank(&self) -> usize {
        self.rank
    }
    fn workers(&self) -> usize {
        self.n
    }
    fn sum(&self, x: &mut [f64]) -> Result<(), Self::Error> {
        self.combine(x, |a, b| a + b);
        Ok(())
    }
    fn max(&self, x: &mut [f64]) -> Result<(), Self::Error> {
        self.combine(x, f64::max);
        Ok(())
    }
}

/// Runs `work` on `n` threads, each with its end of one collective; the results in rank order.
fn on_workers<R: Send>(n: usize, work: impl Fn(&ThreadComm<'_>) -> R + Sync) -> Vec<R> {
    let shared = Shared::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (shared, work) = (&shared, &work);
                s.spawn(move || work(&ThreadComm { rank, n, shared }))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `workers` threads, worker `k` holding elements `cuts[k]..cuts[k + 1]` of every group (in
/// units of 1/`den`): each worker's statuses and weights per step.
fn sharded<O: Optimizer + Clone + Send + Sync>(
    opt: &O,
    map: MapOptions,
    cuts: &[usize],
    den: usize,
) -> Vec<Run> {
    on_workers(cuts.len() - 1, |comm| {
        dp::sharded_worker(comm, opt, map, cuts, den)
    })
}

/// The shards' weights of each step, concatenated per group.
fn concatenated(parts: &[Run]) -> Vec<Snapshot> {
    (0..STEPS)
        .map(|t| {
            (0..SIZES.len())
                .map(|g| {
                    parts
                        .iter()
                        .flat_map(|p| p.1[t][g].iter().copied())
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[test]
fn sharded_halves_at_a_block_boundary_give_the_unsharded_bits() {
    for (name, map) in ALL_NAMES {
        with_variant!(name, |opt| {
            let (statuses, want) = dp::single(&opt, map);
            let parts = sharded(&opt, map, &[0, 1, 2], 2);
            for p in &parts {
                assert_eq!(p.0, statuses, "{name}: statuses");
            }
            let got = concatenated(&parts);
            for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                dp::assert_matches(g, w, None, &format!("{name}: step {t}"));
            }
        });
    }
}

#[test]
fn sharded_uneven_thirds_differ_from_unsharded_by_reassociation_only() {
    for (name, map) in ALL_NAMES {
        with_variant!(name, |opt| {
            let (statuses, want) = dp::single(&opt, map);
            let parts = sharded(&opt, map, &[0, 3, 4, 10], 10);
            let got = concatenated(&parts);
            for p in &parts {
                assert_eq!(p.0, statuses, "{name}: statuses");
            }
            // The norms differ in their last bits; a weight moves by at most a few f32 ulps.
            for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                let ctx = format!("{name}: step {t}");
                dp::assert_matches(g, w, Some(dp::REASSOCIATED), &ctx);
            }
        });
    }
}

/// `workers` replicas under `policy` (see [`dp::replicated_worker`]).
fn replicated<O: Optimizer + Clone + Send + Sync>(
    opt: &O,
    map: MapOptions,
    workers: usize,
    policy: SyncPolicy,
    nan: Option<(usize, usize)>,
) -> Vec<dp::Seen> {
    on_workers(workers, |comm| {
        dp::replicated_worker(comm, opt, map, policy, nan)
    })
}

#[test]
fn global_replicas_take_the_single_process_step_on_the_averaged_gradients() {
    for (name, map) in ALL_NAMES {
        with_variant!(name, |opt| {
            let seen = replicated(&opt, map, 2, SyncPolicy::Global, None);
            // The single process: the same averaging of the two shards' gradients.
            let (statuses, want) = dp::single_with(&opt, map, Some(2));
            for (k, s) in seen.iter().enumerate() {
                assert_eq!(s.statuses, statuses, "{name} worker {k}");
                for (t, (got, want)) in s.weights.iter().zip(&want).enumerate() {
                    assert_eq!(bits(got), bits(want), "{name} worker {k} step {t}");
                }
            }
        });
    }
}

#[test]
fn local_replicas_climb_along_their_own_gradient_and_step_on_the_average() {
    for (name, map) in [ALL_NAMES[0], ALL_NAMES[1]] {
        with_variant!(name, |opt| {
            let seen = replicated(&opt, map, 2, SyncPolicy::Local, None);
            let opts = options(map);
            for step in 0..STEPS {
                // Every replica ends the step with the same weights.
                assert_eq!(
                    bits(&seen[0].weights[step]),
                    bits(&seen[1].weights[step]),
                    "{name}"
                );
                let clean = |k: usize| -> Vec<Vec<f32>> {
                    if step == 0 {
                        SIZES
                            .iter()
                            .enumerate()
                            .map(|(gk, &n)| (0..n).map(|i| initial(gk, i) as f32).collect())
                            .collect()
                    } else {
                        seen[k].weights[step - 1].clone()
                    }
                };
                for (k, s) in seen.iter().enumerate() {
                    // Worker k's climb is a single process's climb on its own gradient.
                    let mut groups: Vec<Group<VecBuffer<f32>>> = clean(k)
                        .into_iter()
                        .zip(&opts)
                        .map(|(w, o)| {
                            let n = w.len();
                            Group::with_options(VecBuffer::new(w, vec![0.0; n]).unwrap(), *o)
                        })
                        .collect();
                    for g in groups.iter_mut() {
                        let (w, grad) = g.buffer.weights_and_grad();
                        for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
                            *gi = grad_at(i, f64::from(*wi), 2 * step, Some((k, 2))) as f32;
                        }
                    }
                    let mut fresh = opt.clone();
                    let climbed = fresh.first_step(&mut groups).unwrap();
                    let perturbed: Vec<Vec<f32>> = climbed
                        .groups()
                        .iter()
                        .map(|g| g.buffer.weights().to_vec())
                        .collect();
                    assert_eq!(
                        bits(&s.perturbed[step]),
                        bits(&perturbed),
                        "{name} worker {k}"
                    );
                    drop(climbed);
                }
                // The two replicas climbed to different points (their own gradients).
                assert_ne!(
                    bits(&seen[0].perturbed[step]),
                    bits(&seen[1].perturbed[step])
                );
                assert_eq!(bits(&seen[0].second[step]), bits(&seen[1].second[step]));
            }
            // The final steps are the base rule's on the averaged second gradients.
            let mut groups = whole_groups(&opts);
            let mut base = BaseOptimizer::new();
            for step in 0..STEPS {
                for (g, second) in groups.iter_mut().zip(&seen[0].second[step]) {
                    g.buffer.grad_mut().copy_from_slice(second);
                }
                base.apply(&mut groups).unwrap();
                let want: Vec<Vec<f32>> =
                    groups.iter().map(|g| g.buffer.weights().to_vec()).collect();
                assert_eq!(
                    bits(&seen[0].weights[step]),
                    bits(&want),
                    "{name} step {step}"
                );
            }
        });
    }
}

#[test]
fn a_nan_on_one_worker_makes_every_worker_skip() {
    // Under `Local`, LookSAM's steps between refreshes would need their one gradient averaged
    // (`SyncPolicy::averages(0, false)`); the helper treats every step as climbing.
    let local = NAMES.iter().map(|&v| (v, SyncPolicy::Local));
    let global = ALL_NAMES.iter().map(|&v| (v, SyncPolicy::Global));
    for ((name, map), policy) in local.chain(global) {
        {
            with_variant!(name, |opt| {
                let seen = replicated(&opt, map, 3, policy, Some((2, 1)));
                for (k, s) in seen.iter().enumerate() {
                    assert!(s.statuses[2].is_skipped(), "{name} {policy:?} worker {k}");
                    assert_eq!(
                        bits(&s.weights[2]),
                        bits(&s.weights[1]),
                        "{name} worker {k}"
                    );
                    assert_eq!(s.calls, seen[0].calls, "{name}: the same gradient calls");
                }
                assert!(
                    !seen[0].statuses[3].is_skipped(),
                    "{name}: the next step is applied"
                );
            });
        }
    }
}

/// GSAM's and WSAM's final direction mixes the clean gradient (the stash) into the second one,
/// so under m-sharpness each worker's direction must be formed from its own two gradients and
/// the directions averaged (GSAM's upstream recipe): `restore_with_gradient` leaves the
/// direction in the gradient storage, the workers average it, and a base optimizer applies it.
/// The replicas stay equal, although each climbed along its own gradient.
#[test]
fn local_directions_averaged_after_the_variant_keep_replicas_equal() {
    let wsam = Wsam::new(WsamConfig {
        decouple: false,
        ..WsamConfig::default()
    })
    .unwrap();
    local_directions_averaged("GSAM", &sam_tests::variants::gsam(), NAMES[2].1);
    local_directions_averaged("WSAM", &wsam, NAMES[4].1);
}

fn local_directions_averaged<O: SamOptimizer + Clone + Send + Sync>(
    name: &str,
    opt: &O,
    map: MapOptions,
) {
    let opts = options(map);
    let runs: Vec<(Vec<Snapshot>, Vec<Snapshot>)> = on_workers(2, |comm| {
        let (k, mut opt) = (comm.rank, opt.clone());
        let mut groups = worker_groups(comm, &opts, Layout::Replicated, |n| 0..n);
        let mut base = BaseOptimizer::new();
        let write = |gs: &mut [Group<dp::Dist<'_, ThreadComm<'_>>>], salt: usize| {
            for g in gs.iter_mut() {
                let (w, grad) = g.buffer.inner_mut().weights_and_grad();
                for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
                    let x = f64::from(*wi);
                    *gi = grad_at(i, x, salt, Some((k, 2))) as f32;
                }
            }
        };
        let (mut directions, mut weights) = (vec![], vec![]);
        for step in 0..STEPS {
            write(&mut groups, 2 * step);
            let mut p = opt.first_step(&mut groups).unwrap();
            write(p.groups_mut(), 2 * step + 1);
            assert_eq!(p.restore_with_gradient().unwrap(), StepStatus::Applied);
            let d: Vec<Vec<f32>> = groups
                .iter()
                .map(|g| g.buffer.inner().grad().to_vec())
                .collect();
            directions.push(d);
            for g in groups.iter_mut() {
                comm.average(g.buffer.inner_mut().grad_mut());
            }
            assert_eq!(base.apply(&mut groups).unwrap(), StepStatus::Applied);
            weights.push(
                groups
                    .iter()
                    .map(|g| g.buffer.inner().weights().to_vec())
                    .collect(),
            );
        }
        (directions, weights)
    });
    for step in 0..STEPS {
        assert_ne!(
            bits(&runs[0].0[step]),
            bits(&runs[1].0[step]),
            "{name}: local"
        );
        assert_eq!(
            bits(&runs[0].1[step]),
            bits(&runs[1].1[step]),
            "{name} step {step}"
        );
    }
}
