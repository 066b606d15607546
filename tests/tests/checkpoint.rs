//! Checkpoint and resume (`sam_core::checkpoint`), bit-exact, for every variant, SAM every 3
//! steps and the base optimizer, on the reference backend (resumed in a new process) and on
//! `NdGroup`s; and every kind of checkpoint that does not fit refused with nothing changed.

use std::cell::Cell;
use std::path::PathBuf;
use std::process::Command;

use sam_core::checkpoint::Checkpoint;
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    BaseOptimizer, Error, Group, Interval, Optimizer, OptimizerState, Phase, SamOptimizer,
    StepStatus,
};
use sam_ndarray::{NdError, NdGroup};
use sam_tests::variants::{ALL_NAMES, MapOptions, gsam, keep, sam};
use sam_tests::{groups, standard_groups, with_variant, write_grads_nd, write_grads_ref};

type Groups = Vec<Group<VecBuffer<f64>>>;

fn fresh(map: MapOptions) -> Groups {
    let (_, stores, opts) = standard_groups::<f64>();
    let opts: Vec<_> = opts.into_iter().map(map).collect();
    groups(stores, &opts)
}

/// `n` steps with the oracle gradient of closure calls `calls, calls + 1, …`.
fn steps<O: Optimizer>(opt: &mut O, gs: &mut Groups, calls: &Cell<u64>, n: usize) {
    for _ in 0..n {
        let report = opt
            .step(gs, |gs: &mut [Group<VecBuffer<f64>>]| {
                write_grads_ref(gs, calls.replace(calls.get() + 1), None);
                Ok::<_, Error<SliceError>>(())
            })
            .unwrap();
        assert_eq!(report.status, StepStatus::Applied);
    }
}

/// The weights of every group as bits (what the framework saves with its model).
fn weight_bits(gs: &Groups) -> Vec<Vec<u64>> {
    gs.iter()
        .map(|g| g.buffer.weights().iter().map(|x| x.to_bits()).collect())
        .collect()
}

fn set_weights(gs: &mut Groups, bits: &[Vec<u64>]) {
    for (g, b) in gs.iter_mut().zip(bits) {
        for (w, &b) in g.buffer.weights_mut().iter_mut().zip(b) {
            *w = f64::from_bits(b);
        }
    }
}

/// The cases: a name, the options change, and whether SAM-every-3 wraps the variant.
fn cases() -> Vec<(String, MapOptions, bool)> {
    let mut v: Vec<_> = ALL_NAMES
        .iter()
        .flat_map(|&(n, m)| [(n.to_string(), m, false), (n.to_string(), m, true)])
        .collect();
    v.push(("BASE".into(), keep, false));
    v
}

/// Runs `$body` with `$opt` bound to the case's optimizer.
macro_rules! with_case {
    ($name:expr, $every:expr, |$opt:ident| $body:block) => {
        if $name == "BASE" {
            let $opt = BaseOptimizer::new();
            $body
        } else {
            with_variant!($name.as_str(), |inner| {
                if $every {
                    let $opt = Interval::new(inner, 3).unwrap();
                    $body
                } else {
                    let $opt = inner;
                    $body
                }
            })
        }
    };
}

const FIRST: usize = 5;
const THEN: usize = 5;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sam-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Saves after `FIRST` steps of every case (checkpoint, weights and gradient-call count as
/// JSON), resumes them in a new process (the test binary running `resume_in_child`), and
/// compares its final weights and slots with an uninterrupted run of `FIRST + THEN` steps.
#[test]
fn a_resumed_run_in_a_new_process_continues_with_the_same_bits() {
    let mut saved = Vec::new();
    let mut expected = Vec::new();
    for (name, map, every) in cases() {
        with_case!(name, every, |opt| {
            let mut whole = opt.clone();
            let (mut gs, calls) = (fresh(map), Cell::new(0));
            steps(&mut whole, &mut gs, &calls, FIRST + THEN);
            expected.push(serde_json::json!({
                "weights": weight_bits(&gs),
                "checkpoint": serde_json::to_value(Checkpoint::save(&whole, &gs).unwrap()).unwrap(),
            }));

            let mut first = opt;
            let (mut gs, calls) = (fresh(map), Cell::new(0));
            steps(&mut first, &mut gs, &calls, FIRST);
            let ckpt = Checkpoint::save(&first, &gs).unwrap();
            saved.push(serde_json::json!({
                "name": name, "every": every, "calls": calls.get(),
                "weights": weight_bits(&gs),
                "checkpoint": serde_json::to_value(&ckpt).unwrap(),
            }));
        });
    }
    let input = scratch("saved.json");
    let output = scratch("resumed.json");
    std::fs::write(&input, serde_json::to_string(&saved).unwrap()).unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "resume_in_child", "--ignored", "--quiet"])
        .env("SAM_CHECKPOINT_IN", &input)
        .env("SAM_CHECKPOINT_OUT", &output)
        .status()
        .unwrap();
    assert!(status.success(), "the child process failed");
    let resumed: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    assert_eq!(resumed.len(), expected.len());
    for ((r, e), (name, _, every)) in resumed.iter().zip(&expected).zip(cases()) {
        assert_eq!(r, e, "{name} (every 3: {every}): resumed run differs");
    }
    let _ = std::fs::remove_dir_all(input.parent().unwrap());
}

