//! The full-batch objectives of SCHEMA §3 with analytic gradients, generic over `f32`/`f64`.
//!
//! All arithmetic runs in the element type `T`, so an `f32` case is evaluated in `f32` like
//! upstream. Cross-entropy uses a max-shifted (stable) log-sum-exp and the mean over samples.

use num_traits::Float;

use crate::case::Objective;

/// Element type of an objective evaluation: `f32` or `f64`.
pub trait Scalar: Float + core::fmt::Debug + 'static {
    /// Rounds an `f64` to `Self` (to nearest; exact for values representable in `Self`).
    fn convert(x: f64) -> Self;
}

impl Scalar for f32 {
    fn convert(x: f64) -> Self {
        x as f32
    }
}

impl Scalar for f64 {
    fn convert(x: f64) -> Self {
        x
    }
}

/// Data of a softmax or mlp objective, converted to `T`.
#[derive(Debug, Clone)]
struct Data<T> {
    x: Vec<T>,
    y: Vec<usize>,
    n: usize,
    d: usize,
    classes: usize,
}

#[derive(Debug, Clone)]
enum Kind<T> {
    Quadratic { a: Vec<T>, b: Vec<T>, n: usize },
    Softmax(Data<T>),
    Mlp(Data<T>, usize),
}

/// An objective ready for evaluation in element type `T`.
#[derive(Debug, Clone)]
pub struct Problem<T> {
    kind: Kind<T>,
    /// Length of θ, or `None` if the objective's data are inconsistent.
    n_params: Option<usize>,
}

/// `m[r·cols .. (r+1)·cols]`, or an empty slice if out of range (never for consistent data).
fn row<T>(m: &[T], r: usize, cols: usize) -> &[T] {
    r.checked_mul(cols)
        .and_then(|s| m.get(s..s.checked_add(cols)?))
        .unwrap_or_default()
}

fn row_mut<T>(m: &mut [T], r: usize, cols: usize) -> &mut [T] {
    r.checked_mul(cols)
        .and_then(|s| m.get_mut(s..s.checked_add(cols)?))
        .unwrap_or_default()
}

fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |s, (&x, &y)| s + x * y)
}

/// `y += alpha · x`.
fn axpy<T: Scalar>(y: &mut [T], alpha: T, x: &[T]) {
    y.iter_mut()
        .zip(x)
        .for_each(|(yi, &xi)| *yi = *yi + alpha * xi);
}

/// Replaces the logits `z` by `D = (softmax(z) − onehot(label)) / n` and returns the sample's
/// cross-entropy `logsumexp(z) − z[label]`.
fn cross_entropy<T: Scalar>(z: &mut [T], label: usize, n: T) -> T {
    let max = z.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
    let sum = z.iter().fold(T::zero(), |s, &v| s + (v - max).exp());
    let loss = max + sum.ln() - z.get(label).copied().unwrap_or_else(T::nan);
    for (j, v) in z.iter_mut().enumerate() {
        let p = (*v - max).exp() / sum;
        *v = (if j == label { p - T::one() } else { p }) / n;
    }
    loss
}

