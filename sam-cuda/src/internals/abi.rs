//! The kernel ABI: `#[repr(C)]` argument structs mirrored in `kernels/sam_common.cuh`, the flag
//! values, and the compile-time constants passed to NVRTC.
//!
//! Every kernel takes one of these structs by value (device pointers as `u64` addresses, then
//! the per-step scalars computed on the host). The flag values and the reduction constants are
//! defined here only: [`defines`] turns them into `-D` options for NVRTC, so the `.cu` files
//! cannot disagree with them. The struct layouts are checked twice: by Rust unit tests against
//! fixed expected offsets, and by NVRTC itself, which compiles `kernels/layout_check.cu` with
//! `static_assert`s against the Rust `size_of`/`align_of`/`offset_of!` values
//! ([`layout_defines`]).

use std::mem::{align_of, offset_of, size_of};

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

/// Elements per canonical reduction block (`sam_core::backend::kernel::BLOCK`).
pub const BLOCK: usize = sam_core::backend::kernel::BLOCK;
/// Accumulator lanes per block (`sam_core::backend::kernel::LANES`).
pub const LANES: usize = sam_core::backend::kernel::LANES;
/// Threads per block of the reduction's second stage (a power of two): each pass combines
/// `log2(COMBINE_THREADS)` = 9 levels of the pairwise tree.
pub const COMBINE_THREADS: u32 = 512;
/// `log2(COMBINE_THREADS)`.
pub const COMBINE_LEVELS: u32 = COMBINE_THREADS.trailing_zeros();
/// Threads per block of the elementwise kernels and of the reduction's first stage (a multiple
/// of [`LANES`] and of the warp size).
pub const BLOCK_THREADS: u32 = 256;

/// Average slots the update and fold kernels address (`avg[4]` in the C structs).
pub const AVERAGES: usize = 4;
const _: () = assert!(
    sam_core::backend::MAX_AVERAGES <= AVERAGES,
    "sam-core allows more averages than the kernels address: grow avg[] in sam_common.cuh"
);

/// Reduce flag: compute `Σ (s_p·T⊙g)²` and `max |T⊙g|`.
pub const RED_PERTURB: u32 = 1;
/// Reduce flag: `T = |w| + η` (with [`RED_PERTURB`]).
pub const RED_ADAPTIVE: u32 = 2;
/// Reduce flag: compute `Σ (s_g·g)²` and `max |g|`.
pub const RED_GRAD: u32 = 4;
/// Reduce flag: compute `Σ (s_s·stash)²` and `max |stash|`.
pub const RED_STASH: u32 = 8;
/// Reduce flag: compute `Σ (s_g·g)(s_s·stash)`.
pub const RED_DOT: u32 = 16;

/// Perturb flag: copy `g` into the stash slot.
pub const PERTURB_STASH: u32 = 1;
/// Perturb flag: adaptive weighting `T = |w| + η`.
pub const PERTURB_ADAPTIVE: u32 = 2;

/// Update flag: start from the backup.
pub const UPDATE_RESTORE: u32 = 1;
/// Update flag: read the stash slot.
pub const UPDATE_READ_STASH: u32 = 2;
/// Update flag: `d = a·g + b·stash` (else `d = g`).
pub const UPDATE_MIX: u32 = 4;
/// Update flag: apply the post-correction.
pub const UPDATE_POST: u32 = 8;
/// Update flag: overwrite the stash with `restash_a·g + restash_b·stash`.
pub const UPDATE_RESTASH: u32 = 16;

/// Base rule: none (write `d` into the gradient).
pub const BASE_EXTERNAL: u32 = 0;
/// Base rule: SGD.
pub const BASE_SGD: u32 = 1;
/// Base rule: Adam/AdamW.
pub const BASE_ADAM: u32 = 2;

