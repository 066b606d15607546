//! Embedding sam-core in your own framework: a user-defined storage type implements
//! `ParamBuffer` (by calling the core's element functions) and trains a tiny model with SAM.
//!
//! The model is a linear regression `y = a·x + b` on noisy data; the storage is a struct of
//! `Vec`s standing in for a framework's tensors.
//!
//! Run: `cargo run -p sam-core --example custom_buffer`

use sam_core::backend::{
    AverageFold, BaseStep, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, Slot, SlotSpec,
    UpdateSpec, kernel,
};
use sam_core::{BaseRule, Group, Optimizer, Perturbation, Sam, SgdConfig};

/// The framework's own storage for one parameter group: weights, gradient, and one `Vec` per
/// optimizer slot.
struct MyParams {
    w: Vec<f32>,
    grad: Vec<f32>,
    slots: Vec<Vec<f32>>,
    spec: SlotSpec,
}

#[derive(Debug)]
struct MyError(&'static str);

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl MyParams {
    fn slot(&self, s: Slot) -> Result<usize, MyError> {
        self.spec.index(s).ok_or(MyError("slot not prepared"))
    }
}

impl ParamBuffer for MyParams {
    type Scalar = f32;
    type Error = MyError;

    fn len(&self) -> usize {
        self.w.len()
    }

    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), MyError> {
        if self.spec != *spec {
            self.slots = vec![vec![0.0; self.w.len()]; spec.count()];
            self.spec = *spec;
        }
        Ok(())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, MyError> {
        let stash = if spec.reads_stash() {
            Some(&self.slots[self.slot(Slot::Stash)?])
        } else {
            None
        };
        let (w, g) = (&self.w, &self.grad);
        Ok(kernel::reduce_flat(w.len(), spec, |i| {
            (
                f64::from(w[i]),
                f64::from(g[i]),
                stash.map_or(0.0, |s| f64::from(s[i])),
            )
        }))
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), MyError> {
        let b = self.slot(Slot::Backup)?;
        let s = if spec.stash {
            Some(self.slot(Slot::Stash)?)
        } else {
            None
        };
        for i in 0..self.w.len() {
            self.slots[b][i] = self.w[i];
            if let Some(s) = s {
                // The unscaled gradient (a copy when no loss scale is set).
                self.slots[s][i] = kernel::stashed(spec, f64::from(self.grad[i])) as f32;
            }
            self.w[i] = kernel::perturb(spec, f64::from(self.w[i]), f64::from(self.grad[i])) as f32;
        }
        Ok(())
    }

    fn restore(&mut self) -> Result<(), MyError> {
        let b = self.slot(Slot::Backup)?;
        self.w.copy_from_slice(&self.slots[b]);
        Ok(())
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), MyError> {
        // This example supports what SAM with SGD needs; a real backend handles every spec.
        if spec.average.any() || spec.reads_stash() || spec.base.state_slots() > 1 {
            return Err(MyError("unsupported update"));
        }
        let b = self.slot(Slot::Backup)?;
        let m = if spec.base.state_slots() == 1 {
            Some(self.slot(Slot::State(0))?)
        } else {
            None
        };
        for i in 0..self.w.len() {
            let mut state = [m.map_or(0.0, |m| f64::from(self.slots[m][i])), 0.0, 0.0];
            let out = kernel::update(
                spec,
                f64::from(self.w[i]),
                f64::from(self.slots[b][i]),
                f64::from(self.grad[i]),
                0.0,
                &mut state,
            );
            self.w[i] = out.w as f32;
            if let Some(m) = m {
                self.slots[m][i] = state[0] as f32;
            }
            if matches!(spec.base, BaseStep::External) {
                self.grad[i] = out.d as f32;
            }
        }
        Ok(())
    }

    fn fold_averages(&mut self, _: &AverageFold) -> Result<(), MyError> {
        Err(MyError("no averages in this example"))
    }

    fn swap_average(&mut self, _: u8) -> Result<(), MyError> {
        Err(MyError("no averages in this example"))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Data: y = 2x + 1 plus a small deterministic wiggle.
    let xs: Vec<f32> = (0..64).map(|i| i as f32 / 32.0 - 1.0).collect();
    let ys: Vec<f32> = xs
        .iter()
        .enumerate()
        .map(|(i, x)| 2.0 * x + 1.0 + 0.05 * ((i * 7) as f32).sin())
        .collect();

    let params = MyParams {
        w: vec![0.0, 0.0],
        grad: vec![0.0; 2],
        slots: Vec::new(),
        spec: SlotSpec::default(),
    };
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.2,
        momentum: 0.9,
        ..Default::default()
    })?;
    let mut groups = [Group::new(params, base)];
    let mut sam = Sam::new(Perturbation::sam(0.05).into())?;

    for epoch in 0..120 {
        let report = sam.step(&mut groups, |gs| {
            // The framework's forward and backward pass: mean squared error.
            let p = &mut gs[0].buffer;
            let (a, b) = (p.w[0], p.w[1]);
            let (mut ga, mut gb, mut loss) = (0.0, 0.0, 0.0);
            for (x, y) in xs.iter().zip(&ys) {
                let r = a * x + b - y;
                loss += r * r;
                ga += 2.0 * r * x;
                gb += 2.0 * r;
            }
            let n = xs.len() as f32;
            p.grad.copy_from_slice(&[ga / n, gb / n]);
            Ok::<_, sam_core::Error<MyError>>(loss / n)
        })?;
        if epoch % 20 == 0 {
            println!("epoch {epoch:2}: loss {:.5}", report.loss);
        }
    }
    let w = &groups[0].buffer.w;
    println!("fitted y = {:.3}·x + {:.3} (true: 2·x + 1)", w[0], w[1]);
    assert!((w[0] - 2.0).abs() < 0.05 && (w[1] - 1.0).abs() < 0.05);
    Ok(())
}
