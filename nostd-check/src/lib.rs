//! A `#![no_std]` library that runs SAM steps on f32, f64 and bf16 slices through `sam-core`
//! (with its `half` feature).
#![no_std]

use sam_core::Optimizer as _;
use sam_core::reference::SliceBuffer;
use sam_core::{BaseRule, Group, Perturbation, Sam, SamConfig, SgdConfig, StepStatus};

/// Runs `steps` SAM steps on L(w) = ½‖w − 1‖² in f32 and f64 and returns the final distance to
/// the minimum (f64 + f32 parts), or a negative number on error.
#[unsafe(no_mangle)]
pub extern "C" fn sam_nostd_run(steps: u32) -> f64 {
    run::<f32>(steps)
        .and_then(|a| run::<f64>(steps).map(|b| a + b))
        .unwrap_or(-1.0)
}

/// The same in bf16 storage: the final distance to the minimum, or a negative number on error.
#[unsafe(no_mangle)]
pub extern "C" fn sam_nostd_run_bf16(steps: u32) -> f64 {
    run::<half::bf16>(steps).unwrap_or(-1.0)
}

fn run<T: sam_core::backend::Real>(steps: u32) -> Option<f64> {
    let mut w = [T::from_f64(3.0); 8];
    let mut g = [T::from_f64(0.0); 8];
    let mut slots = [T::from_f64(0.0); 16];
    let base = BaseRule::sgd(SgdConfig {
        lr: 0.2,
        momentum: 0.5,
        ..Default::default()
    })
    .ok()?;
    let mut groups = [Group::new(
        SliceBuffer::new(&mut w, &mut g, &mut slots).ok()?,
        base,
    )];
    let mut sam = Sam::new(SamConfig::from(Perturbation::sam(0.01))).ok()?;
    for _ in 0..steps {
        let r = sam
            .step(&mut groups, |gs| {
                let (w, g) = gs[0].buffer.weights_and_grad();
                for (gi, wi) in g.iter_mut().zip(w) {
                    *gi = T::from_f64(wi.to_f64() - 1.0);
                }
                Ok::<_, sam_core::Error<_>>(())
            })
            .ok()?;
        if r.status != StepStatus::Applied {
            return None;
        }
    }
    Some(
        groups[0]
            .buffer
            .weights()
            .iter()
            .map(|x| libm_abs(x.to_f64() - 1.0))
            .sum(),
    )
}

fn libm_abs(x: f64) -> f64 {
    if x < 0.0 { -x } else { x }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
