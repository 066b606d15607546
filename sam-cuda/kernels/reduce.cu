// sam-cuda: the reduce pass, two stages, deterministic, in sam-core's canonical order.
//
// sam-core (kernel.rs) defines one canonical order for every reduction: the group is cut into
// blocks of SAM_BLOCK elements; inside a block element j goes to lane j % SAM_LANES and each
// lane accumulates sequentially; the 8 lanes are combined as ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7));
// the block results are combined by the pairwise tree `pairwise(lo, hi)` =
// `pairwise(lo, mid) + pairwise(mid, hi)`, mid = lo + (hi - lo) / 2. These kernels evaluate
// exactly that expression, so the result has the same bits as the reference backend, whatever
// the GPU, the grid size or the run. No floating-point atomics are used anywhere.
//
// Stage 1 (sam_reduce_blocks_*): one thread per (block, lane) pair, 8 adjacent threads of a warp
// per canonical block. Each thread accumulates its lane sequentially (a warp instruction loads
// 4 blocks x 8 consecutive elements: 4 fully used 32-byte sectors), then the 8 lanes are
// combined with three shuffles in the tree above, and the lane-0 thread writes the block's
// result to the scratch buffer `partials`.
//
// Stage 2 (sam_reduce_combine, one launch per log2(SAM_COMBINE_THREADS) = 9 tree levels: one
// launch up to 512 partials (2M elements), two up to 2^18 partials (1e9 elements)) combines
// the partials bottom-up along the pairwise tree, in shared memory, with no per-thread stack
// (a stack in local memory would be reserved for every resident thread of the device). See
// the comment of the kernel.

template <typename T>
__device__ __forceinline__ void sam_reduce_blocks(const SamReduceArgs& a) {
    const T* w = (const T*)a.w;
    const T* g = (const T*)a.g;
    const T* s = (const T*)a.stash;
    SamReduction* partials = (SamReduction*)a.partials;
    const bool adaptive = (a.flags & SAM_RED_PERTURB) && (a.flags & SAM_RED_ADAPTIVE);
    const bool reads_stash = (a.flags & (SAM_RED_STASH | SAM_RED_DOT)) != 0;
    // The 8 threads of one canonical block: aligned groups of 8 inside the warp.
    const sam_u32 warp_lane = threadIdx.x & 31u;
    const sam_u32 group_mask = 0xffu << (warp_lane & ~7u);
    const sam_u64 pairs = a.blocks * (sam_u64)SAM_LANES;
    // blockDim.x is a multiple of 8 (checked by the host), so the stride keeps groups aligned
    // and the 8 threads of a group run the same iterations.
    for (sam_u64 t = sam_thread_index(); t < pairs; t += sam_grid_stride()) {
        const sam_u64 blk = t / SAM_LANES;
        const sam_u32 lane = (sam_u32)(t % SAM_LANES);
        const sam_u64 start = blk * (sam_u64)SAM_BLOCK;
        const sam_u64 end = (a.n - start < (sam_u64)SAM_BLOCK) ? a.n : start + SAM_BLOCK;
        SamReduction acc = sam_reduction_zero();
#pragma unroll 8
        for (sam_u64 i = start + lane; i < end; i += SAM_LANES) {
            const double gv = sam_widen(g[i]);
            const double wv = adaptive ? sam_widen(w[i]) : 0.0;
            const double sv = reads_stash ? sam_widen(s[i]) : 0.0;
            sam_push(acc, a, wv, gv, sv);
        }
        // ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)): after the step with offset k, thread
        // lane (a multiple of 2k) holds lanes [lane, lane + 2k) combined in order.
#pragma unroll
        for (sam_u32 off = 1; off < SAM_LANES; off <<= 1) {
            SamReduction r;
            r.perturb_sq = __shfl_down_sync(group_mask, acc.perturb_sq, off, SAM_LANES);
            r.grad_sq = __shfl_down_sync(group_mask, acc.grad_sq, off, SAM_LANES);
            r.stash_sq = __shfl_down_sync(group_mask, acc.stash_sq, off, SAM_LANES);
            r.dot = __shfl_down_sync(group_mask, acc.dot, off, SAM_LANES);
            r.perturb_max = __shfl_down_sync(group_mask, acc.perturb_max, off, SAM_LANES);
            r.grad_max = __shfl_down_sync(group_mask, acc.grad_max, off, SAM_LANES);
            r.stash_max = __shfl_down_sync(group_mask, acc.stash_max, off, SAM_LANES);
            r.finite = __shfl_down_sync(group_mask, acc.finite, off, SAM_LANES);
            r.empty = 0u;
            if ((lane & (2u * off - 1u)) == 0u) {
                acc = sam_combine(acc, r);
            }
        }
        if (lane == 0u) {
            partials[blk] = acc;
        }
    }
}

