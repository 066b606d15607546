//! The data-parallel scenarios, written once over any [`Workers`] (a [`Collective`] that can
//! also average a gradient): run by `tests/tests/data_parallel.rs` with threads as workers and
//! by `sam-mpi`'s check with MPI processes. Each function is one worker's part; the caller
//! compares the workers' results with [`single`], one process holding the whole groups.

use core::ops::Range;

use sam_core::backend::ParamBuffer;
use sam_core::collective::{Collective, Distributed, Layout, SyncPolicy};
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    AdamConfig, BaseRule, Error, Group, GroupOptions, Optimizer, SgdConfig, StepStatus,
};

use crate::variants::MapOptions;

/// A [`Collective`] that can also average an `f32` gradient over the workers (what the backward
/// pass of a data-parallel run does).
pub trait Workers: Collective {
    /// `g ← mean over the workers of g`, the same bits on every worker.
    fn average(&self, g: &mut [f32]);
}

/// Group sizes: 2 and 4 blocks of 4096 elements, so that halves are whole blocks.
pub const SIZES: [usize; 2] = [8192, 16384];
/// Steps of every scenario.
pub const STEPS: usize = 5;

/// Each group's values at one point of a run.
pub type Snapshot = Vec<Vec<f32>>;
/// A worker's statuses and weights, step by step.
pub type Run = (Vec<StepStatus>, Vec<Snapshot>);
/// A group of a worker.
pub type Dist<'s, C> = Distributed<'s, VecBuffer<f32>, C>;

/// SGD with momentum and weight decay; Adam with ASAM's weighting (options mapped by `map`).
pub fn options(map: MapOptions) -> Vec<GroupOptions> {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        ..Default::default()
    })
    .expect("sgd");
    let adam = BaseRule::adam(AdamConfig {
        lr: 0.01,
        ..Default::default()
    })
    .expect("adam");
    vec![
        map(GroupOptions::new(sgd)),
        map(GroupOptions::new(adam).with_adaptive(true)),
    ]
}

/// Initial weight `i` of group `group`.
pub fn initial(group: usize, i: usize) -> f64 {
    (((i * 7 + group * 13) % 23) as f64 - 11.0) / 16.0
}

/// The gradient of element `i` (of the whole group) at weight `w`, for gradient `salt` of a
/// run, on data shard `worker` (`Some((k, n))`: worker `k` of `n`) or the whole batch (`None`).
pub fn grad_at(i: usize, w: f64, salt: usize, worker: Option<(usize, usize)>) -> f64 {
    let c = 0.5 + ((i + salt) % 7) as f64 * 0.25;
    let base = c * (w - 0.3) + w * w * w / 8.0;
    match worker {
        Some((k, _)) => base + ((i + 3 * k + salt) % 5) as f64 * 0.125 - 0.25,
        None => base,
    }
}

/// The whole groups, as one process holds them.
pub fn whole_groups(opts: &[GroupOptions]) -> Vec<Group<VecBuffer<f32>>> {
    SIZES
        .iter()
        .zip(opts)
        .enumerate()
        .map(|(gk, (&n, o))| {
            let w = (0..n).map(|i| initial(gk, i) as f32).collect();
            Group::with_options(VecBuffer::new(w, vec![0.0; n]).expect("buffer"), *o)
        })
        .collect()
}

/// A worker's groups: elements `part(n)` of each group of `n` elements, on `comm`.
pub fn worker_groups<'s, C: Collective>(
    comm: &'s C,
    opts: &[GroupOptions],
    layout: Layout,
    part: impl Fn(usize) -> Range<usize>,
) -> Vec<Group<Dist<'s, C>>> {
    SIZES
        .iter()
        .zip(opts)
        .enumerate()
        .map(|(gk, (&n, o))| {
            let w: Vec<f32> = part(n).map(|i| initial(gk, i) as f32).collect();
            let len = w.len();
            let b = VecBuffer::new(w, vec![0.0; len]).expect("buffer");
            Group::with_options(Distributed::new(b, comm, layout), *o)
        })
        .collect()
}

/// One process holding the whole groups, gradients from `grad_at(.., None)`: the statuses and
/// the weights of each group after every step.
pub fn single<O: Optimizer + Clone>(opt: &O, map: MapOptions) -> Run {
    single_with(opt, map, None)
}

/// The gradient a single process uses: `grad_at(.., None)`, or with `Some(n)` the mean of the
/// `n` workers' `f32` gradients (summed in `f64` in rank order, rounded once: what
/// [`Workers::average`] gives for two workers, where the sum of two is exact either way).
pub fn whole_batch_grad(i: usize, w: f64, salt: usize, workers: Option<usize>) -> f32 {
    match workers {
        None => grad_at(i, w, salt, None) as f32,
        Some(n) => {
            let sum = (0..n).fold(0.0, |acc, k| {
                acc + f64::from(grad_at(i, w, salt, Some((k, n))) as f32)
            });
            (sum / n as f64) as f32
        }
    }
}

/// [`single`] with the gradients of [`whole_batch_grad`].
pub fn single_with<O: Optimizer + Clone>(opt: &O, map: MapOptions, workers: Option<usize>) -> Run {
    let opts = options(map);
    let mut groups = whole_groups(&opts);
    let mut opt = opt.clone();
    let (mut statuses, mut weights) = (vec![], vec![]);
    for step in 0..STEPS {
        let mut call = 0;
        let r = opt.step(&mut groups, |gs: &mut [Group<VecBuffer<f32>>]| {
            for g in gs.iter_mut() {
                let (w, grad) = g.buffer.weights_and_grad();
                for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
                    *gi = whole_batch_grad(i, f64::from(*wi), 2 * step + call, workers);
                }
            }
            call += 1;
            Ok::<_, Error<SliceError>>(0.0)
        });
        statuses.push(r.expect("single-process step").status);
        weights.push(groups.iter().map(|g| g.buffer.weights().to_vec()).collect());
    }
    (statuses, weights)
}

