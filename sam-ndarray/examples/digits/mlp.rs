//! The model: a one-hidden-layer perceptron `d → h → classes` with softmax cross-entropy,
//! forward and backward written with ndarray.
//!
//! Parameters are four tensors in torch's `Linear` layout, in this order (the order of the
//! `NdGroup`'s flat vector): `W1 [h, d]`, `b1 [h]`, `W2 [classes, h]`, `b2 [classes]`.

use ndarray::{Array1, Array2, ArrayD, ArrayView1, ArrayView2, Axis, Ix1, Ix2, IxDyn};
use sam_core::backend::Real;
use sam_ndarray::GradsMut;

use crate::rng::Rng;

/// The hidden layer's non-linearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(0, z)`.
    Relu,
    /// `tanh(z)`.
    Tanh,
}

impl Activation {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
        }
    }
}

/// The architecture.
#[derive(Debug, Clone, Copy)]
pub struct Mlp {
    /// Input features.
    pub inputs: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Classes (outputs).
    pub classes: usize,
    /// Hidden non-linearity.
    pub activation: Activation,
}

/// Gradients of the four tensors.
pub struct Grads {
    pub w1: Array2<f64>,
    pub b1: Array1<f64>,
    pub w2: Array2<f64>,
    pub b2: Array1<f64>,
}

impl Grads {
    /// The four gradients as dynamic-dimensional views, in parameter order.
    pub fn parts(&self) -> [ndarray::ArrayViewD<'_, f64>; 4] {
        [
            self.w1.view().into_dyn(),
            self.b1.view().into_dyn(),
            self.w2.view().into_dyn(),
            self.b2.view().into_dyn(),
        ]
    }
}

/// Loss and accuracy of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Eval {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Correctly classified samples.
    pub correct: usize,
    /// Samples.
    pub n: usize,
}

impl Eval {
    /// Fraction correct.
    pub fn accuracy(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.correct as f64 / self.n as f64
        }
    }
}

type Views<'a> = (
    ArrayView2<'a, f64>,
    ArrayView1<'a, f64>,
    ArrayView2<'a, f64>,
    ArrayView1<'a, f64>,
);

