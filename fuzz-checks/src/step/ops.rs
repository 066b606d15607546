//! The decoded input of the step checks: the setup (element type, variant, groups) and the
//! operations to run, drawn from the fuzzer's bytes.

use super::*;
use crate::config::Wrap;

/// How gradient values are filled in.
#[derive(Debug, Clone, PartialEq)]
pub enum Fill {
    /// One value everywhere.
    Const(f64),
    /// These values, cycled (offset by the group index).
    Cycle(Vec<f64>),
    /// `a + b·k` for a small integer `k` that varies with the element.
    Ramp(f64, f64),
}

impl Fill {
    pub(crate) fn at(&self, gi: usize, i: usize) -> f64 {
        match self {
            Fill::Const(v) => *v,
            Fill::Cycle(vs) if vs.is_empty() => 0.0,
            Fill::Cycle(vs) => vs[(i + gi) % vs.len()],
            Fill::Ramp(a, b) => a + b * (((i * 7 + gi * 3) % 17) as f64 - 8.0),
        }
    }

    pub(crate) fn generate(s: &mut Src<'_>, tame: bool) -> Self {
        let v = |s: &mut Src<'_>| {
            if tame {
                palette::tame(s)
            } else {
                palette::element(s)
            }
        };
        match s.int(0, 3) {
            0 => Fill::Const(v(s)),
            1 => Fill::Ramp(v(s), if tame { s.uniform(-2.0, 2.0) } else { v(s) }),
            _ => {
                let n = s.usize(1, 8);
                Fill::Cycle((0..n).map(|_| v(s)).collect())
            }
        }
    }
}

/// A gradient (or weight) recipe: evaluated per group against the current weights.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// Leave the gradient as it is.
    Keep,
    /// Fill, then override single elements `(group, index mod len, value)`.
    Fill(Fill, Vec<(usize, usize, f64)>),
    /// `g = c·w + shift` (the gradient of a quadratic at the current weights), then overrides.
    Linear(f64, f64, Vec<(usize, usize, f64)>),
    /// Gradient accumulation: zero the storage, then add each part's values (rounded to the
    /// element type, as a framework's micro-batch gradient is) in order, each sum rounded to the
    /// element type (`Keep` adds nothing).
    Sum(Vec<Recipe>),
}

impl Recipe {
    pub(crate) fn generate(s: &mut Src<'_>, tame: bool) -> Self {
        let n_over = if s.chance(1, 4) { s.usize(1, 3) } else { 0 };
        let over = (0..n_over)
            .map(|_| (s.usize(0, 4), s.usize(0, 5000), palette::element(s)))
            .collect();
        match s.int(0, 9) {
            0 => Recipe::Keep,
            1..=2 => {
                let c = if tame {
                    s.uniform(-2.0, 2.0)
                } else {
                    palette::element(s)
                };
                let shift = if tame {
                    palette::tame(s)
                } else {
                    palette::element(s)
                };
                Recipe::Linear(c, shift, over)
            }
            _ => Recipe::Fill(Fill::generate(s, tame), over),
        }
    }

    /// The values for group `gi` with weights `w`, or `None` to keep the current ones, in
    /// element type `f64` or `f32` (`is_f64`): rounded as storing them rounds them.
    pub fn values(&self, gi: usize, w: &[f64], is_f64: bool) -> Option<Vec<f64>> {
        let n = w.len();
        let (mut g, over): (Vec<f64>, _) = match self {
            Recipe::Keep => return None,
            Recipe::Sum(parts) => {
                let mut acc = vec![0.0; n];
                for p in parts {
                    if let Some(v) = p.values(gi, w, is_f64) {
                        for (a, x) in acc.iter_mut().zip(v) {
                            *a = round_to(*a + x, is_f64);
                        }
                    }
                }
                return Some(acc);
            }
            Recipe::Fill(f, over) => ((0..n).map(|i| f.at(gi, i)).collect(), over),
            Recipe::Linear(c, shift, over) => (w.iter().map(|x| c * x + shift).collect(), over),
        };
        for &(og, idx, v) in over {
            if og == gi && n > 0 {
                g[idx % n] = v;
            }
        }
        Some(g.into_iter().map(|x| round_to(x, is_f64)).collect())
    }
}

/// How a perturbed phase ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `second_step`.
    Second,
    /// `restore_with_gradient`.
    External,
    /// `cancel`.
    Cancel,
    /// The guard is dropped.
    Drop,
    /// The guard is leaked with `mem::forget`.
    Forget,
}

/// How a WASAM swap ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapEnd {
    /// `swap_back`.
    Back,
    /// The guard is dropped.
    Drop,
    /// The guard is leaked with `mem::forget`.
    Forget,
}

