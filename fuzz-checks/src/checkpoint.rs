//! The `checkpoint` check: hostile checkpoint files into `sam_core::checkpoint::Checkpoint::load`.
//!
//! The input picks a variant (SAM, GSAM, WASAM, LookSAM: both host-state types, and a stash
//! that persists), a storage type and a
//! step count, runs that many steps on a fixed set of groups (reference backend), and saves a
//! checkpoint as JSON. It then mutates the JSON tree and its text (as the `case_json` check
//! does: odd values, dropped and added keys, resized arrays, odd number tokens, truncation,
//! spliced bytes) and loads the result, when it parses, into a fresh optimizer whose groups
//! have run one step of their own. The check asserts:
//!
//! - nothing panics;
//! - a refused load (`Err`) changes nothing: the host state, the weights and every slot are
//!   bit for bit what they were;
//! - an accepted load leaves the weights as they were and the optimizer and slots holding the
//!   checkpoint: saving again gives back exactly the checkpoint that was loaded, and two more
//!   steps run (refused or applied, never a panic);
//! - an unmutated checkpoint is accepted.

use sam_core::checkpoint::Checkpoint;
use sam_core::reference::{SliceError, VecBuffer};
use sam_core::{
    BaseRule, Error, Group, GroupOptions, Gsam, GsamConfig, LookSam, LookSamConfig, Optimizer,
    RhoSchedule, Sam, SamConfig, Schedule, SgdConfig, Wasam,
};

use crate::case_json::{mutate, text_mutate};
use crate::src::Src;
use crate::{Policy, Violation};

/// Runs the check on one input.
pub fn check(data: &[u8], policy: &Policy) {
    let mut s = Src::new(data);
    let r = match s.int(0, 3) {
        0 => with_variant(&mut s, || Sam::new(SamConfig::default())),
        1 => with_variant(&mut s, || {
            let rho = RhoSchedule::Schedule(Schedule::constant(0.05)?);
            Gsam::new(GsamConfig::new(rho))
        }),
        2 => with_variant(&mut s, || Wasam::new(SamConfig::default(), &[0, 1])),
        // Its checkpoints also hold the stored direction (the stash slot).
        _ => with_variant(&mut s, || {
            LookSam::new(LookSamConfig {
                k: 2,
                ..LookSamConfig::default()
            })
        }),
    };
    if let Err(v) = r {
        policy.report(v);
    }
}

fn with_variant<O>(
    s: &mut Src<'_>,
    make: impl Fn() -> Result<O, sam_core::Error>,
) -> Result<(), Violation>
where
    O: Optimizer,
    O::State: serde::Serialize + serde::de::DeserializeOwned,
{
    if s.bool() {
        run::<O, f32>(s, make)
    } else {
        run::<O, f64>(s, make)
    }
}

/// Two groups, SGD with momentum and Adam, of `lens` elements with weights `weight(i)` (the
/// groups of the `checkpoint` and `interval` checks).
pub(crate) fn sgd_adam_groups<T: sam_core::backend::Real>(
    lens: [usize; 2],
    mut weight: impl FnMut(usize) -> f64,
) -> Result<Vec<Group<VecBuffer<T>>>, Violation> {
    let sgd = BaseRule::sgd(SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        ..Default::default()
    });
    let adam = BaseRule::adam(sam_core::AdamConfig {
        lr: 0.01,
        ..Default::default()
    });
    let (Ok(sgd), Ok(adam)) = (sgd, adam) else {
        return Err(Violation::plain("fixed base rules refused"));
    };
    lens.into_iter()
        .zip([sgd, adam])
        .map(|(n, base)| {
            let w = (0..n).map(|i| T::from_f64(weight(i))).collect();
            let buffer = VecBuffer::new(w, vec![T::from_f64(0.0); n])
                .map_err(|e| Violation::plain(format!("buffer: {e}")))?;
            Ok(Group::with_options(buffer, GroupOptions::new(base)))
        })
        .collect()
}

/// The groups of this check: 5 and 3 elements.
fn groups<T: sam_core::backend::Real>() -> Result<Vec<Group<VecBuffer<T>>>, Violation> {
    sgd_adam_groups([5, 3], |i| 0.25 * i as f64 - 0.5)
}

/// `n` closure steps with a gradient that depends on the weights and the call.
fn steps<O: Optimizer, T: sam_core::backend::Real>(
    opt: &mut O,
    gs: &mut [Group<VecBuffer<T>>],
    n: u64,
    salt: u64,
) {
    let mut call = salt;
    for _ in 0..n {
        let _ = opt.step(gs, |gs: &mut [Group<VecBuffer<T>>]| {
            call += 1;
            for g in gs.iter_mut() {
                let (w, grad) = g.buffer.weights_and_grad();
                for (i, (g, w)) in grad.iter_mut().zip(w).enumerate() {
                    *g = T::from_f64(w.to_f64() - 0.1 * ((i as u64 + call) % 5) as f64);
                }
            }
            Ok::<_, Error<SliceError>>(())
        });
    }
}