/// `sam_core::backend::Reduction` as the kernels store it (`SamReduction`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceReduction {
    /// `Σ (s_p·T⊙g)²`.
    pub perturb_sq: f64,
    /// `Σ (s_g·g)²`.
    pub grad_sq: f64,
    /// `Σ (s_s·stash)²`.
    pub stash_sq: f64,
    /// `Σ (s_g·g)(s_s·stash)`.
    pub dot: f64,
    /// `max |T⊙g|`.
    pub perturb_max: f64,
    /// `max |g|`.
    pub grad_max: f64,
    /// `max |stash|`.
    pub stash_max: f64,
    /// `1` if every value read was finite, else `0`.
    pub finite: u32,
    /// `1` for an empty node of the combine's tree; `0` in every result.
    pub empty: u32,
}

impl DeviceReduction {
    /// Converts to the core's type.
    pub fn to_core(&self) -> sam_core::backend::Reduction {
        sam_core::backend::Reduction {
            perturb_sq: self.perturb_sq,
            grad_sq: self.grad_sq,
            stash_sq: self.stash_sq,
            dot: self.dot,
            perturb_max: self.perturb_max,
            grad_max: self.grad_max,
            stash_max: self.stash_max,
            finite: self.finite != 0,
        }
    }
}

/// Arguments of stage 1 of the reduce pass (`SamReduceArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReduceArgs {
    /// Weights.
    pub w: u64,
    /// Gradient.
    pub g: u64,
    /// Stash slot.
    pub stash: u64,
    /// Scratch of `blocks` [`DeviceReduction`]s.
    pub partials: u64,
    /// Elements.
    pub n: u64,
    /// Canonical blocks, `ceil(n / BLOCK)`.
    pub blocks: u64,
    /// `s_p`.
    pub scale_perturb: f64,
    /// `s_g`.
    pub scale_grad: f64,
    /// `s_s`.
    pub scale_stash: f64,
    /// Adaptive offset η.
    pub eta: f64,
    /// `ReduceSpec::unscale`.
    pub unscale: f64,
    /// `RED_*` flags.
    pub flags: u32,
    /// Padding.
    pub pad_: u32,
}

/// Arguments of one pass of stage 2 of the reduce pass (`SamCombineArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CombineArgs {
    /// The partials of stage 1 (read in the first pass).
    pub partials: u64,
    /// The nodes of the previous pass (later passes).
    pub src: u64,
    /// One node per block: the nodes `log2(block size)` levels up.
    pub out: u64,
    /// Number of partials (≥ 1).
    pub count: u64,
    /// Depth of the input nodes in the pairwise tree.
    pub depth: u32,
    /// `1` in the first pass.
    pub leaf: u32,
}

/// Arguments of the perturb pass (`SamPerturbArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PerturbArgs {
    /// Weights.
    pub w: u64,
    /// Gradient.
    pub g: u64,
    /// Backup slot.
    pub backup: u64,
    /// Stash slot (with [`PERTURB_STASH`]).
    pub stash: u64,
    /// Elements.
    pub n: u64,
    /// Scale `s`.
    pub scale: f64,
    /// Coefficient `c`.
    pub coeff: f64,
    /// Adaptive offset η.
    pub eta: f64,
    /// `PerturbSpec::unscale`.
    pub unscale: f64,
    /// `PERTURB_*` flags.
    pub flags: u32,
    /// Padding.
    pub pad_: u32,
}

/// `sam_core::backend::SgdStep` (`SamSgdScalars`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SgdScalars {
    /// `−lr`.
    pub neg_lr: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Momentum.
    pub momentum: f64,
    /// `1 − dampening`.
    pub one_minus_dampening: f64,
    /// Nesterov (0/1).
    pub nesterov: u32,
    /// First step (0/1).
    pub first: u32,
}

