//! A host model of the two-stage reduce kernels (`kernels/reduce.cu`), checked bit for bit
//! against sam-core's canonical reduction order. Needs neither a GPU nor NVRTC.
//!
//! The model is a line-by-line transliteration of the kernels' index arithmetic: stage 1 (one
//! sequential accumulator per (block, lane), then the 3-step shuffle tree of the 8 lanes) and
//! stage 2 (the passes planned by `abi::combine_passes`: nodes of the pairwise tree derived from
//! the bits of their index, combined bottom-up 9 levels per pass in "shared memory", empty
//! right children passing the left ones through). It verifies the algorithm, not the CUDA
//! compiler: the GPU tests compare the real kernels with the reference backend.

mod common;

use common::Rng;
use sam_core::backend::kernel::{self, BLOCK, LANES};
use sam_core::backend::{ReduceSpec, Reduction, Weighting};
use sam_cuda::internals::abi::{CombinePass, combine_passes};

fn max(a: f64, b: f64) -> f64 {
    if b > a { b } else { a }
}

/// `sam_push` of sam_common.cuh.
fn push(acc: &mut Reduction, spec: &ReduceSpec, w: f64, g: f64, s: f64) {
    let mut finite = g.is_finite();
    let g = g * spec.unscale;
    if let Some(weighting) = spec.perturb {
        let x = match weighting {
            Weighting::Plain => g,
            Weighting::Adaptive { eta } => (w.abs() + eta) * g,
        };
        finite = finite && x.is_finite();
        let xs = x * spec.scale_perturb;
        acc.perturb_sq += xs * xs;
        acc.perturb_max = max(acc.perturb_max, x.abs());
    }
    let gs = g * spec.scale_grad;
    if spec.grad {
        acc.grad_sq += gs * gs;
        acc.grad_max = max(acc.grad_max, g.abs());
    }
    if spec.stash || spec.dot {
        finite = finite && s.is_finite();
        let ss = s * spec.scale_stash;
        if spec.stash {
            acc.stash_sq += ss * ss;
            acc.stash_max = max(acc.stash_max, s.abs());
        }
        if spec.dot {
            acc.dot += gs * ss;
        }
    }
    acc.finite &= finite;
}

/// Stage 1: `sam_reduce_blocks`.
fn stage1(n: usize, spec: &ReduceSpec, w: &[f64], g: &[f64], s: &[f64]) -> Vec<Reduction> {
    let blocks = kernel::block_count(n);
    let mut partials = vec![Reduction::ZERO; blocks];
    for (blk, out) in partials.iter_mut().enumerate() {
        let start = blk * BLOCK;
        let end = if n - start < BLOCK { n } else { start + BLOCK };
        let mut acc = [Reduction::ZERO; LANES];
        for (lane, a) in acc.iter_mut().enumerate() {
            let mut i = start + lane;
            while i < end {
                push(a, spec, w[i], g[i], s[i]);
                i += LANES;
            }
        }
        // The shuffle tree: every thread reads its partner's value of the previous step, then
        // the threads whose lane is a multiple of 2·off combine.
        let mut off = 1;
        while off < LANES {
            let before = acc;
            for lane in 0..LANES {
                let partner = if lane + off < LANES {
                    before[lane + off]
                } else {
                    before[lane]
                };
                if lane & (2 * off - 1) == 0 {
                    acc[lane] = before[lane].combine(partner);
                }
            }
            off <<= 1;
        }
        *out = acc[0];
    }
    partials
}

/// A node of the combine's tree: a partial result, or empty.
type Node = Option<Reduction>;

