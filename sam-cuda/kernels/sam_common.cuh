// sam-cuda: definitions shared by every kernel.
//
// This file, reduce.cu and passes.cu are concatenated by the Rust side (src/kernels.rs) and
// compiled at run time by NVRTC, once per context. NVRTC has no system headers: nothing here
// includes any. The constants SAM_BLOCK, SAM_LANES, SAM_COMBINE_THREADS and every SAM_*
// flag below are NOT defined in this file: the Rust side passes them as -D options from its
// own constants (sam_core::kernel::BLOCK / LANES and src/abi.rs), so they have one source.
//
// Numerics: every element function below mirrors one Rust function of sam-core
// (kernel.rs / base.rs) operation by operation, in f64, with the same association order and
// the same rounding points (values widened on load, rounded once on store). The module is
// compiled with --fmad=false: NVRTC's default (--fmad=true) would contract `a*b + c` into one
// fused multiply-add with a single rounding, while Rust (LLVM without fast-math) rounds the
// product and the sum separately. With contraction off, and IEEE-exact f64 +, -, *, / and
// sqrt on the GPU (CUDA's double operations are correctly rounded), every elementwise pass
// gives the same bits as the reference backend.

#ifndef SAM_BLOCK
#error "SAM_BLOCK must be defined by the host (sam_core::kernel::BLOCK)"
#endif
#ifndef SAM_LANES
#error "SAM_LANES must be defined by the host (sam_core::kernel::LANES)"
#endif
#ifndef SAM_COMBINE_THREADS
#error "SAM_COMBINE_THREADS must be defined by the host"
#endif

typedef unsigned long long sam_u64;
typedef unsigned int sam_u32;

static_assert(sizeof(sam_u64) == 8, "unsigned long long must be 64 bits");
static_assert(sizeof(void*) == 8, "sam-cuda needs a 64-bit device address space");
// The lane tree of the reduction is written out for exactly 8 lanes (sam-core's
// BlockReducer::finish), and a block must split evenly into lanes.
static_assert(SAM_LANES == 8, "the lane combine tree is written for 8 lanes");
static_assert(SAM_BLOCK % SAM_LANES == 0, "a block must split evenly into lanes");
static_assert((SAM_COMBINE_THREADS & (SAM_COMBINE_THREADS - 1)) == 0,
              "SAM_COMBINE_THREADS must be a power of two");

// ---------------------------------------------------------------------------------------------
// Argument structs (by value, one per launch). Mirrored by #[repr(C)] structs in src/abi.rs;
// layout_check.cu asserts every size, alignment and field offset against the Rust values.
// Pointers are device addresses (CUdeviceptr) of the element type of the kernel (f32 or f64),
// or 0 when the pass does not use them.
// ---------------------------------------------------------------------------------------------

// sam_core::Reduction (`finite` as 0/1; `empty` marks an empty node of the combine's tree and
// is 0 in every result).
struct SamReduction {
    double perturb_sq;
    double grad_sq;
    double stash_sq;
    double dot;
    double perturb_max;
    double grad_max;
    double stash_max;
    sam_u32 finite;
    sam_u32 empty;
};

// Stage 1 of the reduce pass (sam_core::ReduceSpec).
struct SamReduceArgs {
    sam_u64 w;         // weights (read only for adaptive weighting)
    sam_u64 g;         // gradient
    sam_u64 stash;     // stash slot (read for STASH or DOT)
    sam_u64 partials;  // SamReduction[blocks]: one result per canonical block
    sam_u64 n;         // elements
    sam_u64 blocks;    // ceil(n / SAM_BLOCK)
    double scale_perturb;
    double scale_grad;
    double scale_stash;
    double eta;        // adaptive offset
    double unscale;    // every gradient value is read times this (1/S under a loss scale S)
    sam_u32 flags;     // SAM_RED_*
    sam_u32 pad_;
};

// One pass of stage 2 of the reduce pass.
struct SamCombineArgs {
    sam_u64 partials;  // SamReduction[count], the results of stage 1 (read when leaf)
    sam_u64 src;       // SamReduction[2^depth], the nodes of the previous pass (when !leaf)
    sam_u64 out;       // SamReduction[gridDim.x], the nodes at depth - log2(blockDim.x)
    sam_u64 count;     // number of partials (>= 1)
    sam_u32 depth;     // depth of the input nodes in the pairwise tree
    sam_u32 leaf;      // 1: first pass, nodes are derived from the partials
};