/// The child of the test above (run by it in a new process, with the file paths in the
/// environment; ignored when run directly, where it has nothing to resume).
#[test]
#[ignore = "run by a_resumed_run_in_a_new_process_continues_with_the_same_bits"]
fn resume_in_child() {
    let (Ok(input), Ok(output)) = (
        std::env::var("SAM_CHECKPOINT_IN"),
        std::env::var("SAM_CHECKPOINT_OUT"),
    ) else {
        panic!("run by a_resumed_run_in_a_new_process_continues_with_the_same_bits")
    };
    let saved: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(input).unwrap()).unwrap();
    let mut out = Vec::new();
    for (s, (name, map, every)) in saved.iter().zip(cases()) {
        assert_eq!(s["name"], name.as_str());
        assert_eq!(s["every"], every);
        let weights: Vec<Vec<u64>> = serde_json::from_value(s["weights"].clone()).unwrap();
        with_case!(name, every, |opt| {
            let mut opt = opt;
            let ckpt: Checkpoint<_> = serde_json::from_value(s["checkpoint"].clone()).unwrap();
            let mut gs = fresh(map);
            set_weights(&mut gs, &weights);
            ckpt.load(&mut opt, &mut gs).unwrap();
            let calls = Cell::new(s["calls"].as_u64().unwrap());
            steps(&mut opt, &mut gs, &calls, THEN);
            out.push(serde_json::json!({
                "weights": weight_bits(&gs),
                "checkpoint": serde_json::to_value(Checkpoint::save(&opt, &gs).unwrap()).unwrap(),
            }));
        });
    }
    std::fs::write(output, serde_json::to_string(&out).unwrap()).unwrap();
}

#[test]
fn ndarray_resumes_with_the_same_bits_as_the_reference() {
    let run = |resume: bool| {
        let (nds, _, opts) = standard_groups::<f32>();
        let mut gs = groups(nds, &opts);
        let mut opt = Interval::new(sam(), 2).unwrap();
        let calls = Cell::new(0u64);
        let step = |opt: &mut Interval<_>, gs: &mut Vec<Group<NdGroup<f32>>>| {
            opt.step(gs, |gs: &mut [Group<NdGroup<f32>>]| {
                write_grads_nd(gs, calls.replace(calls.get() + 1), None);
                Ok::<_, Error<NdError>>(())
            })
            .unwrap();
        };
        for _ in 0..3 {
            step(&mut opt, &mut gs);
        }
        if resume {
            let ckpt = Checkpoint::save(&opt, &gs).unwrap();
            let json = serde_json::to_string(&ckpt).unwrap();
            // Fresh buffers with the saved weights; a fresh optimizer.
            let (nds, _, opts) = standard_groups::<f32>();
            let mut fresh = groups(nds, &opts);
            for (f, g) in fresh.iter_mut().zip(&gs) {
                for (t, w) in g.buffer.weights().iter().enumerate() {
                    f.buffer.weight_mut(t).unwrap().assign(w);
                }
            }
            gs = fresh;
            opt = Interval::new(sam(), 2).unwrap();
            let ckpt: Checkpoint<OptimizerState> = serde_json::from_str(&json).unwrap();
            ckpt.load(&mut opt, &mut gs).unwrap();
        }
        for _ in 0..4 {
            step(&mut opt, &mut gs);
        }
        let weights: Vec<Vec<u32>> = gs
            .iter()
            .map(|g| {
                g.buffer
                    .weights()
                    .iter()
                    .flat_map(|a| a.iter().map(|x| x.to_bits()))
                    .collect()
            })
            .collect();
        (
            weights,
            serde_json::to_value(Checkpoint::save(&opt, &gs).unwrap()).unwrap(),
        )
    };
    assert_eq!(run(true), run(false));
}

/// The buffers and host state of a run, to check that a refused load changed nothing.
fn snapshot<O: Optimizer>(opt: &O, gs: &Groups) -> (O::State, Vec<VecBuffer<f64>>) {
    (
        opt.state().unwrap(),
        gs.iter().map(|g| g.buffer.clone()).collect(),
    )
}