/// `sam_core::backend::AdamStep` (`SamAdamScalars`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AdamScalars {
    /// `1 − lr·wd` (AdamW) or `1`.
    pub decay: f64,
    /// L2 weight decay (Adam) or `0`.
    pub l2: f64,
    /// `1 − β1`.
    pub one_minus_beta1: f64,
    /// `β2`.
    pub beta2: f64,
    /// `1 − β2`.
    pub one_minus_beta2: f64,
    /// `√(1 − β2^t)`.
    pub bc2_sqrt: f64,
    /// `−lr/(1 − β1^t)`.
    pub neg_step_size: f64,
    /// `eps`.
    pub eps: f64,
    /// AMSGrad (0/1).
    pub amsgrad: u32,
    /// Padding.
    pub pad_: u32,
}

/// Arguments of the restore-and-step pass (`SamUpdateArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpdateArgs {
    /// Weights.
    pub w: u64,
    /// Gradient.
    pub g: u64,
    /// Backup slot (with [`UPDATE_RESTORE`]).
    pub backup: u64,
    /// Stash slot (with [`UPDATE_READ_STASH`]).
    pub stash: u64,
    /// Base-rule state slots.
    pub state: [u64; 3],
    /// Average slots.
    pub avg: [u64; 4],
    /// Elements.
    pub n: u64,
    /// `GradMix::Mix::a`.
    pub mix_a: f64,
    /// `GradMix::Mix::b`.
    pub mix_b: f64,
    /// `PostMix::a`.
    pub post_a: f64,
    /// `PostMix::b`.
    pub post_b: f64,
    /// `UpdateSpec::restash`'s `PostMix::a` (with [`UPDATE_RESTASH`]).
    pub restash_a: f64,
    /// `UpdateSpec::restash`'s `PostMix::b`.
    pub restash_b: f64,
    /// `UpdateSpec::unscale`.
    pub unscale: f64,
    /// Fold weight of each average.
    pub avg_weight: [f64; 4],
    /// SGD scalars (with [`BASE_SGD`]).
    pub sgd: SgdScalars,
    /// Adam scalars (with [`BASE_ADAM`]).
    pub adam: AdamScalars,
    /// `UPDATE_*` flags.
    pub flags: u32,
    /// `BASE_*`.
    pub base: u32,
    /// Number of state slots read and written (0–3).
    pub n_state: u32,
    /// Bit `k`: fold into average `k`.
    pub avg_mask: u32,
}

/// Arguments of the fold pass (`SamFoldArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FoldArgs {
    /// Weights.
    pub w: u64,
    /// Average slots.
    pub avg: [u64; 4],
    /// Elements.
    pub n: u64,
    /// Fold weight of each average.
    pub weight: [f64; 4],
    /// Bit `k`: fold into average `k`.
    pub mask: u32,
    /// Padding.
    pub pad_: u32,
}

/// Arguments of the swap pass (`SamSwapArgs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SwapArgs {
    /// First range.
    pub a: u64,
    /// Second range.
    pub b: u64,
    /// Elements.
    pub n: u64,
}

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of `u64`/`u32`/`f64` fields (and arrays
// or structs of them) with explicit padding fields, so its bytes can be passed to a kernel as a
// by-value parameter of the C struct of the same layout (checked by the layout tests).
unsafe impl DeviceRepr for DeviceReduction {}
// SAFETY: as above.
unsafe impl DeviceRepr for ReduceArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for CombineArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for PerturbArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for UpdateArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for FoldArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for SwapArgs {}
// SAFETY: all fields are integers or floats, for which the all-zero bit pattern is valid
// (0, 0.0); `DeviceReduction` is allocated zeroed as the reduce scratch.
unsafe impl ValidAsZeroBits for DeviceReduction {}

/// One launch of the reduction's second stage: it reads the `2^depth` nodes at `depth` of the
/// pairwise tree (derived from the partials when `depth` is the first pass's) and writes the
/// `grid` nodes `levels` levels up, with blocks of `2^levels` threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CombinePass {
    /// Depth of the input nodes.
    pub depth: u32,
    /// Levels combined (`log2` of the block size, at most [`COMBINE_LEVELS`]).
    pub levels: u32,
    /// Number of blocks = number of output nodes, `2^(depth − levels)`.
    pub grid: u64,
}