impl Mlp {
    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.hidden * (self.inputs + 1) + self.classes * (self.hidden + 1)
    }

    /// The tensor shapes, in order.
    pub fn shapes(&self) -> [Vec<usize>; 4] {
        [
            vec![self.hidden, self.inputs],
            vec![self.hidden],
            vec![self.classes, self.hidden],
            vec![self.classes],
        ]
    }

    /// torch's default `Linear` initialisation: weights and biases uniform in `±1/√fan_in`.
    pub fn init(&self, rng: &mut Rng) -> Vec<ArrayD<f64>> {
        let fan_in = [self.inputs, self.inputs, self.hidden, self.hidden];
        self.shapes()
            .iter()
            .zip(fan_in)
            .map(|(shape, fan)| {
                let bound = 1.0 / (fan as f64).sqrt();
                ArrayD::from_shape_fn(IxDyn(shape), |_| bound * (2.0 * rng.uniform() - 1.0))
            })
            .collect()
    }

    fn views<'a>(&self, w: &'a [ArrayD<f64>]) -> Result<Views<'a>, String> {
        let bad = || {
            format!(
                "the parameters do not match a {}-{}-{} MLP",
                self.inputs, self.hidden, self.classes
            )
        };
        let [w1, b1, w2, b2] = w else {
            return Err(bad());
        };
        let w1 = w1.view().into_dimensionality::<Ix2>().map_err(|_| bad())?;
        let b1 = b1.view().into_dimensionality::<Ix1>().map_err(|_| bad())?;
        let w2 = w2.view().into_dimensionality::<Ix2>().map_err(|_| bad())?;
        let b2 = b2.view().into_dimensionality::<Ix1>().map_err(|_| bad())?;
        if w1.dim() != (self.hidden, self.inputs) || w2.dim() != (self.classes, self.hidden) {
            return Err(bad());
        }
        Ok((w1, b1, w2, b2))
    }

    /// Mean cross-entropy and accuracy on `(x, y)`, and the gradient if `grad` is set.
    pub fn forward(
        &self,
        w: &[ArrayD<f64>],
        x: ArrayView2<'_, f64>,
        y: &[usize],
        grad: bool,
    ) -> Result<(Eval, Option<Grads>), String> {
        self.forward_masked(w, x, y, grad, None)
    }

    /// The ReLU activation pattern (1 where the unit is active) of the hidden layer on `x`.
    pub fn relu_mask(&self, flat: &[f64], x: ArrayView2<'_, f64>) -> Result<Array2<f64>, String> {
        let w = self.unflatten(flat)?;
        let (w1, b1, _, _) = self.views(&w)?;
        let mut z1 = x.dot(&w1.t());
        z1 += &b1;
        Ok(z1.mapv(|v| if v > 0.0 { 1.0 } else { 0.0 }))
    }

    /// [`forward`](Self::forward), with the ReLU pattern frozen to `mask` if given (the
    /// network is then smooth in the weights: finite differences of its gradient give the
    /// Hessian of the piece the mask belongs to, as automatic differentiation would).
    pub fn forward_masked(
        &self,
        w: &[ArrayD<f64>],
        x: ArrayView2<'_, f64>,
        y: &[usize],
        grad: bool,
        mask: Option<&Array2<f64>>,
    ) -> Result<(Eval, Option<Grads>), String> {
        let (w1, b1, w2, b2) = self.views(w)?;
        let n = x.nrows();
        let mut z1 = x.dot(&w1.t());
        z1 += &b1;
        let a1 = match (self.activation, mask) {
            (Activation::Relu, Some(m)) if m.dim() == z1.dim() => &z1 * m,
            (Activation::Relu, Some(_)) => {
                return Err("the ReLU mask does not match the batch".into());
            }
            (Activation::Relu, None) => z1.mapv(|v| v.max(0.0)),
            (Activation::Tanh, _) => z1.mapv(f64::tanh),
        };
        let mut z2 = a1.dot(&w2.t());
        z2 += &b2;
        // Softmax cross-entropy, row by row; z2 becomes dL/dz2 = (p − onehot)/n in place.
        let (mut loss, mut correct) = (0.0, 0);
        let inv_n = 1.0 / n.max(1) as f64;
        for (mut row, &label) in z2.rows_mut().into_iter().zip(y) {
            let (mut arg, mut max) = (0, f64::NEG_INFINITY);
            for (k, &v) in row.iter().enumerate() {
                if v > max {
                    (arg, max) = (k, v);
                }
            }
            let sum: f64 = row.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum.ln();
            loss += lse - row[label];
            correct += usize::from(arg == label);
            if grad {
                row.mapv_inplace(|v| (v - lse).exp() * inv_n);
                row[label] -= inv_n;
            }
        }
        let eval = Eval {
            loss: loss * inv_n,
            correct,
            n,
        };
        if !grad {
            return Ok((eval, None));
        }
        let dz2 = z2;
        let gw2 = dz2.t().dot(&a1);
        let gb2 = dz2.sum_axis(Axis(0));
        let mut dz1 = dz2.dot(&w2);
        match (self.activation, mask) {
            (Activation::Relu, Some(m)) => dz1 *= m,
            (Activation::Relu, None) => dz1.zip_mut_with(&a1, |d, &a| {
                if a <= 0.0 {
                    *d = 0.0;
                }
            }),
            (Activation::Tanh, _) => dz1.zip_mut_with(&a1, |d, &a| *d *= 1.0 - a * a),
        }
        let gw1 = dz1.t().dot(&x);
        let gb1 = dz1.sum_axis(Axis(0));
        Ok((
            eval,
            Some(Grads {
                w1: gw1,
                b1: gb1,
                w2: gw2,
                b2: gb2,
            }),
        ))
    }

    /// Loss and gradient on `(x, y)` at weights `w`, the gradient times `scale` (the loss
    /// scale; 1 for none) written into an `NdGroup`'s gradient arrays, rounded to their type
    /// `G`. The loss returned is unscaled.
    pub fn backward_into<G: Real>(
        &self,
        w: &[ArrayD<f64>],
        x: ArrayView2<'_, f64>,
        y: &[usize],
        scale: f64,
        out: &mut GradsMut<'_, G>,
    ) -> Result<f64, String> {
        let (eval, g) = self.forward(w, x, y, true)?;
        let g = g.ok_or("no gradient computed")?;
        for (i, part) in g.parts().into_iter().enumerate() {
            let dst = out.slice_mut(i).ok_or("gradient array missing")?;
            if dst.len() != part.len() {
                return Err("gradient shape mismatch".into());
            }
            // Logical (row-major) order whatever the memory layout `dot` chose.
            for (d, &s) in dst.iter_mut().zip(part.iter()) {
                *d = G::from_f64(s * scale);
            }
        }
        Ok(eval.loss)
    }

    /// Splits a flat parameter vector (the group's flat order) into the four tensors.
    pub fn unflatten(&self, flat: &[f64]) -> Result<Vec<ArrayD<f64>>, String> {
        if flat.len() != self.num_params() {
            return Err(format!(
                "expected {} parameters, found {}",
                self.num_params(),
                flat.len()
            ));
        }
        let mut out = Vec::with_capacity(4);
        let mut at = 0;
        for shape in self.shapes() {
            let len: usize = shape.iter().product();
            let t = ArrayD::from_shape_vec(IxDyn(&shape), flat[at..at + len].to_vec())
                .map_err(|e| e.to_string())?;
            out.push(t);
            at += len;
        }
        Ok(out)
    }

    /// Loss and flat gradient at a flat parameter vector (for the analyses), with the ReLU
    /// pattern frozen to `mask` if given.
    pub fn loss_grad_flat(
        &self,
        flat: &[f64],
        x: ArrayView2<'_, f64>,
        y: &[usize],
        mask: Option<&Array2<f64>>,
    ) -> Result<(f64, Vec<f64>), String> {
        let w = self.unflatten(flat)?;
        let (eval, g) = self.forward_masked(&w, x, y, true, mask)?;
        let g = g.ok_or("no gradient computed")?;
        let out = g.parts().iter().flat_map(|p| p.iter().copied()).collect();
        Ok((eval.loss, out))
    }

    /// Loss and accuracy at a flat parameter vector.
    pub fn eval_flat(
        &self,
        flat: &[f64],
        x: ArrayView2<'_, f64>,
        y: &[usize],
    ) -> Result<Eval, String> {
        let w = self.unflatten(flat)?;
        Ok(self.forward(&w, x, y, false)?.0)
    }
}