/// The element range of each group that worker `k` holds when cut at `cuts` (in units of
/// 1/`den` of the group: worker `k` holds `cuts[k]..cuts[k + 1]`).
pub fn shard(cuts: &[usize], den: usize, k: usize) -> impl Fn(usize) -> Range<usize> + '_ {
    move |n| n * cuts[k] / den..n * cuts[k + 1] / den
}

/// One worker of a sharded run ([`shard`]), gradients from `grad_at(.., None)` at the global
/// element index: its statuses and its parts' weights after every step.
pub fn sharded_worker<C: Collective, O: Optimizer + Clone>(
    comm: &C,
    opt: &O,
    map: MapOptions,
    cuts: &[usize],
    den: usize,
) -> Run {
    let opts = options(map);
    let mut opt = opt.clone();
    let range = shard(cuts, den, comm.rank());
    let mut groups = worker_groups(comm, &opts, Layout::Sharded, &range);
    let (mut statuses, mut weights) = (vec![], vec![]);
    for step in 0..STEPS {
        let mut call = 0;
        let r = opt.step(&mut groups, |gs: &mut [Group<Dist<'_, C>>]| {
            for (gk, g) in gs.iter_mut().enumerate() {
                let start = range(SIZES[gk]).start;
                let (w, grad) = g.buffer.inner_mut().weights_and_grad();
                for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
                    let x = f64::from(*wi);
                    *gi = grad_at(start + i, x, 2 * step + call, None) as f32;
                }
            }
            call += 1;
            Ok::<_, Error<<Dist<'_, C> as ParamBuffer>::Error>>(0.0)
        });
        statuses.push(r.expect("sharded step").status);
        weights.push(
            groups
                .iter()
                .map(|g| g.buffer.inner().weights().to_vec())
                .collect(),
        );
    }
    (statuses, weights)
}

/// What one replicated worker saw: per step, its status, its weights after the step, the
/// weights its second gradient was taken at, and the (averaged) second gradient.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Step outcomes.
    pub statuses: Vec<StepStatus>,
    /// Weights after each step.
    pub weights: Vec<Snapshot>,
    /// The weights the second gradient was taken at (empty for a step that asked for one).
    pub perturbed: Vec<Snapshot>,
    /// The second gradient, as averaged.
    pub second: Vec<Snapshot>,
    /// Gradient evaluations in all.
    pub calls: usize,
}

/// One worker of a replicated run under `policy`; its gradients are `grad_at(.., Some(k))`,
/// with a NaN in worker `nan.1`'s first gradient of step `nan.0` if given. Every step is
/// treated as climbing (see [`SyncPolicy::averages`]).
pub fn replicated_worker<C: Workers, O: Optimizer + Clone>(
    comm: &C,
    opt: &O,
    map: MapOptions,
    policy: SyncPolicy,
    nan: Option<(usize, usize)>,
) -> Seen {
    let (k, workers) = (comm.rank(), comm.workers());
    let opts = options(map);
    let mut opt = opt.clone();
    let mut groups = worker_groups(comm, &opts, Layout::Replicated, |n| 0..n);
    let mut seen = Seen::default();
    for step in 0..STEPS {
        let mut call = 0;
        let (mut at, mut second) = (vec![], vec![]);
        let r = opt.step(&mut groups, |gs: &mut [Group<Dist<'_, C>>]| {
            for g in gs.iter_mut() {
                let b = g.buffer.inner_mut();
                let (w, grad) = b.weights_and_grad();
                for (i, (gi, wi)) in grad.iter_mut().zip(w).enumerate() {
                    let x = f64::from(*wi);
                    *gi = grad_at(i, x, 2 * step + call, Some((k, workers))) as f32;
                }
                if nan == Some((step, k)) && call == 0 {
                    grad[17] = f32::NAN;
                }
                if policy.averages(call, true) {
                    comm.average(grad);
                }
                if call == 1 {
                    at.push(b.weights().to_vec());
                    second.push(b.grad().to_vec());
                }
            }
            call += 1;
            Ok::<_, Error<<Dist<'_, C> as ParamBuffer>::Error>>(0.0)
        });
        seen.calls += call;
        seen.statuses.push(r.expect("replicated step").status);
        seen.weights.push(
            groups
                .iter()
                .map(|g| g.buffer.inner().weights().to_vec())
                .collect(),
        );
        seen.perturbed.push(at);
        seen.second.push(second);
    }
    seen
}

/// The bits of every value.
pub fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|x| x.iter().map(|y| y.to_bits()).collect())
        .collect()
}

/// What the reassociated norm sums of uneven shards can move a weight by: 4 `f32` ulps,
/// relative to `max(1, |w|)`.
pub const REASSOCIATED: f64 = 4.0 * f32::EPSILON as f64;

/// `got` equals `want` bit for bit (`tol = None`), or every value lies within `tol` of it,
/// relative to `max(1, |want|)`; `ctx` names the comparison in the panic message.
pub fn assert_matches(got: &[Vec<f32>], want: &[Vec<f32>], tol: Option<f64>, ctx: &str) {
    match tol {
        None => assert_eq!(bits(got), bits(want), "{ctx}"),
        Some(tol) => {
            let worst = got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .map(|(a, b)| f64::from(a - b).abs() / f64::from(b.abs()).max(1.0))
                .fold(0.0, f64::max);
            assert!(worst <= tol, "{ctx}: {worst:e} > {tol:e}");
        }
    }
}
