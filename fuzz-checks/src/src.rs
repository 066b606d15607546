//! A total wrapper around [`arbitrary::Unstructured`]: every draw returns a value (the range's
//! start, `false`, … once the input is exhausted), so the generators need no error plumbing.

use arbitrary::Unstructured;

/// The byte source every generator draws from.
#[derive(Debug)]
pub struct Src<'a> {
    u: Unstructured<'a>,
}

impl<'a> Src<'a> {
    /// A source over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Src {
            u: Unstructured::new(data),
        }
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.u.len()
    }

    /// Whether the input is exhausted.
    pub fn is_empty(&self) -> bool {
        self.u.is_empty()
    }

    /// An integer in `lo..=hi` (`lo` when exhausted).
    pub fn int(&mut self, lo: u64, hi: u64) -> u64 {
        self.u.int_in_range(lo..=hi).unwrap_or(lo)
    }

    /// A `usize` in `lo..=hi`.
    pub fn usize(&mut self, lo: usize, hi: usize) -> usize {
        self.u.int_in_range(lo..=hi).unwrap_or(lo)
    }

    /// An index below `n` (`0` when `n == 0`).
    pub fn index(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { self.usize(0, n - 1) }
    }

    /// A boolean.
    pub fn bool(&mut self) -> bool {
        self.u.arbitrary::<bool>().unwrap_or(false)
    }

    /// `true` with probability about `num/den`.
    pub fn chance(&mut self, num: u8, den: u8) -> bool {
        if num == 0 || den == 0 {
            return false;
        }
        self.u.ratio(num.min(den), den).unwrap_or(false)
    }

    /// Any `u64`.
    pub fn u64(&mut self) -> u64 {
        self.u.arbitrary::<u64>().unwrap_or(0)
    }

    /// Any `f64` bit pattern.
    pub fn raw_f64(&mut self) -> f64 {
        f64::from_bits(self.u64())
    }

    /// A uniform-ish value in `[lo, hi]` (20 bits of resolution; both ends reachable).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        const STEPS: u64 = 1 << 20;
        let k = self.int(0, STEPS);
        let x = lo + (hi - lo) * (k as f64 / STEPS as f64);
        x.clamp(lo, hi)
    }

    /// One element of `choices` (the first when exhausted).
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.index(choices.len())]
    }

    /// Some bytes (fewer when exhausted).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.u.len());
        self.u.bytes(n).unwrap_or(&[])
    }
}
