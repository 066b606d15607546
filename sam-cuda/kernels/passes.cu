// sam-cuda: the elementwise passes (perturb, update, fold_averages, swap_average).
//
// Each pass is ONE launch per parameter group: a group's tensors are views at offsets of one
// flat allocation per role (weights, gradient, slots), so a kernel sees one contiguous range
// of n elements whatever the number of tensors. Grid-stride loops with 64-bit indices. Every
// element is independent: results do not depend on the grid, and each value is computed by the
// same f64 operations as the matching sam-core element function (see sam_common.cuh).

// ---- perturb: backup = w; [stash = g/S]; w = perturb(w, g) (sam_core::kernel::perturb) -----

template <typename T>
__device__ __forceinline__ void sam_perturb(const SamPerturbArgs& a) {
    T* w = (T*)a.w;
    const T* g = (const T*)a.g;
    T* backup = (T*)a.backup;
    T* stash = (T*)a.stash;
    const bool do_stash = (a.flags & SAM_PERTURB_STASH) != 0u;
    for (sam_u64 i = sam_thread_index(); i < a.n; i += sam_grid_stride()) {
        const T wv = w[i];
        const T gv = g[i];
        backup[i] = wv;  // a copy of the stored value: exact
        if (do_stash) {
            // sam_core::kernel::stashed: the unscaled gradient (a copy when unscale is 1).
            stash[i] = sam_narrow<T>(sam_unscale(sam_widen(gv), a.unscale));
        }
        w[i] = sam_narrow<T>(sam_perturb_elem(a, sam_widen(wv), sam_widen(gv)));
    }
}

extern "C" __global__ void sam_perturb_f32(const SamPerturbArgs a) { sam_perturb<float>(a); }
extern "C" __global__ void sam_perturb_f64(const SamPerturbArgs a) { sam_perturb<double>(a); }
extern "C" __global__ void sam_perturb_bf16(const SamPerturbArgs a) { sam_perturb<sam_bf16>(a); }
extern "C" __global__ void sam_perturb_f16(const SamPerturbArgs a) { sam_perturb<sam_f16>(a); }

// ---- update: the fused restore-and-step pass (sam_core::kernel::update + fold) --------------

template <typename T>
__device__ __forceinline__ void sam_update(const SamUpdateArgs& a) {
    T* w = (T*)a.w;
    T* g = (T*)a.g;
    const T* backup = (const T*)a.backup;
    T* stash = (T*)a.stash;
    T* s0 = (T*)a.state[0];
    T* s1 = (T*)a.state[1];
    T* s2 = (T*)a.state[2];
    const bool restore = (a.flags & SAM_UPDATE_RESTORE) != 0u;
    const bool reads_stash = (a.flags & SAM_UPDATE_READ_STASH) != 0u;
    const bool mix = (a.flags & SAM_UPDATE_MIX) != 0u;
    const bool post = (a.flags & SAM_UPDATE_POST) != 0u;
    const bool restash = (a.flags & SAM_UPDATE_RESTASH) != 0u;
    for (sam_u64 i = sam_thread_index(); i < a.n; i += sam_grid_stride()) {
        double p = restore ? sam_widen(backup[i]) : sam_widen(w[i]);
        const double gv = sam_unscale(sam_widen(g[i]), a.unscale);
        const double sv = reads_stash ? sam_widen(stash[i]) : 0.0;
        // sam_core::kernel::mix
        const double d = mix ? a.mix_a * gv + a.mix_b * sv : gv;
        double st[3] = {0.0, 0.0, 0.0};
        if (a.n_state > 0u) st[0] = sam_widen(s0[i]);
        if (a.n_state > 1u) st[1] = sam_widen(s1[i]);
        if (a.n_state > 2u) st[2] = sam_widen(s2[i]);
        if (a.base == SAM_BASE_SGD) {
            p = sam_sgd(a.sgd, p, d, &st[0]);
        } else if (a.base == SAM_BASE_ADAM) {
            p = sam_adam(a.adam, p, d, st);
        }
        if (post) {
            p = sam_add(p, a.post_a * gv + a.post_b * sv);  // sam_core::kernel::combine
        }
        const T w_new = sam_narrow<T>(p);
        w[i] = w_new;
        if (a.base == SAM_BASE_EXTERNAL) {
            g[i] = sam_narrow<T>(d);
        }
        if (restash) {
            // From this element's inputs (sv and gv were read above): sam_core::kernel::combine.
            stash[i] = sam_narrow<T>(a.restash_a * gv + a.restash_b * sv);
        }
        if (a.n_state > 0u) s0[i] = sam_narrow<T>(st[0]);
        if (a.n_state > 1u) s1[i] = sam_narrow<T>(st[1]);
        if (a.n_state > 2u) s2[i] = sam_narrow<T>(st[2]);
        // Averages take the stored (rounded) new weight, as the reference backend does.
        const double wr = sam_widen(w_new);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (a.avg_mask & (1u << k)) {
                T* avg = (T*)a.avg[k];
                avg[i] = sam_narrow<T>(sam_fold(sam_widen(avg[i]), wr, a.avg_weight[k]));
            }
        }
    }
}

extern "C" __global__ void sam_update_f32(const SamUpdateArgs a) { sam_update<float>(a); }
extern "C" __global__ void sam_update_f64(const SamUpdateArgs a) { sam_update<double>(a); }
extern "C" __global__ void sam_update_bf16(const SamUpdateArgs a) { sam_update<sam_bf16>(a); }
extern "C" __global__ void sam_update_f16(const SamUpdateArgs a) { sam_update<sam_f16>(a); }

// ---- fold_averages: avg_k = fold(avg_k, w, weight_k) for each k in mask ----------------------

template <typename T>
__device__ __forceinline__ void sam_fold_averages(const SamFoldArgs& a) {
    const T* w = (const T*)a.w;
    for (sam_u64 i = sam_thread_index(); i < a.n; i += sam_grid_stride()) {
        const double wv = sam_widen(w[i]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (a.mask & (1u << k)) {
                T* avg = (T*)a.avg[k];
                avg[i] = sam_narrow<T>(sam_fold(sam_widen(avg[i]), wv, a.weight[k]));
            }
        }
    }
}

extern "C" __global__ void sam_fold_f32(const SamFoldArgs a) { sam_fold_averages<float>(a); }
extern "C" __global__ void sam_fold_f64(const SamFoldArgs a) { sam_fold_averages<double>(a); }
extern "C" __global__ void sam_fold_bf16(const SamFoldArgs a) { sam_fold_averages<sam_bf16>(a); }
extern "C" __global__ void sam_fold_f16(const SamFoldArgs a) { sam_fold_averages<sam_f16>(a); }

// ---- swap_average: exchange two ranges bit for bit (integer moves: NaN payloads survive) ----

template <typename U>
__device__ __forceinline__ void sam_swap(const SamSwapArgs& a) {
    U* x = (U*)a.a;
    U* y = (U*)a.b;
    for (sam_u64 i = sam_thread_index(); i < a.n; i += sam_grid_stride()) {
        const U t = x[i];
        x[i] = y[i];
        y[i] = t;
    }
}

extern "C" __global__ void sam_swap_u16(const SamSwapArgs a) { sam_swap<unsigned short>(a); }
extern "C" __global__ void sam_swap_u32(const SamSwapArgs a) { sam_swap<sam_u32>(a); }
extern "C" __global__ void sam_swap_u64(const SamSwapArgs a) { sam_swap<sam_u64>(a); }