impl<T: Scalar> Problem<T> {
    /// Converts the objective's data to `T` (exact for f32 cases, see SCHEMA §1).
    ///
    /// An inconsistent objective (which [`crate::case::parse_case`] never produces) is accepted
    /// here, and every evaluation of it then yields NaN.
    pub fn new(obj: &Objective) -> Problem<T> {
        let conv = |v: &[f64]| v.iter().map(|&x| T::convert(x)).collect::<Vec<T>>();
        let data = |x: &[f64], y: &[usize], n: usize, d: usize, classes: usize| Data {
            x: conv(x),
            y: y.to_vec(),
            n,
            d,
            classes,
        };
        let consistent = |x: &[f64], y: &[usize], n: usize, d: usize, classes: usize| {
            n.checked_mul(d) == Some(x.len()) && y.len() == n && y.iter().all(|&l| l < classes)
        };
        let (kind, n_params) = match *obj {
            Objective::Quadratic { ref a, ref b, n } => {
                let ok = n.checked_mul(n) == Some(a.len()) && b.len() == n;
                (
                    Kind::Quadratic {
                        a: conv(a),
                        b: conv(b),
                        n,
                    },
                    ok.then_some(n),
                )
            }
            Objective::Softmax {
                ref x,
                ref y,
                n,
                d,
                classes,
            } => {
                let len = classes.checked_mul(d).and_then(|w| w.checked_add(classes));
                let ok = consistent(x, y, n, d, classes);
                (Kind::Softmax(data(x, y, n, d, classes)), len.filter(|_| ok))
            }
            Objective::Mlp {
                ref x,
                ref y,
                n,
                d,
                classes,
                hidden,
            } => {
                let len = (|| {
                    let first = hidden.checked_mul(d)?.checked_add(hidden)?;
                    first.checked_add(classes.checked_mul(hidden)?.checked_add(classes)?)
                })();
                let ok = consistent(x, y, n, d, classes);
                (
                    Kind::Mlp(data(x, y, n, d, classes), hidden),
                    len.filter(|_| ok),
                )
            }
        };
        Problem { kind, n_params }
    }

    /// Length of θ this objective takes, or `None` if its data are inconsistent.
    pub fn n_params(&self) -> Option<usize> {
        self.n_params
    }

    /// θ is the concatenation of params in `Case::params` order; writes ∇L(θ) into `grad` (same
    /// length) and returns L(θ), both computed in `T` arithmetic.
    ///
    /// If `theta` or `grad` has the wrong length, or the objective is inconsistent, `grad` is
    /// filled with NaN and NaN is returned.
    pub fn loss_grad(&self, theta: &[T], grad: &mut [T]) -> T {
        if self.n_params != Some(theta.len()) || grad.len() != theta.len() {
            grad.fill(T::nan());
            return T::nan();
        }
        match &self.kind {
            Kind::Quadratic { a, b, n } => quadratic(a, b, *n, theta, grad),
            Kind::Softmax(data) => softmax(data, theta, grad),
            Kind::Mlp(data, hidden) => mlp(data, *hidden, theta, grad),
        }
    }
}

/// `L = ½·θᵀ(Aθ) − bᵀθ`, `∇L = Aθ − b`.
fn quadratic<T: Scalar>(a: &[T], b: &[T], n: usize, theta: &[T], grad: &mut [T]) -> T {
    let (mut quad, mut lin) = (T::zero(), T::zero());
    for (i, (g, (&bi, &ti))) in grad.iter_mut().zip(b.iter().zip(theta)).enumerate() {
        let ai_theta = dot(row(a, i, n), theta);
        *g = ai_theta - bi;
        quad = quad + ti * ai_theta;
        lin = lin + bi * ti;
    }
    T::convert(0.5) * quad - lin
}

/// Mean cross-entropy of `Z = X·Wᵀ + b`.
fn softmax<T: Scalar>(data: &Data<T>, theta: &[T], grad: &mut [T]) -> T {
    let &Data {
        ref x,
        ref y,
        n,
        d,
        classes: k,
    } = data;
    let split = k.saturating_mul(d);
    let (Some((w, bias)), Some((gw, gb))) = (
        theta.split_at_checked(split),
        grad.split_at_mut_checked(split),
    ) else {
        grad.fill(T::nan());
        return T::nan();
    };
    gw.fill(T::zero());
    gb.fill(T::zero());
    let n_t = T::convert(n as f64);
    let mut z = vec![T::zero(); k];
    let mut total = T::zero();
    for (i, &label) in y.iter().enumerate() {
        let xi = row(x, i, d);
        for (j, (zj, &bj)) in z.iter_mut().zip(bias).enumerate() {
            *zj = dot(row(w, j, d), xi) + bj;
        }
        total = total + cross_entropy(&mut z, label, n_t);
        for (j, (&dj, gbj)) in z.iter().zip(gb.iter_mut()).enumerate() {
            axpy(row_mut(gw, j, d), dj, xi);
            *gbj = *gbj + dj;
        }
    }
    total / n_t
}