/// Flattens tensors into one `f64` vector (row-major, in order).
pub fn flatten<T: Real>(w: &[ArrayD<T>]) -> Vec<f64> {
    w.iter()
        .flat_map(|t| t.iter().map(|x| x.to_f64()))
        .collect()
}

/// The tensors widened to `f64` (exact for every storage type).
pub fn widen<T: Real>(w: &[ArrayD<T>]) -> Vec<ArrayD<f64>> {
    w.iter().map(|t| t.mapv(|x| x.to_f64())).collect()
}

/// `f64` tensors rounded to `T`.
pub fn narrow<T: Real>(w: &[ArrayD<f64>]) -> Vec<ArrayD<T>> {
    w.iter().map(|t| t.mapv(T::from_f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    fn check_gradient(activation: Activation) {
        let mlp = Mlp {
            inputs: 5,
            hidden: 7,
            classes: 3,
            activation,
        };
        let mut rng = Rng::new("test", 1);
        let w = flatten(&mlp.init(&mut rng));
        let x = Array2::from_shape_fn((11, 5), |_| rng.uniform());
        let y: Vec<usize> = (0..11).map(|i| i % 3).collect();
        let (_, g) = mlp.loss_grad_flat(&w, x.view(), &y, None).unwrap();
        let h = 1e-6;
        for i in 0..w.len() {
            let (mut wp, mut wm) = (w.clone(), w.clone());
            wp[i] += h;
            wm[i] -= h;
            let lp = mlp.eval_flat(&wp, x.view(), &y).unwrap().loss;
            let lm = mlp.eval_flat(&wm, x.view(), &y).unwrap().loss;
            let fd = (lp - lm) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{activation:?} param {i}: {fd} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        check_gradient(Activation::Relu);
        check_gradient(Activation::Tanh);
    }

    #[test]
    fn frozen_mask_at_w_gives_the_same_loss_and_gradient() {
        let mlp = Mlp {
            inputs: 4,
            hidden: 6,
            classes: 3,
            activation: Activation::Relu,
        };
        let mut rng = Rng::new("test", 2);
        let w = flatten(&mlp.init(&mut rng));
        let x = Array2::from_shape_fn((9, 4), |_| rng.uniform());
        let y: Vec<usize> = (0..9).map(|i| i % 3).collect();
        let mask = mlp.relu_mask(&w, x.view()).unwrap();
        let a = mlp.loss_grad_flat(&w, x.view(), &y, None).unwrap();
        let b = mlp.loss_grad_flat(&w, x.view(), &y, Some(&mask)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_mismatched_parameters() {
        let mlp = Mlp {
            inputs: 4,
            hidden: 6,
            classes: 3,
            activation: Activation::Relu,
        };
        assert!(mlp.unflatten(&[0.0; 5]).is_err());
        let other = Mlp { hidden: 5, ..mlp };
        let w = other.init(&mut Rng::new("test", 3));
        let x = Array2::zeros((2, 4));
        assert!(mlp.forward(&w, x.view(), &[0, 1], false).is_err());
    }
}