/// One operation of a sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Write `g1`, `first_step`, write `g2` through the guard, finish.
    Step {
        /// The clean gradient.
        g1: Recipe,
        /// The gradient at the perturbed weights.
        g2: Recipe,
        /// How the phase ends.
        finish: Finish,
    },
    /// `step` with a closure that writes `g1`, then `g2`, and fails on call `fail` (1 or 2).
    Closure {
        /// The clean gradient.
        g1: Recipe,
        /// The second gradient.
        g2: Recipe,
        /// The closure call that returns an error (0: none).
        fail: u8,
    },
    /// `recover`.
    Recover,
    /// Overwrite the gradient.
    SetGrads(Recipe),
    /// WASAM `swap(k)`, optionally write the live (averaged) weights, then end.
    Swap {
        /// The average.
        k: u8,
        /// Weights written while swapped.
        touch: Option<Recipe>,
        /// How the swap ends.
        end: SwapEnd,
    },
    /// WASAM `update_averages`.
    UpdateAverages,
    /// An external optimizer step `w −= lr·g` on the active groups.
    External {
        /// Its learning rate.
        lr: f64,
    },
    /// Save the host state and load it back, edited.
    Checkpoint {
        /// New step count.
        steps: Option<u64>,
        /// New WASAM snapshot counts.
        counts: Option<u64>,
        /// Flip WASAM's pending fold.
        flip_pending: bool,
    },
    /// A checkpoint round trip: `Checkpoint::save` of the active groups, every prepared slot of
    /// those groups overwritten with `fill` (the reference backend; `sam-ndarray` gets fresh
    /// buffers holding the same weights and gradient), `Checkpoint::load` into a freshly built
    /// optimizer, which goes on from there.
    Resume {
        /// What the slots of the "fresh" reference buffers hold.
        fill: f64,
    },
    /// Pass only the first `n` groups from now on.
    Active(usize),
    /// Exchange two groups.
    Permute(usize, usize),
    /// Replace a group's options.
    Options {
        /// The group.
        group: usize,
        /// The new options.
        raw: GroupRaw,
    },
}

/// One group of a [`Setup`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupSetup {
    /// Options.
    pub raw: GroupRaw,
    /// Initial weights.
    pub w: Vec<f64>,
    /// Initial gradient.
    pub g: Vec<f64>,
    /// Slot memory of the reference backend, in values.
    pub slot_values: usize,
    /// Hand the reference backend a gradient one element short first (must be refused).
    pub short_grad: bool,
    /// Tensor shapes of the ndarray backend (their sizes add up to the group length).
    pub shapes: Vec<Vec<usize>>,
}

/// A decoded input.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// `f64` storage (else `f32`).
    pub f64: bool,
    /// The run is drawn mostly from the finiteness class.
    pub tame: bool,
    /// The optimizer.
    pub variant: VariantRaw,
    /// Its wrapper (LookSAM, SAM every `k` steps).
    pub wrap: Wrap,
    /// The groups.
    pub groups: Vec<GroupSetup>,
    /// The operations.
    pub ops: Vec<Op>,
}

pub(crate) fn shapes_for(s: &mut Src<'_>, n: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut left = n;
    let pieces = s.usize(1, 3);
    for p in 0..pieces {
        if s.chance(1, 8) {
            out.push([vec![0], vec![2, 0], vec![0, 3, 1]][s.index(3)].clone());
        }
        let take = if p + 1 == pieces {
            left
        } else {
            s.usize(0, left)
        };
        left -= take;
        let shape = match take {
            1 if s.bool() => vec![],
            t if t % 2 == 0 && t > 0 && s.bool() => vec![2, t / 2],
            t if t % 3 == 0 && t > 0 && s.bool() => vec![t / 3, 1, 3],
            t => vec![t],
        };
        out.push(shape);
    }
    out
}

/// The marker byte after the operations that starts the extensions (wrapper, checkpoint round
/// trips, accumulation).
pub const EXTENSIONS: u64 = 0xE5;

/// Splits the gradients of a step into micro-batches: each becomes a [`Recipe::Sum`] of itself
/// and 1–3 more parts.
fn accumulate(op: Option<&mut Op>, s: &mut Src<'_>, tame: bool) {
    let (Some(Op::Step { g1, g2, .. }) | Some(Op::Closure { g1, g2, .. })) = op else {
        return;
    };
    for g in [g1, g2] {
        let mut parts = vec![std::mem::replace(g, Recipe::Keep)];
        for _ in 0..s.usize(1, 3) {
            parts.push(Recipe::generate(s, tame));
        }
        *g = Recipe::Sum(parts);
    }
}

