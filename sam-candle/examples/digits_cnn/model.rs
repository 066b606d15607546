//! The network (candle-nn layers over a `VarMap`) and the data as candle tensors.

use candle_core::{D, DType, Device, Module, Result, Tensor, Var};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap, conv2d, linear};

use crate::data::Dataset;
use crate::rng::Rng;

/// Side of the square input images.
pub const SIDE: usize = 8;

/// `conv(1→8, 3×3, pad 1) → relu → max-pool 2 → conv(8→16, 3×3, pad 1) → relu → max-pool 2 →
/// flatten → linear(64→classes)`, on `N × 1 × 8 × 8` images.
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc: Linear,
    /// The parameters, by name (`conv1.bias`, `conv1.weight`, …), sorted: one param group.
    pub vars: Vec<(String, Var)>,
}

/// A data split as tensors: `x` is `N × 1 × 8 × 8` (f32, scaled to [0, 1]), `y` the labels
/// (u32).
pub struct Split {
    pub x: Tensor,
    pub y: Tensor,
    pub len: usize,
}

impl Split {
    /// The split of `d` (`d.x` must have 64 columns, the 8×8 pixels).
    pub fn new(d: &Dataset) -> Result<Self> {
        let n = d.len();
        if d.x.ncols() != SIDE * SIDE {
            candle_core::bail!(
                "the CNN needs {} pixel columns (8x8 images), found {}",
                SIDE * SIDE,
                d.x.ncols()
            );
        }
        let x: Vec<f32> = d.x.iter().map(|&v| v as f32).collect();
        let y: Vec<u32> = d.y.iter().map(|&c| c as u32).collect();
        Ok(Split {
            x: Tensor::from_vec(x, (n, 1, SIDE, SIDE), &Device::Cpu)?,
            y: Tensor::from_vec(y, n, &Device::Cpu)?,
            len: n,
        })
    }

    /// The samples at `idx`, in that order.
    pub fn batch(&self, idx: &[u32]) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_slice(idx, idx.len(), &Device::Cpu)?;
        Ok((self.x.index_select(&idx, 0)?, self.y.index_select(&idx, 0)?))
    }
}

impl Cnn {
    /// The network with `classes` outputs, its weights drawn from `rng` (torch's default
    /// initialisation: uniform in ±1/√fan_in, for weights and biases), so that a seed gives
    /// the same initial weights to every optimizer.
    pub fn new(classes: usize, rng: &mut Rng) -> Result<Self> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv1 = conv2d(1, 8, 3, cfg, vb.pp("conv1"))?;
        let conv2 = conv2d(8, 16, 3, cfg, vb.pp("conv2"))?;
        let flat = 16 * (SIDE / 4) * (SIDE / 4);
        let fc = linear(flat, classes, vb.pp("fc"))?;

        let mut vars: Vec<(String, Var)> = map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("the VarMap's lock is poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &vars {
            let layer = name.rsplit_once('.').map_or(name.as_str(), |(l, _)| l);
            let weight = vars
                .iter()
                .find(|(n, _)| *n == format!("{layer}.weight"))
                .map(|(_, w)| w.dims().to_vec())
                .unwrap_or_default();
            let fan_in: usize = weight.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let values: Vec<f32> = (0..var.elem_count())
                .map(|_| (bound * (2.0 * rng.uniform() - 1.0)) as f32)
                .collect();
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)?;
        }
        Ok(Cnn {
            conv1,
            conv2,
            fc,
            vars,
        })
    }

    /// The parameters, in the sorted order of their names.
    pub fn params(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The logits, `N × classes`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward(x)?.relu()?.max_pool2d(2)?;
        let x = self.conv2.forward(&x)?.relu()?.max_pool2d(2)?;
        self.fc.forward(&x.flatten_from(1)?)
    }

    /// Mean cross-entropy of the batch.
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        candle_nn::loss::cross_entropy(&self.forward(x)?, y)
    }

    /// (accuracy in [0, 1], mean cross-entropy) on a whole split, at the current weights.
    pub fn evaluate(&self, s: &Split) -> Result<(f64, f64)> {
        let logits = self.forward(&s.x.detach())?;
        let loss = candle_nn::loss::cross_entropy(&logits, &s.y)?.to_scalar::<f32>()?;
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&s.y)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok((f64::from(hits) / s.len.max(1) as f64, f64::from(loss)))
    }
}