// sam_core::PerturbSpec.
struct SamPerturbArgs {
    sam_u64 w;
    sam_u64 g;
    sam_u64 backup;
    sam_u64 stash;     // written when SAM_PERTURB_STASH
    sam_u64 n;
    double scale;
    double coeff;
    double eta;
    double unscale;    // the gradient is read times this; the stash receives the product
    sam_u32 flags;     // SAM_PERTURB_*
    sam_u32 pad_;
};

// sam_core::SgdStep.
struct SamSgdScalars {
    double neg_lr;
    double weight_decay;
    double momentum;
    double one_minus_dampening;
    sam_u32 nesterov;
    sam_u32 first;
};

// sam_core::AdamStep.
struct SamAdamScalars {
    double decay;
    double l2;
    double one_minus_beta1;
    double beta2;
    double one_minus_beta2;
    double bc2_sqrt;
    double neg_step_size;
    double eps;
    sam_u32 amsgrad;
    sam_u32 pad_;
};

// sam_core::UpdateSpec.
struct SamUpdateArgs {
    sam_u64 w;
    sam_u64 g;
    sam_u64 backup;    // read when SAM_UPDATE_RESTORE
    sam_u64 stash;     // read when SAM_UPDATE_READ_STASH
    sam_u64 state[3];  // base-rule slots 0..n_state
    sam_u64 avg[4];    // average slots (bit k of avg_mask)
    sam_u64 n;
    double mix_a;      // GradMix::Mix { a, b } (SAM_UPDATE_MIX)
    double mix_b;
    double post_a;     // PostMix { a, b } (SAM_UPDATE_POST)
    double post_b;
    double restash_a;  // UpdateSpec::restash's PostMix { a, b } (SAM_UPDATE_RESTASH)
    double restash_b;
    double unscale;    // the gradient is read times this
    double avg_weight[4];
    SamSgdScalars sgd;
    SamAdamScalars adam;
    sam_u32 flags;     // SAM_UPDATE_*
    sam_u32 base;      // SAM_BASE_*
    sam_u32 n_state;   // 0..3
    sam_u32 avg_mask;  // bit k: fold the new weights into average k
};

// fold_averages.
struct SamFoldArgs {
    sam_u64 w;
    sam_u64 avg[4];
    sam_u64 n;
    double weight[4];
    sam_u32 mask;
    sam_u32 pad_;
};

// swap_average (raw bits).
struct SamSwapArgs {
    sam_u64 a;
    sam_u64 b;
    sam_u64 n;
};

// ---------------------------------------------------------------------------------------------
// Element functions (mirrors of sam-core).
// ---------------------------------------------------------------------------------------------

// sam-core buffer.rs `max`: `if b > a { b } else { a }` (a NaN `b` is ignored).
__device__ __forceinline__ double sam_max(double a, double b) { return b > a ? b : a; }

// sam-core base.rs `add`: a zero delta leaves `p` bit-identical (-0.0 stays -0.0).
__device__ __forceinline__ double sam_add(double p, double delta) {
    return delta == 0.0 ? p : p + delta;
}

// sam-core base.rs `lerp` (torch's CPU kernel).
__device__ __forceinline__ double sam_lerp(double a, double b, double w) {
    return fabs(w) < 0.5 ? a + w * (b - a) : b - (b - a) * (1.0 - w);
}

// sam-core kernel.rs `fold`.
__device__ __forceinline__ double sam_fold(double avg, double w, double weight) {
    return avg + (w - avg) * weight;
}

// Widening on load (exact) and rounding on store (round to nearest even, like Rust's `as`).
__device__ __forceinline__ double sam_widen(float x) { return (double)x; }
__device__ __forceinline__ double sam_widen(double x) { return x; }
template <typename T> __device__ __forceinline__ T sam_narrow(double x);
template <> __device__ __forceinline__ float sam_narrow<float>(double x) {
    return __double2float_rn(x);
}
template <> __device__ __forceinline__ double sam_narrow<double>(double x) { return x; }

// 16-bit storage (sam-core feature `half`): bfloat16 and IEEE binary16 as their bit patterns,
// converted to the same bits as sam-core's real/half.rs (no cuda_fp16.h): widening is exact;
// narrowing rounds the f64 value once, to nearest, ties to even, overflow to +-inf, NaN to a
// quiet NaN. sam_round16 transcribes real/half.rs `round_to`, the integer definition the CPU's
// fast path is tested against exhaustively.
struct sam_bf16 {
    unsigned short bits;
};
struct sam_f16 {
    unsigned short bits;
};