/// `ceil(log2 m)` (0 for `m ≤ 1`).
pub fn ceil_log2(m: u64) -> u32 {
    if m <= 1 {
        0
    } else {
        64 - (m - 1).leading_zeros()
    }
}

/// The passes of the second stage for `count ≥ 1` partials: from depth `ceil(log2 count)`
/// (where every node holds at most one partial) up to the root, [`COMBINE_LEVELS`] levels per
/// pass. `None` if a grid would exceed CUDA's `2^31 − 1` blocks (more than 2^39 partials).
pub fn combine_passes(count: u64) -> Option<Vec<CombinePass>> {
    let mut depth = ceil_log2(count);
    let mut passes = Vec::new();
    loop {
        let levels = depth.min(COMBINE_LEVELS);
        let grid = 1u64 << (depth - levels);
        if grid > i32::MAX as u64 {
            return None;
        }
        passes.push(CombinePass {
            depth,
            levels,
            grid,
        });
        depth -= levels;
        if depth == 0 {
            return Some(passes);
        }
    }
}

/// The `-D` options that define the kernels' constants and flags (see `sam_common.cuh`).
pub fn defines() -> Vec<String> {
    let pairs: [(&str, u64); 19] = [
        ("SAM_BLOCK", BLOCK as u64),
        ("SAM_LANES", LANES as u64),
        ("SAM_COMBINE_THREADS", u64::from(COMBINE_THREADS)),
        ("SAM_RED_PERTURB", u64::from(RED_PERTURB)),
        ("SAM_RED_ADAPTIVE", u64::from(RED_ADAPTIVE)),
        ("SAM_RED_GRAD", u64::from(RED_GRAD)),
        ("SAM_RED_STASH", u64::from(RED_STASH)),
        ("SAM_RED_DOT", u64::from(RED_DOT)),
        ("SAM_PERTURB_STASH", u64::from(PERTURB_STASH)),
        ("SAM_PERTURB_ADAPTIVE", u64::from(PERTURB_ADAPTIVE)),
        ("SAM_UPDATE_RESTORE", u64::from(UPDATE_RESTORE)),
        ("SAM_UPDATE_READ_STASH", u64::from(UPDATE_READ_STASH)),
        ("SAM_UPDATE_MIX", u64::from(UPDATE_MIX)),
        ("SAM_UPDATE_POST", u64::from(UPDATE_POST)),
        ("SAM_UPDATE_RESTASH", u64::from(UPDATE_RESTASH)),
        ("SAM_BASE_EXTERNAL", u64::from(BASE_EXTERNAL)),
        ("SAM_BASE_SGD", u64::from(BASE_SGD)),
        ("SAM_BASE_ADAM", u64::from(BASE_ADAM)),
        ("SAM_BLOCK_THREADS", u64::from(BLOCK_THREADS)),
    ];
    pairs.iter().map(|(k, v)| format!("-D{k}={v}u")).collect()
}

/// One struct of the ABI: its C name, Rust size and alignment, and `(field, offset)` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructLayout {
    /// The C struct's name in `sam_common.cuh`.
    pub c_name: &'static str,
    /// `size_of` of the Rust struct.
    pub size: usize,
    /// `align_of` of the Rust struct.
    pub align: usize,
    /// `offset_of!` of each field, by name.
    pub fields: Vec<(&'static str, usize)>,
}

macro_rules! layout {
    ($c:literal, $t:ty, [$($f:ident),* $(,)?]) => {
        StructLayout {
            c_name: $c,
            size: size_of::<$t>(),
            align: align_of::<$t>(),
            fields: vec![$((stringify!($f), offset_of!($t, $f))),*],
        }
    };
}