fn run<O, T>(
    s: &mut Src<'_>,
    make: impl Fn() -> Result<O, sam_core::Error>,
) -> Result<(), Violation>
where
    O: Optimizer,
    O::State: serde::Serialize + serde::de::DeserializeOwned,
    T: sam_core::backend::Real + serde::Serialize,
{
    let Ok(mut src) = make() else {
        return Err(Violation::plain("the fixed configuration was refused"));
    };
    let mut src_groups = groups::<T>()?;
    steps(&mut src, &mut src_groups, s.int(0, 4), 0);
    let saved = Checkpoint::save(&src, &src_groups)
        .map_err(|e| Violation::plain(format!("save between steps failed: {e}")))?;
    let Ok(mut tree) = serde_json::to_value(&saved) else {
        return Err(Violation::plain("a checkpoint does not serialise"));
    };
    // Valid JSON with hostile numbers (often), generic tree mutations (sometimes), text
    // mutations (rarely: most of them make the text unparseable).
    let targeted = if s.chance(3, 4) {
        targeted(s, &mut tree)
    } else {
        0
    };
    let (applied, _) = if s.chance(1, 3) {
        mutate(s, &mut tree)
    } else {
        (0, true)
    };
    let Ok(mut text) = serde_json::to_vec(&tree) else {
        return Ok(());
    };
    let texted = s.chance(1, 6) && text_mutate(s, &mut text);
    let pristine = targeted == 0 && applied == 0 && !texted;

    let Ok(mut opt) = make() else {
        return Err(Violation::plain("the fixed configuration was refused"));
    };
    let mut gs = groups::<T>()?;
    steps(&mut opt, &mut gs, 1, 100);
    let Ok(ckpt) = serde_json::from_slice::<Checkpoint<O::State>>(&text) else {
        if pristine {
            return Err(Violation::plain("an unmutated checkpoint does not parse"));
        }
        return Ok(());
    };
    let before = (opt.state().ok(), snapshot(&gs));
    match ckpt.load(&mut opt, &mut gs) {
        Ok(()) => {
            let again = Checkpoint::save(&opt, &gs)
                .map_err(|e| Violation::plain(format!("save after a load failed: {e}")))?;
            if again != ckpt {
                return Err(Violation::plain(format!(
                    "a loaded checkpoint does not save back to itself:\n{ckpt:?}\nvs\n{again:?}"
                )));
            }
            let weights: Vec<Vec<u64>> = gs.iter().map(|g| bits(g.buffer.weights())).collect();
            if weights != before.1.iter().map(|(w, _)| w.clone()).collect::<Vec<_>>() {
                return Err(Violation::plain("a load changed the weights"));
            }
            // The loaded optimizer steps on (an `Err` is fine; a panic is not).
            steps(&mut opt, &mut gs, 2, 7);
        }
        Err(e) => {
            if pristine {
                return Err(Violation::plain(format!(
                    "an unmutated checkpoint was refused: {e}"
                )));
            }
            if (opt.state().ok(), snapshot(&gs)) != before {
                return Err(Violation::plain(format!(
                    "a refused load ({e}) changed the optimizer"
                )));
            }
        }
    }
    Ok(())
}

/// Replaces a few numbers of the checkpoint's own fields by hostile ones, keeping the JSON
/// valid: a slot value by arbitrary bits, the step count, WASAM's counts, a group's length,
/// its slot layout. Returns the number of replacements.
fn targeted(s: &mut Src<'_>, tree: &mut serde_json::Value) -> usize {
    use serde_json::Value;
    let mut n = 0;
    for _ in 0..s.usize(1, 3) {
        let g = s.index(2);
        let path = match s.int(0, 5) {
            0 | 1 => {
                let k = s.index(4);
                let i = s.index(5);
                format!("/groups/{g}/slots/{k}/bits/{i}")
            }
            2 => "/state/steps".to_string(),
            3 => format!("/state/counts/{}", s.index(2)),
            4 => format!("/groups/{g}/len"),
            _ => format!("/groups/{g}/spec/{}", s.pick(&["state", "averages"])),
        };
        let value = match s.int(0, 3) {
            0 => Value::from(s.u64()),
            1 => Value::from(s.int(0, 8)),
            2 => Value::from(f64::from(s.raw_f64() as f32).to_bits()),
            _ => Value::from(u64::MAX - s.int(0, 3)),
        };
        if let Some(x) = tree.pointer_mut(&path) {
            *x = value;
            n += 1;
        }
    }
    n
}

fn bits<T: sam_core::backend::Real>(x: &[T]) -> Vec<u64> {
    x.iter().map(|v| v.to_f64().to_bits()).collect()
}

/// Every group's weights and its whole slot memory, as bits.
fn snapshot<T: sam_core::backend::Real>(gs: &[Group<VecBuffer<T>>]) -> Vec<(Vec<u64>, Vec<u64>)> {
    use sam_core::backend::Slot;
    gs.iter()
        .map(|g| {
            let b = &g.buffer;
            let mut slots = Vec::new();
            if let Some(spec) = b.spec() {
                let roles = [Slot::Backup, Slot::Stash]
                    .into_iter()
                    .chain((0..spec.state).map(Slot::State))
                    .chain((0..spec.averages).map(Slot::Average));
                for r in roles {
                    slots.extend(b.slot(r).map(bits).unwrap_or_default());
                }
            }
            (bits(b.weights()), slots)
        })
        .collect()
}