/// Mean cross-entropy of `Z = tanh(X·W1ᵀ + b1)·W2ᵀ + b2`.
fn mlp<T: Scalar>(data: &Data<T>, h: usize, theta: &[T], grad: &mut [T]) -> T {
    let &Data {
        ref x,
        ref y,
        n,
        d,
        classes: k,
    } = data;
    let (hd, kh) = (h.saturating_mul(d), k.saturating_mul(h));
    let split = |s| -> Option<[&[T]; 4]> {
        let (w1, rest) = <[T]>::split_at_checked(s, hd)?;
        let (b1, rest) = rest.split_at_checked(h)?;
        let (w2, b2) = rest.split_at_checked(kh)?;
        Some([w1, b1, w2, b2])
    };
    let Some([w1, b1, w2, b2]) = split(theta) else {
        grad.fill(T::nan());
        return T::nan();
    };
    let Some((gw1, rest)) = grad.split_at_mut_checked(hd) else {
        return T::nan();
    };
    let Some((gb1, rest)) = rest.split_at_mut_checked(h) else {
        return T::nan();
    };
    let Some((gw2, gb2)) = rest.split_at_mut_checked(kh) else {
        return T::nan();
    };
    for g in [&mut *gw1, &mut *gb1, &mut *gw2, &mut *gb2] {
        g.fill(T::zero());
    }
    let n_t = T::convert(n as f64);
    let (mut act, mut z, mut back) = (vec![T::zero(); h], vec![T::zero(); k], vec![T::zero(); h]);
    let mut total = T::zero();
    for (i, &label) in y.iter().enumerate() {
        let xi = row(x, i, d);
        for (l, (al, &bl)) in act.iter_mut().zip(b1).enumerate() {
            *al = (dot(row(w1, l, d), xi) + bl).tanh();
        }
        for (j, (zj, &bj)) in z.iter_mut().zip(b2).enumerate() {
            *zj = dot(row(w2, j, h), &act) + bj;
        }
        total = total + cross_entropy(&mut z, label, n_t);
        back.fill(T::zero());
        for (j, (&dj, gb2j)) in z.iter().zip(gb2.iter_mut()).enumerate() {
            axpy(row_mut(gw2, j, h), dj, &act);
            axpy(&mut back, dj, row(w2, j, h));
            *gb2j = *gb2j + dj;
        }
        for (l, ((&bl, &al), gb1l)) in back.iter().zip(&act).zip(gb1.iter_mut()).enumerate() {
            let gl = bl * (T::one() - al * al);
            axpy(row_mut(gw1, l, d), gl, xi);
            *gb1l = *gb1l + gl;
        }
    }
    total / n_t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::{Case, Dtype, parse_case};

    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal_vec(&mut self, len: usize) -> Vec<f64> {
            (0..len).map(|_| 2.0 * self.uniform() - 1.0).collect()
        }
        fn labels(&mut self, n: usize, k: usize) -> Vec<usize> {
            (0..n)
                .map(|_| ((self.uniform() * k as f64) as usize).min(k - 1))
                .collect()
        }
    }

    fn check_fd(obj: &Objective, rng: &mut Rng) {
        let p = Problem::<f64>::new(obj);
        let len = p.n_params().expect("consistent");
        let theta = rng.normal_vec(len);
        let mut grad = vec![0.0; len];
        let loss = p.loss_grad(&theta, &mut grad);
        assert!(loss.is_finite());
        let mut scratch = vec![0.0; len];
        for i in 0..len {
            let h = 1e-6;
            let (mut plus, mut minus) = (theta.clone(), theta.clone());
            plus[i] += h;
            minus[i] -= h;
            let fd =
                (p.loss_grad(&plus, &mut scratch) - p.loss_grad(&minus, &mut scratch)) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() <= 1e-7 * (1.0 + fd.abs()),
                "{obj:?}: ∂{i}: analytic {} vs fd {fd}",
                grad[i]
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for trial in 0..5 {
            let n = 3 + trial;
            let m = rng.normal_vec(n * n);
            let mut a = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = m[i * n + j] + m[j * n + i];
                }
            }
            check_fd(
                &Objective::Quadratic {
                    a,
                    b: rng.normal_vec(n),
                    n,
                },
                &mut rng,
            );

            let (n, d, classes, hidden) = (5 + trial, 2 + trial, 2 + trial % 3, 3 + trial % 2);
            let x: Vec<f64> = rng.normal_vec(n * d).iter().map(|v| 3.0 * v).collect();
            let y = rng.labels(n, classes);
            check_fd(
                &Objective::Softmax {
                    x: x.clone(),
                    y: y.clone(),
                    n,
                    d,
                    classes,
                },
                &mut rng,
            );
            check_fd(
                &Objective::Mlp {
                    x,
                    y,
                    n,
                    d,
                    classes,
                    hidden,
                },
                &mut rng,
            );
        }
    }

    #[test]
    fn huge_logits_stay_finite() {
        let obj = Objective::Softmax {
            x: vec![1.0, -1.0],
            y: vec![1, 0],
            n: 2,
            d: 1,
            classes: 2,
        };
        let p = Problem::<f32>::new(&obj);
        let mut grad = [0.0f32; 4];
        let loss = p.loss_grad(&[200.0, -200.0, 0.0, 0.0], &mut grad);
        assert_eq!(loss, 400.0);
        assert!(grad.iter().all(|g| g.is_finite()));
    }

    #[test]
    fn bad_lengths_and_inconsistent_objectives_give_nan() {
        let p = Problem::<f64>::new(&Objective::Quadratic {
            a: vec![1.0; 3],
            b: vec![0.0; 2],
            n: 2,
        });
        assert_eq!(p.n_params(), None);
        let mut g = [0.0; 2];
        assert!(p.loss_grad(&[1.0, 2.0], &mut g).is_nan() && g.iter().all(|v| v.is_nan()));
        let p = Problem::<f64>::new(&Objective::Mlp {
            x: vec![0.0; 4],
            y: vec![0, 5],
            n: 2,
            d: 2,
            classes: 2,
            hidden: usize::MAX,
        });
        assert_eq!(p.n_params(), None);
        let p = Problem::<f64>::new(&Objective::Softmax {
            x: vec![],
            y: vec![0],
            n: 1,
            d: 0,
            classes: 2,
        });
        assert_eq!(p.n_params(), Some(2));
        let mut g = [0.0; 3];
        assert!(p.loss_grad(&[0.0; 3], &mut g).is_nan());
        let mut g = [0.0; 2];
        assert!((p.loss_grad(&[0.0; 2], &mut g) - 2f64.ln()).abs() < 1e-15);
    }

    fn within(got: f64, exp: f64, case: &Case) -> bool {
        (got - exp).abs() <= case.tolerance.atol + case.tolerance.rtol * exp.abs()
    }

    /// Loss of each `expected.params[t]` is `expected.loss[t + 1]`, and of θ₀ is `loss[0]`.
    fn check_losses<T: Scalar + Into<f64>>(case: &Case) {
        let p = Problem::<T>::new(&case.objective);
        let thetas = std::iter::once(case.theta0()).chain(case.expected.params.iter().cloned());
        for (t, (theta, &exp)) in thetas.zip(&case.expected.loss).enumerate() {
            let theta: Vec<T> = theta.iter().map(|&v| T::convert(v)).collect();
            let mut grad = vec![T::zero(); theta.len()];
            let got: f64 = p.loss_grad(&theta, &mut grad).into();
            assert!(
                within(got, exp, case),
                "{} loss[{t}]: got {got:e}, expected {exp:e}",
                case.name
            );
        }
    }

    #[test]
    fn losses_of_vendored_cases_match_upstream() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cases");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).expect("cases dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let case = parse_case(&std::fs::read(&path).expect("read")).expect("parse");
            match case.dtype {
                Dtype::F64 => check_losses::<f64>(&case),
                Dtype::F32 => check_losses::<f32>(&case),
            }
            count += 1;
        }
        assert!(count >= 41);
    }
}