extern "C" __global__ void sam_reduce_blocks_f32(const SamReduceArgs a) {
    sam_reduce_blocks<float>(a);
}

extern "C" __global__ void sam_reduce_blocks_f64(const SamReduceArgs a) {
    sam_reduce_blocks<double>(a);
}

extern "C" __global__ void sam_reduce_blocks_bf16(const SamReduceArgs a) {
    sam_reduce_blocks<sam_bf16>(a);
}

extern "C" __global__ void sam_reduce_blocks_f16(const SamReduceArgs a) {
    sam_reduce_blocks<sam_f16>(a);
}

// Stage 2, one pass: nodes of the pairwise tree at depth `a.depth` (2^depth of them) are
// combined bottom-up, log2(blockDim.x) levels per pass, one block per subtree. Node j at depth d
// is the range reached from the root [0, count) by following the d bits of j, most significant
// first: the left child of [lo, hi) is [lo, mid), the right one [mid, hi), mid = lo + (hi-lo)/2,
// exactly as sam_core::kernel::pairwise splits; a one-element range has itself as left child and
// an EMPTY right child. At depth ceil(log2 count) every range has at most one element, so in the
// first pass (`leaf` = 1) each thread's node is one partial or empty. Combining bottom-up,
// a node is left.combine(right), or left itself when right is empty: the same expression as
// the recursion, evaluated in the same order. Nothing is kept per thread but registers.
extern "C" __global__ void __launch_bounds__(SAM_COMBINE_THREADS)
sam_reduce_combine(const SamCombineArgs a) {
    __shared__ SamReduction node[SAM_COMBINE_THREADS];
    const sam_u32 tid = threadIdx.x;
    const sam_u64 j = (sam_u64)blockIdx.x * (sam_u64)blockDim.x + (sam_u64)tid;
    SamReduction v;
    if (a.leaf) {
        const SamReduction* parts = (const SamReduction*)a.partials;
        sam_u64 lo = 0;
        sam_u64 hi = a.count;
        bool is_empty = false;
        for (sam_u32 level = 0; level < a.depth; ++level) {
            const bool right = ((j >> (a.depth - 1u - level)) & 1ull) != 0ull;
            if (is_empty) {
                continue;
            }
            const sam_u64 len = hi - lo;
            if (len >= 2) {
                const sam_u64 mid = lo + len / 2;
                if (right) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            } else if (right) {
                is_empty = true;
            }
        }
        // Here hi - lo <= 1 (the host starts at depth ceil(log2 count)), and hi - lo == 1
        // unless the node is empty.
        if (is_empty || hi == lo) {
            v = sam_reduction_zero();
            v.empty = 1u;
        } else {
            v = parts[lo];
            v.empty = 0u;
        }
    } else {
        v = ((const SamReduction*)a.src)[j];
    }
    node[tid] = v;
    __syncthreads();
    for (sam_u32 width = blockDim.x >> 1; width != 0u; width >>= 1) {
        SamReduction l = sam_reduction_zero();
        if (tid < width) {
            l = node[2 * tid];
            const sam_u32 left_empty = l.empty;
            // The left child of a non-empty node is never empty; an empty right child passes
            // the left one through unchanged.
            if (!node[2 * tid + 1].empty) {
                l = sam_combine(l, node[2 * tid + 1]);
            }
            l.empty = left_empty;
        }
        __syncthreads();
        if (tid < width) {
            node[tid] = l;
        }
        __syncthreads();
    }
    if (tid == 0u) {
        ((SamReduction*)a.out)[blockIdx.x] = node[0];
    }
}