/// One pass of `sam_reduce_combine`: `grid` blocks of `2^levels` threads; thread `tid` of
/// block `b` holds node `j = b·2^levels + tid` at `depth`.
fn combine_pass(parts: &[Reduction], src: &[Node], pass: &CombinePass, leaf: bool) -> Vec<Node> {
    let threads = 1usize << pass.levels;
    let mut out = Vec::with_capacity(pass.grid as usize);
    for b in 0..pass.grid as usize {
        let mut node: Vec<Node> = (0..threads)
            .map(|tid| {
                let j = (b * threads + tid) as u64;
                if !leaf {
                    return src[j as usize];
                }
                let (mut lo, mut hi, mut is_empty) = (0usize, parts.len(), false);
                for level in 0..pass.depth {
                    let right = (j >> (pass.depth - 1 - level)) & 1 != 0;
                    if is_empty {
                        continue;
                    }
                    let len = hi - lo;
                    if len >= 2 {
                        let mid = lo + len / 2;
                        if right {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    } else if right {
                        is_empty = true;
                    }
                }
                assert!(hi - lo <= 1, "a leaf-pass node holds more than one partial");
                if is_empty || hi == lo {
                    None
                } else {
                    Some(parts[lo])
                }
            })
            .collect();
        let mut width = threads >> 1;
        while width != 0 {
            let before = node.clone();
            for tid in 0..width {
                let l = before[2 * tid];
                node[tid] = match (l, before[2 * tid + 1]) {
                    (Some(l), Some(r)) => Some(l.combine(r)),
                    (l, None) => l,
                    (None, Some(_)) => panic!("empty left child of a non-empty node"),
                };
            }
            width >>= 1;
        }
        out.push(node[0]);
    }
    out
}

/// Stage 2: the passes of `abi::combine_passes`, as the host launches them.
fn stage2(parts: &[Reduction]) -> Reduction {
    let passes = combine_passes(parts.len() as u64).expect("plan");
    let mut nodes: Vec<Node> = Vec::new();
    for (i, pass) in passes.iter().enumerate() {
        nodes = combine_pass(parts, &nodes, pass, i == 0);
    }
    assert_eq!(nodes.len(), 1);
    nodes[0].expect("the root is never empty")
}

fn bits(r: &Reduction) -> [u64; 8] {
    [
        r.perturb_sq.to_bits(),
        r.grad_sq.to_bits(),
        r.stash_sq.to_bits(),
        r.dot.to_bits(),
        r.perturb_max.to_bits(),
        r.grad_max.to_bits(),
        r.stash_max.to_bits(),
        u64::from(r.finite),
    ]
}

fn specs() -> Vec<ReduceSpec> {
    vec![
        ReduceSpec {
            perturb: Some(Weighting::Plain),
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            perturb: Some(Weighting::Adaptive { eta: 0.01 }),
            grad: true,
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            grad: true,
            stash: true,
            dot: true,
            scale_grad: 0.5,
            scale_stash: 4.0,
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec {
            perturb: Some(Weighting::Plain),
            grad: true,
            dot: true,
            unscale: 2f64.powi(-16),
            ..ReduceSpec::FINITE_ONLY
        },
        ReduceSpec::FINITE_ONLY,
    ]
}

#[test]
fn model_equals_the_canonical_order_bit_for_bit() {
    let mut rng = Rng::new(7);
    let sizes = [
        1usize,
        7,
        8,
        9,
        4095,
        4096,
        4097,
        8192 + 5,
        3 * 4096,
        37 * 4096 + 123,
        513 * 4096 + 1,
        1100 * 4096 + 77,
    ];
    for &n in &sizes {
        let w = rng.vec(n, |r| r.wide(20));
        let g = rng.vec(n, |r| r.wide(30));
        let s = rng.vec(n, |r| r.wide(10));
        for spec in specs() {
            let reference = kernel::reduce_flat(n, &spec, |i| (w[i], g[i], s[i]));
            let parts = stage1(n, &spec, &w, &g, &s);
            let model = stage2(&parts);
            assert_eq!(bits(&model), bits(&reference), "n = {n}, spec = {spec:?}");
        }
    }
}

#[test]
fn the_order_matters_for_this_data() {
    // The check above is not vacuous: a plain sequential sum of the same squares differs in
    // the last bits from the canonical one for this data.
    let mut rng = Rng::new(11);
    let n = 37 * 4096 + 123;
    let g = rng.vec(n, |r| r.wide(30));
    let spec = ReduceSpec {
        grad: true,
        ..ReduceSpec::FINITE_ONLY
    };
    let canonical = kernel::reduce_flat(n, &spec, |i| (0.0, g[i], 0.0)).grad_sq;
    let sequential = g.iter().fold(0.0, |acc, x| acc + x * x);
    assert_ne!(canonical.to_bits(), sequential.to_bits());
    assert!(((canonical - sequential) / canonical).abs() < 1e-13);
}

#[test]
fn non_finite_and_empty_lanes() {
    let n = 4096 + 3; // the last block has 3 elements: lanes 3..8 stay empty
    let mut g = vec![1.5; n];
    g[4097] = f64::NAN;
    let spec = ReduceSpec {
        grad: true,
        ..ReduceSpec::FINITE_ONLY
    };
    let zeros = vec![0.0; n];
    let parts = stage1(n, &spec, &zeros, &g, &zeros);
    let r = stage2(&parts);
    let reference = kernel::reduce_flat(n, &spec, |i| (0.0, g[i], 0.0));
    assert!(!r.finite);
    assert_eq!(bits(&r), bits(&reference));
    g[4097] = -0.0;
    let spec = ReduceSpec {
        dot: true,
        ..ReduceSpec::FINITE_ONLY
    };
    let neg = vec![-0.0; n];
    let parts = stage1(n, &spec, &zeros, &g, &neg);
    let r = stage2(&parts);
    let reference = kernel::reduce_flat(n, &spec, |i| (0.0, g[i], neg[i]));
    assert_eq!(bits(&r), bits(&reference), "signed zeros");
}

#[test]
fn combine_passes_match_pairwise_for_every_count() {
    // Stage 2 alone, on partials that record which blocks they cover (sums of distinct powers
    // of two would be exact in any order, so use values whose rounding depends on the order).
    let mut rng = Rng::new(3);
    let max = 140_000; // past 2^17: three passes
    let parts: Vec<Reduction> = (0..max)
        .map(|_| Reduction {
            grad_sq: rng.wide(40).abs(),
            dot: rng.wide(40),
            ..Reduction::ZERO
        })
        .collect();
    let counts = (1..=1100).chain([
        4095, 4096, 4097, 65_535, 65_536, 65_537, 131_071, 131_073, max,
    ]);
    for count in counts {
        let expected = kernel::pairwise(0, count, &mut |i| parts[i]);
        assert_eq!(
            bits(&stage2(&parts[..count])),
            bits(&expected),
            "count {count}"
        );
    }
}
