//! Helpers shared by the integration tests (and, through `#[path]`, by the benchmark).

#![allow(dead_code)]

/// The parameter shapes of torchvision's ResNet-50 (161 tensors, 25 557 032 parameters), in
/// `model.parameters()` order.
pub fn resnet50_shapes() -> Vec<Vec<usize>> {
    let mut s: Vec<Vec<usize>> = vec![vec![64, 3, 7, 7], vec![64], vec![64]];
    let mut inplanes = 64;
    for (planes, blocks) in [(64, 3), (128, 4), (256, 6), (512, 3)] {
        for b in 0..blocks {
            let out = planes * 4;
            s.push(vec![planes, inplanes, 1, 1]);
            s.extend([vec![planes], vec![planes]]);
            s.push(vec![planes, planes, 3, 3]);
            s.extend([vec![planes], vec![planes]]);
            s.push(vec![out, planes, 1, 1]);
            s.extend([vec![out], vec![out]]);
            if b == 0 {
                s.push(vec![out, inplanes, 1, 1]);
                s.extend([vec![out], vec![out]]);
            }
            inplanes = out;
        }
    }
    s.push(vec![1000, 2048]);
    s.push(vec![1000]);
    s
}

/// A small deterministic generator (xorshift64*), so the tests need no extra dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [-1, 1) times 2^e with e uniform in [-e_range, e_range]: values over many
    /// magnitudes, so that the order of a sum matters for its last bits.
    pub fn wide(&mut self, e_range: i32) -> f64 {
        let e = (self.next_u64() % (2 * e_range as u64 + 1)) as i32 - e_range;
        (2.0 * self.unit() - 1.0) * 2f64.powi(e)
    }

    /// A vector of `n` values from `f`.
    pub fn vec(&mut self, n: usize, mut f: impl FnMut(&mut Self) -> f64) -> Vec<f64> {
        (0..n).map(|_| f(self)).collect()
    }
}
