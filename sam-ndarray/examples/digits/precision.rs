//! The storage precision of a run: the element types of the `NdGroup`, and whether the
//! gradients are loss-scaled.
//!
//! - `f64`, `f32`, `bf16`, `f16`: weights, gradients and every optimizer slot in that type;
//! - `bf16-mixed`, `f16-mixed`: the layout of mixed-precision training with master weights:
//!   `f32` weights and optimizer slots, a 16-bit model copy of the weights (the network computes
//!   with it) and 16-bit gradients.
//!
//! The forward and backward passes compute in `f64` from the weights the network uses (the
//! model copy if there is one, widened exactly) and store the gradient rounded to the gradient
//! type, as an autocast region with wide accumulation would; the optimizer computes in `f64` and
//! rounds once on every store. `f16` runs scale the loss by torch's `GradScaler` defaults (a
//! [`LossScaler`]): the gradient is stored as `S·∇L` and the optimizer unscales it inside its
//! passes, skipping the step (and backing the scale off) when a scaled gradient overflows.

use sam_core::{Error, LossScaler, LossScalerConfig};

/// A storage type of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F64,
    F32,
    Bf16,
    F16,
    Bf16Mixed,
    F16Mixed,
}

impl Precision {
    /// Every precision, in table order.
    pub const ALL: [Precision; 6] = [
        Precision::F64,
        Precision::F32,
        Precision::Bf16,
        Precision::F16,
        Precision::Bf16Mixed,
        Precision::F16Mixed,
    ];

    /// Lower-case name (command line, JSON, labels).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F64 => "f64",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::F16Mixed => "f16-mixed",
        }
    }

    /// Whether the group keeps `f32` master weights and a 16-bit model copy.
    pub fn master_weights(self) -> bool {
        matches!(self, Precision::Bf16Mixed | Precision::F16Mixed)
    }

    /// The loss scaler of a run in this precision: `f16` gradients only (their range needs
    /// it; `bf16` has `f32`'s exponent range and, as in torch, runs unscaled).
    pub fn loss_scaler(self) -> Result<Option<LossScaler>, Error> {
        match self {
            Precision::F16 | Precision::F16Mixed => {
                LossScaler::new(LossScalerConfig::default()).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Parses a comma-separated list (names as in [`name`](Self::name), any case), each at
    /// most once, kept in table order.
    pub fn parse_list(flag: &str, list: &str) -> Result<Vec<Precision>, String> {
        let mut want = [false; Self::ALL.len()];
        for item in list.split(',') {
            let item = item.trim().to_ascii_lowercase();
            let Some(i) = Self::ALL.iter().position(|p| p.name() == item) else {
                return Err(format!(
                    "{flag}: expected a comma-separated subset of \
                     f64,f32,bf16,f16,bf16-mixed,f16-mixed, found {item:?}"
                ));
            };
            want[i] = true;
        }
        Ok(Self::ALL
            .iter()
            .zip(want)
            .filter_map(|(&p, w)| w.then_some(p))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_in_table_order_and_bad_names_are_errors() {
        let l = Precision::parse_list("--precision", "F16-mixed,F16, f64,bf16,f16").unwrap();
        let want = [
            Precision::F64,
            Precision::Bf16,
            Precision::F16,
            Precision::F16Mixed,
        ];
        assert_eq!(l, want);
        for bad in ["", "f8", "f32,,f16", "fp16", "bf16-true"] {
            assert!(
                Precision::parse_list("--precision", bad).is_err(),
                "{bad:?}"
            );
        }
        assert!(Precision::F16.loss_scaler().unwrap().is_some());
        assert!(Precision::F16Mixed.loss_scaler().unwrap().is_some());
        assert!(Precision::Bf16.loss_scaler().unwrap().is_none());
        assert!(Precision::Bf16Mixed.master_weights() && !Precision::Bf16.master_weights());
    }
}
