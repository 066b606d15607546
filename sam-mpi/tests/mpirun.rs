//! Data parallel over MPI processes. `two_processes` and `three_processes` run this test binary
//! under `mpirun -np 2` / `-np 3`, each process running `mpi_worker`, which replays the
//! scenarios of `sam_tests::dp` (the ones `tests/tests/data_parallel.rs` runs on threads) over
//! [`MpiCollective`] for every variant and checks, on every process:
//!
//! - sharded groups: the statuses and weights of one process holding the whole groups, bit for
//!   bit with two processes (halves cut at a block boundary), within 4 f32 ulps with three
//!   (uneven cuts: the norm sums reassociate);
//! - replicated groups, gradients averaged before the climb too (`SyncPolicy::Global`): the
//!   single-process step on the averaged gradients, bit for bit with two processes (a sum of two
//!   is the same in any order), within 1e-5 with three (MPI's summation order); every process
//!   holds the same bits;
//! - replicated SAM under `SyncPolicy::Local`: the processes climb to different points (their
//!   own gradients) and end every step with the same weights;
//! - a NaN in one process's gradient makes every process skip the step, with the same number of
//!   gradient evaluations everywhere and the weights unchanged.
//!
//! Without `mpirun` on the `PATH` the two tests print why and pass; `.ci/run` installs Open MPI.

use std::process::Command;
use std::time::{Duration, Instant};

use mpi::collective::CommunicatorCollectives;
use mpi::topology::SimpleCommunicator;
use sam_core::collective::{Collective, SyncPolicy};
use sam_core::{Optimizer, StepStatus};
use sam_mpi::MpiCollective;
use sam_tests::dp::{self, SIZES, Workers, bits};
use sam_tests::variants::{ALL_NAMES, MapOptions, NAMES};
use sam_tests::with_variant;

/// The test every process runs.
const WORKER: &str = "mpi_worker";
/// How long a run may take before it counts as hung.
const DEADLINE: Duration = Duration::from_secs(600);

/// [`MpiCollective`] with the gradient averaging of [`Workers`].
struct Mpi<'c>(MpiCollective<'c, SimpleCommunicator>);

impl Collective for Mpi<'_> {
    type Error = core::convert::Infallible;
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn workers(&self) -> usize {
        self.0.workers()
    }
    fn sum(&self, x: &mut [f64]) -> Result<(), Self::Error> {
        self.0.sum(x)
    }
    fn max(&self, x: &mut [f64]) -> Result<(), Self::Error> {
        self.0.max(x)
    }
}

impl Workers for Mpi<'_> {
    fn average(&self, g: &mut [f32]) {
        self.0.average(g);
    }
}

/// Every process's `value`, in rank order.
fn gathered(world: &SimpleCommunicator, value: u64, n: usize) -> Vec<u64> {
    let mut all = vec![0u64; n];
    world.all_gather_into(&value, &mut all[..]);
    all
}

/// A digest of the bits of a snapshot.
fn digest(s: &[Vec<f32>]) -> u64 {
    s.iter().flatten().fold(0xcbf2_9ce4_8422_2325, |h, x| {
        (h ^ u64::from(x.to_bits())).wrapping_mul(0x0100_0000_01b3)
    })
}

fn check_sharded<O: Optimizer + Clone>(comm: &Mpi<'_>, name: &str, opt: &O, map: MapOptions) {
    let n = comm.workers();
    let (cuts, den): (Vec<usize>, usize) = match n {
        2 => (vec![0, 1, 2], 2),
        3 => (vec![0, 3, 4, 10], 10),
        _ => ((0..=n).collect(), n),
    };
    let (statuses, want) = dp::single(opt, map);
    let (got_statuses, got) = dp::sharded_worker(comm, opt, map, &cuts, den);
    assert_eq!(got_statuses, statuses, "{name}: sharded statuses");
    let part = dp::shard(&cuts, den, comm.rank());
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        let w: Vec<Vec<f32>> = w
            .iter()
            .zip(SIZES)
            .map(|(v, size)| v[part(size)].to_vec())
            .collect();
        let tol = (n != 2).then_some(dp::REASSOCIATED);
        dp::assert_matches(g, &w, tol, &format!("{name}: sharded step {t}"));
    }
}

