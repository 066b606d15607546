//! Parameter shapes of real networks for the benchmarks (shared with sam-candle's bench).

/// The parameter tensors of ResNet-18 (ImageNet head): 20 convolutions, a batch-norm weight
/// and bias per convolution, and the classifier: 62 tensors, 11 689 512 elements.
pub fn resnet18() -> Vec<Vec<usize>> {
    let mut t = Vec::new();
    let mut conv = |shape: Vec<usize>| {
        let c = shape[0];
        t.push(shape);
        t.push(vec![c]);
        t.push(vec![c]);
    };
    conv(vec![64, 3, 7, 7]);
    for _ in 0..4 {
        conv(vec![64, 64, 3, 3]);
    }
    for c in [128, 256, 512] {
        conv(vec![c, c / 2, 3, 3]);
        for _ in 0..3 {
            conv(vec![c, c, 3, 3]);
        }
        conv(vec![c, c / 2, 1, 1]);
    }
    t.push(vec![1000, 512]);
    t.push(vec![1000]);
    t
}
