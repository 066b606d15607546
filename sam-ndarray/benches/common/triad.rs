//! The STREAM triad on the threads a step runs on (shared by `benches/sam_step.rs` and
//! `examples/step_timing.rs`).

/// The STREAM triad `a[i] = b[i] + s·c[i]`, on rayon's pool in chunks of 2¹⁶ with the feature.
pub fn triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .zip(c.par_chunks(CHUNK))
            .for_each(|((a, b), c)| {
                for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
                    *x = y + s * z;
                }
            });
    }
    #[cfg(not(feature = "rayon"))]
    for ((x, y), z) in a.iter_mut().zip(b).zip(c) {
        *x = y + s * z;
    }
}

/// The threads the passes and the triad run on: rayon's pool with the feature, else 1.
pub fn threads() -> usize {
    #[cfg(feature = "rayon")]
    {
        rayon::current_num_threads()
    }
    #[cfg(not(feature = "rayon"))]
    {
        1
    }
}
