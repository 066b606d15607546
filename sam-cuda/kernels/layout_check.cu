// sam-cuda: compile-time check that the #[repr(C)] argument structs of src/internals/abi.rs and the
// structs of sam_common.cuh have the same size, alignment and field offsets.
//
// Compiled by NVRTC after sam_common.cuh (tests/nvrtc.rs, `sam_cuda::internals::kernels::check_layout`).
// The expected values are the Rust ones (core::mem::size_of / align_of / offset_of!), passed
// as -D options by `sam_cuda::internals::abi::layout_defines()`; a field listed here but missing on the
// Rust side is an undefined macro, hence a compile error too.
//
// NVRTC has no `offsetof` (no <cstddef>, and EDG's __builtin_offsetof is not enabled), so the
// C offsets are derived instead of read: every struct lists ALL its fields in declaration
// order. For each field the check asserts (1) that it lies after the previous one (address
// comparison on a constexpr object), and (2) that its offset, taken as the sum of the sizes of
// the fields before it, equals the Rust offset; finally (3) the sum of all field sizes equals
// sizeof(S). (1) and (3) together prove that the list is complete, in order, and that the
// struct has no padding, so the derived offsets ARE the C offsets.

#define SAM_STRUCT(S)                                                                           \
    constexpr S sam_probe_##S{};                                                                \
    static_assert(sizeof(S) == SAM_SIZEOF_##S, #S ": sizeof differs from the Rust struct");    \
    static_assert(alignof(S) == SAM_ALIGNOF_##S, #S ": alignof differs from the Rust struct")
#define SAM_FIRST(S, f)                                                                         \
    static_assert(0 == SAM_OFFSETOF_##S##_##f, #S "." #f ": offset differs from the Rust struct"); \
    constexpr unsigned long long sam_end_##S##_##f = sizeof(S::f)
#define SAM_NEXT(S, prev, f)                                                                    \
    static_assert((const void*)&sam_probe_##S.prev < (const void*)&sam_probe_##S.f,              \
                  #S "." #f ": not declared after " #prev);                                     \
    static_assert(sam_end_##S##_##prev == SAM_OFFSETOF_##S##_##f,                               \
                  #S "." #f ": offset differs from the Rust struct");                           \
    constexpr unsigned long long sam_end_##S##_##f = sam_end_##S##_##prev + sizeof(S::f)
#define SAM_END(S, last)                                                                        \
    static_assert(sam_end_##S##_##last == sizeof(S),                                            \
                  #S ": fields missing from this list, or implicit padding")

SAM_STRUCT(SamReduction);
SAM_FIRST(SamReduction, perturb_sq);
SAM_NEXT(SamReduction, perturb_sq, grad_sq);
SAM_NEXT(SamReduction, grad_sq, stash_sq);
SAM_NEXT(SamReduction, stash_sq, dot);
SAM_NEXT(SamReduction, dot, perturb_max);
SAM_NEXT(SamReduction, perturb_max, grad_max);
SAM_NEXT(SamReduction, grad_max, stash_max);
SAM_NEXT(SamReduction, stash_max, finite);
SAM_NEXT(SamReduction, finite, empty);
SAM_END(SamReduction, empty);

SAM_STRUCT(SamReduceArgs);
SAM_FIRST(SamReduceArgs, w);
SAM_NEXT(SamReduceArgs, w, g);
SAM_NEXT(SamReduceArgs, g, stash);
SAM_NEXT(SamReduceArgs, stash, partials);
SAM_NEXT(SamReduceArgs, partials, n);
SAM_NEXT(SamReduceArgs, n, blocks);
SAM_NEXT(SamReduceArgs, blocks, scale_perturb);
SAM_NEXT(SamReduceArgs, scale_perturb, scale_grad);
SAM_NEXT(SamReduceArgs, scale_grad, scale_stash);
SAM_NEXT(SamReduceArgs, scale_stash, eta);
SAM_NEXT(SamReduceArgs, eta, unscale);
SAM_NEXT(SamReduceArgs, unscale, flags);
SAM_NEXT(SamReduceArgs, flags, pad_);
SAM_END(SamReduceArgs, pad_);

SAM_STRUCT(SamCombineArgs);
SAM_FIRST(SamCombineArgs, partials);
SAM_NEXT(SamCombineArgs, partials, src);
SAM_NEXT(SamCombineArgs, src, out);
SAM_NEXT(SamCombineArgs, out, count);
SAM_NEXT(SamCombineArgs, count, depth);
SAM_NEXT(SamCombineArgs, depth, leaf);
SAM_END(SamCombineArgs, leaf);

SAM_STRUCT(SamPerturbArgs);
SAM_FIRST(SamPerturbArgs, w);
SAM_NEXT(SamPerturbArgs, w, g);
SAM_NEXT(SamPerturbArgs, g, backup);
SAM_NEXT(SamPerturbArgs, backup, stash);
SAM_NEXT(SamPerturbArgs, stash, n);
SAM_NEXT(SamPerturbArgs, n, scale);
SAM_NEXT(SamPerturbArgs, scale, coeff);
SAM_NEXT(SamPerturbArgs, coeff, eta);
SAM_NEXT(SamPerturbArgs, eta, unscale);
SAM_NEXT(SamPerturbArgs, unscale, flags);
SAM_NEXT(SamPerturbArgs, flags, pad_);
SAM_END(SamPerturbArgs, pad_);

SAM_STRUCT(SamSgdScalars);
SAM_FIRST(SamSgdScalars, neg_lr);
SAM_NEXT(SamSgdScalars, neg_lr, weight_decay);
SAM_NEXT(SamSgdScalars, weight_decay, momentum);
SAM_NEXT(SamSgdScalars, momentum, one_minus_dampening);
SAM_NEXT(SamSgdScalars, one_minus_dampening, nesterov);
SAM_NEXT(SamSgdScalars, nesterov, first);
SAM_END(SamSgdScalars, first);

SAM_STRUCT(SamAdamScalars);
SAM_FIRST(SamAdamScalars, decay);
SAM_NEXT(SamAdamScalars, decay, l2);
SAM_NEXT(SamAdamScalars, l2, one_minus_beta1);
SAM_NEXT(SamAdamScalars, one_minus_beta1, beta2);
SAM_NEXT(SamAdamScalars, beta2, one_minus_beta2);
SAM_NEXT(SamAdamScalars, one_minus_beta2, bc2_sqrt);
SAM_NEXT(SamAdamScalars, bc2_sqrt, neg_step_size);
SAM_NEXT(SamAdamScalars, neg_step_size, eps);
SAM_NEXT(SamAdamScalars, eps, amsgrad);
SAM_NEXT(SamAdamScalars, amsgrad, pad_);
SAM_END(SamAdamScalars, pad_);

SAM_STRUCT(SamUpdateArgs);
SAM_FIRST(SamUpdateArgs, w);
SAM_NEXT(SamUpdateArgs, w, g);
SAM_NEXT(SamUpdateArgs, g, backup);
SAM_NEXT(SamUpdateArgs, backup, stash);
SAM_NEXT(SamUpdateArgs, stash, state);
SAM_NEXT(SamUpdateArgs, state, avg);
SAM_NEXT(SamUpdateArgs, avg, n);
SAM_NEXT(SamUpdateArgs, n, mix_a);
SAM_NEXT(SamUpdateArgs, mix_a, mix_b);
SAM_NEXT(SamUpdateArgs, mix_b, post_a);
SAM_NEXT(SamUpdateArgs, post_a, post_b);
SAM_NEXT(SamUpdateArgs, post_b, restash_a);
SAM_NEXT(SamUpdateArgs, restash_a, restash_b);
SAM_NEXT(SamUpdateArgs, restash_b, unscale);
SAM_NEXT(SamUpdateArgs, unscale, avg_weight);
SAM_NEXT(SamUpdateArgs, avg_weight, sgd);
SAM_NEXT(SamUpdateArgs, sgd, adam);
SAM_NEXT(SamUpdateArgs, adam, flags);
SAM_NEXT(SamUpdateArgs, flags, base);
SAM_NEXT(SamUpdateArgs, base, n_state);
SAM_NEXT(SamUpdateArgs, n_state, avg_mask);
SAM_END(SamUpdateArgs, avg_mask);

SAM_STRUCT(SamFoldArgs);
SAM_FIRST(SamFoldArgs, w);
SAM_NEXT(SamFoldArgs, w, avg);
SAM_NEXT(SamFoldArgs, avg, n);
SAM_NEXT(SamFoldArgs, n, weight);
SAM_NEXT(SamFoldArgs, weight, mask);
SAM_NEXT(SamFoldArgs, mask, pad_);
SAM_END(SamFoldArgs, pad_);

SAM_STRUCT(SamSwapArgs);
SAM_FIRST(SamSwapArgs, a);
SAM_NEXT(SamSwapArgs, a, b);
SAM_NEXT(SamSwapArgs, b, n);
SAM_END(SamSwapArgs, n);

// An entry point, so that the program is a complete module.
extern "C" __global__ void sam_layout_check(unsigned long long* out) {
    if (out != 0) {
        out[0] = sizeof(SamUpdateArgs);
    }
}