impl Setup {
    /// Decodes an input; `lockstep` restricts it to what both backends must agree on.
    pub fn decode(data: &[u8], lockstep: bool) -> Self {
        let mut s = Src::new(data);
        let f64 = s.bool();
        let tame = !s.chance(1, 4);
        let wild_variant = !tame && s.bool();
        let variant = VariantRaw::generate(&mut s, wild_variant);
        let overrides = if matches!(variant, VariantRaw::Gsam(_)) {
            if s.chance(1, 8) { 4 } else { 0 }
        } else {
            3
        };
        let n_groups = s.pick(&[1, 1, 1, 2, 2, 3, 4, 0]);
        let mut groups = Vec::new();
        for _ in 0..n_groups {
            let wild_group = !tame && s.chance(1, 3);
            let raw = GroupRaw::generate(&mut s, wild_group, overrides);
            let len = match s.int(0, 31) {
                0 => 0,
                1 => s.usize(4090, 4200),
                2..=4 => s.usize(17, 300),
                _ => s.usize(1, 16),
            };
            let zeros = vec![0.0; len];
            let w = Recipe::Fill(Fill::generate(&mut s, tame), vec![])
                .values(0, &zeros, true)
                .unwrap_or_default();
            let g = Recipe::Fill(Fill::generate(&mut s, tame), vec![])
                .values(0, &zeros, true)
                .unwrap_or_default();
            let slot_values = if !lockstep && s.chance(1, 10) {
                s.usize(0, 9 * len)
            } else {
                9 * len
            };
            let short_grad = !lockstep && len > 0 && s.chance(1, 16);
            let shapes = shapes_for(&mut s, len);
            groups.push(GroupSetup {
                raw,
                w,
                g,
                slot_values,
                short_grad,
                shapes,
            });
        }
        let mut ops = Vec::new();
        let n_ops = s.usize(1, 16);
        while ops.len() < n_ops && !s.is_empty() {
            let op = match s.int(0, 31) {
                0..=9 => Op::Step {
                    g1: Recipe::generate(&mut s, tame),
                    g2: Recipe::generate(&mut s, tame),
                    finish: s.pick(&[
                        Finish::Second,
                        Finish::Second,
                        Finish::Second,
                        Finish::External,
                        Finish::Cancel,
                        Finish::Drop,
                        Finish::Forget,
                    ]),
                },
                10..=17 => Op::Closure {
                    g1: Recipe::generate(&mut s, tame),
                    g2: Recipe::generate(&mut s, tame),
                    fail: if s.chance(1, 8) { s.pick(&[1, 2]) } else { 0 },
                },
                18..=19 => Op::Recover,
                20 => Op::SetGrads(Recipe::generate(&mut s, tame)),
                21..=23 => Op::Swap {
                    k: s.pick(&[0, 0, 1, 2, 3, 4, 200]),
                    touch: s
                        .chance(1, 4)
                        .then(|| Recipe::Fill(Fill::generate(&mut s, tame), vec![])),
                    end: s.pick(&[SwapEnd::Back, SwapEnd::Back, SwapEnd::Drop, SwapEnd::Forget]),
                },
                24 => Op::UpdateAverages,
                25 => Op::External {
                    lr: if tame {
                        s.uniform(0.0, 1.0)
                    } else {
                        palette::hyper(&mut s, 0.0, 1.0)
                    },
                },
                26 => Op::Checkpoint {
                    steps: s.chance(1, 2).then(|| palette::count(&mut s)),
                    counts: s.chance(1, 3).then(|| palette::count(&mut s)),
                    flip_pending: s.chance(1, 4),
                },
                27 => Op::Active(s.usize(0, n_groups)),
                28 => Op::Permute(s.index(n_groups.max(1)), s.index(n_groups.max(1))),
                29 => Op::Options {
                    group: s.index(n_groups.max(1)),
                    raw: GroupRaw::generate(&mut s, !tame, overrides),
                },
                _ => Op::Step {
                    g1: Recipe::generate(&mut s, tame),
                    g2: Recipe::Keep,
                    finish: Finish::Second,
                },
            };
            ops.push(op);
        }
        // Extensions, drawn after everything else behind a marker byte, so that inputs written
        // before they existed decode as before (an exhausted input draws no marker).
        let mut wrap = Wrap::None;
        if s.int(0, 255) == EXTENSIONS {
            wrap = Wrap::generate(&mut s, wild_variant, &variant);
            for _ in 0..s.usize(0, 6) {
                let at = s.index(ops.len() + 1);
                match s.int(0, 2) {
                    0 => ops.insert(
                        at,
                        Op::Resume {
                            fill: s.pick(&[0.0, f64::NAN, 1e30, -7.5]),
                        },
                    ),
                    _ => accumulate(ops.get_mut(at), &mut s, tame),
                }
            }
        }
        Setup {
            f64,
            tame,
            variant,
            wrap,
            groups,
            ops,
        }
    }
}