#[test]
fn checkpoints_that_do_not_fit_are_refused_with_nothing_changed() {
    let calls = Cell::new(0);
    let mut src = sam();
    let mut gs = fresh(keep);
    steps(&mut src, &mut gs, &calls, 3);
    let good = Checkpoint::save(&src, &gs).unwrap();

    // A target that has run 1 step of its own.
    let target = || {
        let mut opt = sam();
        let mut gs = fresh(keep);
        steps(&mut opt, &mut gs, &Cell::new(50), 1);
        (opt, gs)
    };
    let refused = |ckpt: &Checkpoint<OptimizerState>, what: &str| {
        let (mut opt, mut gs) = target();
        let before = snapshot(&opt, &gs);
        let err = ckpt.load(&mut opt, &mut gs).unwrap_err();
        assert!(matches!(err, Error::InvalidState { .. }), "{what}: {err:?}");
        assert_eq!(snapshot(&opt, &gs), before, "{what}: changed");
    };
    let edit = |f: &dyn Fn(&mut Checkpoint<OptimizerState>)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    refused(&edit(&|c| c.format = 99), "format");
    refused(&edit(&|c| c.variant = "gsam".into()), "variant");
    refused(
        &edit(&|c| {
            c.groups.pop();
        }),
        "group count",
    );
    refused(&edit(&|c| c.groups[0].len += 1), "group length");
    refused(
        &edit(&|c| c.groups[0].scalar = "f32".into()),
        "storage type",
    );
    refused(&edit(&|c| c.groups[1].spec.state = 1), "slot layout");
    refused(
        &edit(&|c| {
            c.groups[1].slots.pop();
        }),
        "missing slot",
    );
    refused(
        &edit(&|c| {
            c.groups[1].slots[0].bits.pop();
        }),
        "truncated slot",
    );

    // A checkpoint of another variant's type is refused by its name.
    let gsam_ckpt = {
        let mut opt = gsam();
        let mut gs = fresh(sam_tests::variants::no_overrides);
        steps(&mut opt, &mut gs, &Cell::new(0), 1);
        Checkpoint::save(&opt, &gs).unwrap()
    };
    refused(&gsam_ckpt, "GSAM checkpoint into SAM");

    // Other shapes and other base rules: a group set of another layout.
    let (mut opt, mut small) = {
        let (_, mut stores, opts) = standard_groups::<f64>();
        stores.truncate(2);
        (sam(), groups(stores, &opts[..2]))
    };
    assert!(good.load(&mut opt, &mut small).is_err());

    // f32 storage: a value that is not an f32 is refused.
    let mut f32_ckpt = {
        let (_, stores, opts) = standard_groups::<f32>();
        let mut gs = groups(stores, &opts);
        let mut opt = sam();
        opt.step(&mut gs, |gs: &mut [Group<VecBuffer<f32>>]| {
            write_grads_ref(gs, 0, None);
            Ok::<_, Error<SliceError>>(())
        })
        .unwrap();
        Checkpoint::save(&opt, &gs).unwrap()
    };
    f32_ckpt.groups[0].slots[0].bits[3] = 0.1f64.to_bits();
    let (_, stores, opts) = standard_groups::<f32>();
    let mut gs32 = groups(stores, &opts);
    let before: Vec<_> = gs32.iter().map(|g| g.buffer.clone()).collect();
    let err = f32_ckpt.load(&mut sam(), &mut gs32).unwrap_err();
    assert!(matches!(err, Error::InvalidState { .. }), "{err:?}");
    assert!(gs32.iter().zip(&before).all(|(g, b)| g.buffer == *b));

    // Truncated or corrupt text is a parse error.
    let json = serde_json::to_string(&good).unwrap();
    assert!(serde_json::from_str::<Checkpoint<OptimizerState>>(&json[..json.len() / 2]).is_err());
    assert!(
        serde_json::from_str::<Checkpoint<OptimizerState>>(&json.replacen(
            "\"bits\":[",
            "\"bits\":[-1,",
            1
        ))
        .is_err()
    );

    // And the checkpoint itself loads: the host state and the slots, not the weights.
    let (mut opt, mut gs) = target();
    let weights = weight_bits(&gs);
    good.load(&mut opt, &mut gs).unwrap();
    assert_eq!(opt.steps(), 3);
    assert_eq!(weight_bits(&gs), weights);
    assert_eq!(Checkpoint::save(&opt, &gs).unwrap(), good);
}

#[test]
fn saving_in_the_perturbed_phase_is_refused() {
    let mut opt = sam();
    let mut gs = fresh(keep);
    write_grads_ref(&mut gs, 0, None);
    let guard = opt.first_step(&mut gs).unwrap();
    std::mem::forget(guard); // leaked: the optimizer stays perturbed
    assert_eq!(opt.phase(), Phase::Perturbed);
    let err = Checkpoint::save(&opt, &gs).unwrap_err();
    assert!(matches!(err, Error::WrongPhase { .. }), "{err:?}");
    opt.recover(&mut gs).unwrap();
    assert!(Checkpoint::save(&opt, &gs).is_ok());
}