// real/half.rs `round_to` (the definition) for a format of FRAC fraction and EXP exponent bits.
template <int FRAC, int EXP>
__device__ __forceinline__ unsigned short sam_round16(double x) {
    const sam_u64 bits = (sam_u64)__double_as_longlong(x);
    const unsigned sign = (unsigned)((bits >> 48) & 0x8000ull);
    const unsigned inf = ((1u << EXP) - 1u) << FRAC;
    if (isnan(x)) {
        return (unsigned short)(sign | inf | (1u << (FRAC - 1)));
    }
    const int biased = (int)((bits >> 52) & 0x7ffull);
    if (biased == 0) {
        return (unsigned short)sign;  // zero or an f64 subnormal
    }
    if (biased == 0x7ff) {
        return (unsigned short)(sign | inf);
    }
    const int e = biased - 1023;
    const sam_u64 m = (bits & ((1ull << 52) - 1ull)) | (1ull << 52);
    const int bias = (1 << (EXP - 1)) - 1;
    const int e_min = 1 - bias;
    const int shift = (52 - FRAC) + (e_min - e > 0 ? e_min - e : 0);
    if (shift > 53) {
        return (unsigned short)sign;  // below half the smallest subnormal
    }
    sam_u64 q = m >> shift;
    const sam_u64 rem = m & ((1ull << shift) - 1ull);
    const sam_u64 half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (q & 1ull) != 0ull)) {
        q += 1ull;
    }
    const sam_u64 field = e >= e_min ? ((sam_u64)(e - e_min) << FRAC) : 0ull;
    const sam_u64 magnitude = field + q;
    if (magnitude >= (sam_u64)inf) {
        return (unsigned short)(sign | inf);
    }
    return (unsigned short)(sign | (unsigned)magnitude);
}

__device__ __forceinline__ double sam_widen(sam_bf16 x) {
    return (double)__int_as_float((int)((unsigned)x.bits << 16));  // exact
}
__device__ __forceinline__ double sam_widen(sam_f16 x) {
    const unsigned e = (x.bits >> 10) & 0x1fu;
    const unsigned m = x.bits & 0x3ffu;
    double v;
    if (e == 0x1fu) {
        v = m != 0u ? __longlong_as_double(0x7ff8000000000000ll) : __longlong_as_double(0x7ff0000000000000ll);
    } else if (e == 0u) {
        v = (double)m * 5.9604644775390625e-08;  // m * 2^-24: exact
    } else {
        // (1024 + m) * 2^(e - 25): an integer times a power of two, exact.
        v = (double)(m | 0x400u) * __longlong_as_double((long long)(e + 998u) << 52);
    }
    return (x.bits & 0x8000u) != 0u ? -v : v;
}
template <> __device__ __forceinline__ sam_bf16 sam_narrow<sam_bf16>(double x) {
    sam_bf16 r;
    r.bits = sam_round16<7, 8>(x);
    return r;
}
template <> __device__ __forceinline__ sam_f16 sam_narrow<sam_f16>(double x) {
    sam_f16 r;
    r.bits = sam_round16<10, 5>(x);
    return r;
}

// sam-core Reduction::ZERO.
__device__ __forceinline__ SamReduction sam_reduction_zero() {
    SamReduction r;
    r.perturb_sq = 0.0;
    r.grad_sq = 0.0;
    r.stash_sq = 0.0;
    r.dot = 0.0;
    r.perturb_max = 0.0;
    r.grad_max = 0.0;
    r.stash_max = 0.0;
    r.finite = 1u;
    r.empty = 0u;
    return r;
}

// sam-core Reduction::combine: `l` covers elements before `r`'s.
__device__ __forceinline__ SamReduction sam_combine(const SamReduction& l, const SamReduction& r) {
    SamReduction o;
    o.perturb_sq = l.perturb_sq + r.perturb_sq;
    o.grad_sq = l.grad_sq + r.grad_sq;
    o.stash_sq = l.stash_sq + r.stash_sq;
    o.dot = l.dot + r.dot;
    o.perturb_max = sam_max(l.perturb_max, r.perturb_max);
    o.grad_max = sam_max(l.grad_max, r.grad_max);
    o.stash_max = sam_max(l.stash_max, r.stash_max);
    o.finite = l.finite & r.finite;
    o.empty = 0u;
    return o;
}