fn check_global<O: Optimizer + Clone>(
    world: &SimpleCommunicator,
    comm: &Mpi<'_>,
    name: &str,
    opt: &O,
    map: MapOptions,
) {
    let n = comm.workers();
    let seen = dp::replicated_worker(comm, opt, map, SyncPolicy::Global, None);
    let (statuses, want) = dp::single_with(opt, map, Some(n));
    assert_eq!(seen.statuses, statuses, "{name}: global statuses");
    for (t, (g, w)) in seen.weights.iter().zip(&want).enumerate() {
        // Two processes sum in either order exactly; MPI may sum three in any order.
        let tol = (n != 2).then_some(1e-5);
        dp::assert_matches(g, w, tol, &format!("{name}: global step {t}"));
        let all = gathered(world, digest(g), n);
        assert!(
            all.iter().all(|&h| h == all[0]),
            "{name}: replicas differ at step {t}"
        );
    }
}

fn check_nan<O: Optimizer + Clone>(
    world: &SimpleCommunicator,
    comm: &Mpi<'_>,
    name: &str,
    opt: &O,
    map: MapOptions,
    policy: SyncPolicy,
) {
    let n = comm.workers();
    let seen = dp::replicated_worker(comm, opt, map, policy, Some((2, 1)));
    assert!(
        seen.statuses[2].is_skipped(),
        "{name} {policy:?}: step 2 not skipped"
    );
    assert_eq!(
        bits(&seen.weights[2]),
        bits(&seen.weights[1]),
        "{name}: weights moved"
    );
    let calls = gathered(world, seen.calls as u64, n);
    assert!(
        calls.iter().all(|&c| c == calls[0]),
        "{name}: gradient calls {calls:?}"
    );
}

fn check_local(world: &SimpleCommunicator, comm: &Mpi<'_>) {
    let n = comm.workers();
    let opt = sam_tests::variants::sam();
    let seen = dp::replicated_worker(comm, &opt, NAMES[0].1, SyncPolicy::Local, None);
    for t in 0..dp::STEPS {
        assert_eq!(seen.statuses[t], StepStatus::Applied);
        let at = gathered(world, digest(&seen.perturbed[t]), n);
        assert!(
            at.iter().skip(1).all(|&h| h != at[0]),
            "the climbs are the workers' own"
        );
        let end = gathered(world, digest(&seen.weights[t]), n);
        assert!(
            end.iter().all(|&h| h == end[0]),
            "replicas differ after step {t}"
        );
    }
}

#[test]
#[ignore = "run on every process by `mpirun` (two_processes, three_processes)"]
fn mpi_worker() {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let comm = Mpi(MpiCollective::new(&world));
    for (name, map) in ALL_NAMES {
        with_variant!(name, |opt| {
            check_sharded(&comm, name, &opt, map);
            check_global(&world, &comm, name, &opt, map);
            check_nan(&world, &comm, name, &opt, map, SyncPolicy::Global);
            if NAMES.iter().any(|(n, _)| *n == name) {
                check_nan(&world, &comm, name, &opt, map, SyncPolicy::Local);
            }
        });
    }
    check_local(&world, &comm);
    if comm.rank() == 0 {
        println!(
            "mpi_worker: every check passed on {} processes",
            comm.workers()
        );
    }
}

/// The `mpirun` to use, or why there is none.
fn mpirun() -> Result<(String, bool), String> {
    let out = Command::new("mpirun")
        .arg("--version")
        .output()
        .map_err(|e| format!("no `mpirun` on the PATH ({e}); install Open MPI or MPICH"))?;
    let open_mpi = String::from_utf8_lossy(&out.stdout).contains("Open MPI");
    Ok(("mpirun".into(), open_mpi))
}

/// Runs [`mpi_worker`] on `n` processes and waits (at most [`DEADLINE`]).
fn launch(n: usize) {
    let (mpirun, open_mpi) = match mpirun() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let exe = std::env::current_exe().expect("the test binary");
    let mut cmd = Command::new(mpirun);
    if open_mpi {
        // More processes than cores on a small machine; root in CI containers.
        cmd.arg("--oversubscribe")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    cmd.args(["-np", &n.to_string()]).arg(exe).args([
        WORKER,
        "--exact",
        "--ignored",
        "--test-threads=1",
        "--nocapture",
    ]);
    let mut child = cmd.spawn().expect("mpirun starts");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("mpirun status") {
            assert!(status.success(), "mpirun -np {n} failed: {status}");
            return;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("mpirun -np {n} did not finish in {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_processes() {
    launch(2);
}

#[test]
fn three_processes() {
    launch(3);
}