/// The layouts of every ABI struct, from the Rust definitions.
pub fn layouts() -> Vec<StructLayout> {
    vec![
        layout!(
            "SamReduction",
            DeviceReduction,
            [
                perturb_sq,
                grad_sq,
                stash_sq,
                dot,
                perturb_max,
                grad_max,
                stash_max,
                finite,
                empty
            ]
        ),
        layout!(
            "SamReduceArgs",
            ReduceArgs,
            [
                w,
                g,
                stash,
                partials,
                n,
                blocks,
                scale_perturb,
                scale_grad,
                scale_stash,
                eta,
                unscale,
                flags,
                pad_
            ]
        ),
        layout!(
            "SamCombineArgs",
            CombineArgs,
            [partials, src, out, count, depth, leaf]
        ),
        layout!(
            "SamPerturbArgs",
            PerturbArgs,
            [
                w, g, backup, stash, n, scale, coeff, eta, unscale, flags, pad_
            ]
        ),
        layout!(
            "SamSgdScalars",
            SgdScalars,
            [
                neg_lr,
                weight_decay,
                momentum,
                one_minus_dampening,
                nesterov,
                first
            ]
        ),
        layout!(
            "SamAdamScalars",
            AdamScalars,
            [
                decay,
                l2,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                bc2_sqrt,
                neg_step_size,
                eps,
                amsgrad,
                pad_
            ]
        ),
        layout!(
            "SamUpdateArgs",
            UpdateArgs,
            [
                w, g, backup, stash, state, avg, n, mix_a, mix_b, post_a, post_b, restash_a,
                restash_b, unscale, avg_weight, sgd, adam, flags, base, n_state, avg_mask
            ]
        ),
        layout!("SamFoldArgs", FoldArgs, [w, avg, n, weight, mask, pad_]),
        layout!("SamSwapArgs", SwapArgs, [a, b, n]),
    ]
}