// sam-core kernel.rs `unscale`: a stored gradient value as the math uses it.
__device__ __forceinline__ double sam_unscale(double g, double unscale) {
    return g * unscale;
}

// sam-core BlockReducer::push for one element (w, g, s already widened; 0.0 when not read).
__device__ __forceinline__ void sam_push(SamReduction& acc, const SamReduceArgs& a, double w,
                                         double g, double s) {
    // Finiteness is that of the stored value; the math uses the unscaled one.
    bool finite = isfinite(g);
    g = sam_unscale(g, a.unscale);
    if (a.flags & SAM_RED_PERTURB) {
        // Finiteness of the operands (a product that overflows is reported by the core as a
        // norm overflow), as sam-core's BlockReducer::push.
        double x = g;
        if (a.flags & SAM_RED_ADAPTIVE) {
            finite = finite && isfinite(w);
            x = (fabs(w) + a.eta) * g;
        }
        double xs = x * a.scale_perturb;
        acc.perturb_sq += xs * xs;
        acc.perturb_max = sam_max(acc.perturb_max, fabs(x));
    }
    double gs = g * a.scale_grad;
    if (a.flags & SAM_RED_GRAD) {
        acc.grad_sq += gs * gs;
        acc.grad_max = sam_max(acc.grad_max, fabs(g));
    }
    if (a.flags & (SAM_RED_STASH | SAM_RED_DOT)) {
        finite = finite && isfinite(s);
        double ss = s * a.scale_stash;
        if (a.flags & SAM_RED_STASH) {
            acc.stash_sq += ss * ss;
            acc.stash_max = sam_max(acc.stash_max, fabs(s));
        }
        if (a.flags & SAM_RED_DOT) {
            acc.dot += gs * ss;
        }
    }
    acc.finite &= finite ? 1u : 0u;
}

// sam-core kernel.rs `perturb` (g is the stored gradient).
__device__ __forceinline__ double sam_perturb_elem(const SamPerturbArgs& a, double w, double g) {
    g = sam_unscale(g, a.unscale);
    double e;
    if (a.flags & SAM_PERTURB_ADAPTIVE) {
        double t = fabs(w) + a.eta;
        e = t * (((t * g) * a.scale) * a.coeff);
    } else {
        e = (g * a.scale) * a.coeff;
    }
    return sam_add(w, e);
}

// sam-core SgdStep::apply: returns the new parameter, updates *buf.
__device__ __forceinline__ double sam_sgd(const SamSgdScalars& k, double p, double d, double* buf) {
    if (k.weight_decay != 0.0) {
        d += k.weight_decay * p;
    }
    double b = *buf;
    if (k.momentum != 0.0) {
        b = k.first ? d : b * k.momentum + k.one_minus_dampening * d;
        d = k.nesterov ? d + k.momentum * b : b;
    }
    *buf = b;
    return sam_add(p, k.neg_lr * d);
}

// sam-core AdamStep::apply: state = [m, v, vmax], updated in place.
__device__ __forceinline__ double sam_adam(const SamAdamScalars& k, double p, double d, double* st) {
    if (k.decay != 1.0) {
        p *= k.decay;
    }
    if (k.l2 != 0.0) {
        d += k.l2 * p;
    }
    st[0] = sam_lerp(st[0], d, k.one_minus_beta1);
    st[1] = st[1] * k.beta2 + (k.one_minus_beta2 * d) * d;
    double vhat;
    if (k.amsgrad) {
        if (st[1] > st[2] || isnan(st[2])) {
            st[2] = st[1];
        }
        vhat = st[2];
    } else {
        vhat = st[1];
    }
    double denom = sqrt(vhat) / k.bc2_sqrt + k.eps;
    return sam_add(p, (k.neg_step_size * st[0]) / denom);
}

// 64-bit grid-stride loop helpers.
__device__ __forceinline__ sam_u64 sam_thread_index() {
    return (sam_u64)blockIdx.x * (sam_u64)blockDim.x + (sam_u64)threadIdx.x;
}
__device__ __forceinline__ sam_u64 sam_grid_stride() {
    return (sam_u64)gridDim.x * (sam_u64)blockDim.x;
}