/// The `-D` options with the Rust layouts that `kernels/layout_check.cu` asserts against.
pub fn layout_defines() -> Vec<String> {
    let mut out = Vec::new();
    for l in layouts() {
        out.push(format!("-DSAM_SIZEOF_{}={}", l.c_name, l.size));
        out.push(format!("-DSAM_ALIGNOF_{}={}", l.c_name, l.align));
        for (f, off) in &l.fields {
            out.push(format!("-DSAM_OFFSETOF_{}_{}={}", l.c_name, f, off));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(name: &str) -> StructLayout {
        layouts().into_iter().find(|l| l.c_name == name).unwrap()
    }

    fn offsets(name: &str) -> Vec<usize> {
        find(name).fields.iter().map(|f| f.1).collect()
    }

    // The expected values are the C layout rules applied by hand (naturally aligned fields,
    // no implicit padding thanks to the explicit pad_ fields); NVRTC checks the same numbers
    // against the C structs in tests/nvrtc.rs.

    #[test]
    fn no_struct_has_implicit_padding() {
        // Offsets strictly increase and every field lists (the last field of each struct is
        // 4 or 8 bytes, or an array/struct whose size the explicit tests pin).
        for l in layouts() {
            let offs: Vec<usize> = l.fields.iter().map(|f| f.1).collect();
            assert_eq!(offs[0], 0, "{}", l.c_name);
            assert!(offs.windows(2).all(|w| w[0] < w[1]), "{}", l.c_name);
            assert_eq!(l.size % l.align, 0, "{}", l.c_name);
        }
    }

    #[test]
    fn reduction_layout() {
        let l = find("SamReduction");
        assert_eq!((l.size, l.align), (64, 8));
        assert_eq!(offsets("SamReduction"), [0, 8, 16, 24, 32, 40, 48, 56, 60]);
    }

    #[test]
    fn reduce_and_combine_layout() {
        let l = find("SamReduceArgs");
        assert_eq!((l.size, l.align), (96, 8));
        assert_eq!(
            offsets("SamReduceArgs"),
            [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 92]
        );
        let l = find("SamCombineArgs");
        assert_eq!((l.size, l.align), (40, 8));
        assert_eq!(offsets("SamCombineArgs"), [0, 8, 16, 24, 32, 36]);
    }

    #[test]
    fn perturb_layout() {
        let l = find("SamPerturbArgs");
        assert_eq!((l.size, l.align), (80, 8));
        assert_eq!(
            offsets("SamPerturbArgs"),
            [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 76]
        );
    }

    #[test]
    fn base_scalars_layout() {
        let l = find("SamSgdScalars");
        assert_eq!((l.size, l.align), (40, 8));
        assert_eq!(offsets("SamSgdScalars"), [0, 8, 16, 24, 32, 36]);
        let l = find("SamAdamScalars");
        assert_eq!((l.size, l.align), (72, 8));
        assert_eq!(
            offsets("SamAdamScalars"),
            [0, 8, 16, 24, 32, 40, 48, 56, 64, 68]
        );
    }

    #[test]
    fn update_layout() {
        let l = find("SamUpdateArgs");
        assert_eq!(l.align, 8);
        // 4 pointers, state[3], avg[4], n = 12 × 8 = 96; 7 doubles (mix, post, restash,
        // unscale) = 56 → 152; avg_weight[4] = 32 → 184; sgd 40 → 224; adam 72 → 296;
        // 4 × u32 = 16 → 312.
        assert_eq!(l.size, 312);
        assert_eq!(
            offsets("SamUpdateArgs"),
            [
                0, 8, 16, 24, 32, 56, 88, 96, 104, 112, 120, 128, 136, 144, 152, 184, 224, 296,
                300, 304, 308
            ]
        );
    }

    #[test]
    fn fold_and_swap_layout() {
        let l = find("SamFoldArgs");
        assert_eq!((l.size, l.align), (88, 8));
        assert_eq!(offsets("SamFoldArgs"), [0, 8, 40, 48, 80, 84]);
        let l = find("SamSwapArgs");
        assert_eq!((l.size, l.align), (24, 8));
        assert_eq!(offsets("SamSwapArgs"), [0, 8, 16]);
    }

    #[test]
    fn combine_plan() {
        assert_eq!(ceil_log2(1), 0);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(512), 9);
        assert_eq!(ceil_log2(513), 10);
        assert_eq!(
            combine_passes(1).unwrap(),
            [CombinePass {
                depth: 0,
                levels: 0,
                grid: 1
            }]
        );
        assert_eq!(
            combine_passes(300).unwrap(),
            [CombinePass {
                depth: 9,
                levels: 9,
                grid: 1
            }]
        );
        // 1e8 f32 elements: 24 415 partials, depth 15: 64 blocks, then one block of 64.
        assert_eq!(
            combine_passes(100_000_000u64.div_ceil(4096)).unwrap(),
            [
                CombinePass {
                    depth: 15,
                    levels: 9,
                    grid: 64
                },
                CombinePass {
                    depth: 6,
                    levels: 6,
                    grid: 1
                }
            ]
        );
        assert_eq!(combine_passes(1 << 39).map(|p| p.len()), Some(5));
        assert_eq!(combine_passes((1 << 40) + 1), None);
    }

    #[test]
    fn defines_are_unique_and_well_formed() {
        let d = defines();
        let mut names: Vec<_> = d
            .iter()
            .map(|s| s.split('=').next().unwrap().to_string())
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), d.len());
        assert!(
            d.iter()
                .all(|s| s.starts_with("-DSAM_") && s.ends_with('u'))
        );
        assert!(layout_defines().iter().all(|s| s.starts_with("-DSAM_")));
        assert_eq!(COMBINE_THREADS.count_ones(), 1);
        assert_eq!(BLOCK_THREADS % 32, 0);
        assert_eq!(LANES, 8);
        assert_eq!(BLOCK % LANES, 0);
    }
}
