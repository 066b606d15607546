//! The candle backend `sam-candle` (feature `candle`, on by default): each param of a group is
//! its own 1-D CPU `Var`, and every gradient reaches the buffer through a `GradStore`, as in
//! candle training code.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use sam_candle::VarBuffer;
use sam_core::backend::Slot;

use crate::backend::{Element, ReplayBackend};

/// `sam-candle` over CPU `Var`s.
#[derive(Debug, Clone, Copy, Default)]
pub struct CandleBackend;

fn values<T: Element>(v: &Var) -> Result<Vec<T>, String> {
    v.as_tensor().to_vec1::<T>().map_err(|e| e.to_string())
}

impl ReplayBackend for CandleBackend {
    type Buf<T: Element> = VarBuffer<T>;

    fn name(&self) -> &'static str {
        "candle"
    }

    fn make<T: Element>(&self, init: Vec<T>, lens: &[usize]) -> Result<VarBuffer<T>, String> {
        let mut vars = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &l in lens {
            let part = init
                .get(at..at + l)
                .ok_or("tensor lengths exceed the group")?
                .to_vec();
            let t = Tensor::from_vec(part, l, &Device::Cpu).map_err(|e| e.to_string())?;
            vars.push(Var::from_tensor(&t).map_err(|e| e.to_string())?);
            at += l;
        }
        VarBuffer::new(vars).map_err(|e| e.to_string())
    }

    fn read_weights<T: Element>(&self, buf: &VarBuffer<T>, out: &mut [T]) -> Result<(), String> {
        let mut at = 0;
        for v in buf.vars() {
            let w = values::<T>(v)?;
            out.get_mut(at..at + w.len())
                .ok_or("output too short")?
                .copy_from_slice(&w);
            at += w.len();
        }
        Ok(())
    }

    fn write_grad<T: Element>(&self, buf: &mut VarBuffer<T>, grad: &[T]) -> Result<(), String> {
        let mut store = GradStore::default();
        let mut at = 0;
        for v in buf.vars() {
            let n = v.elem_count();
            let part = grad.get(at..at + n).ok_or("gradient too short")?.to_vec();
            let g = Tensor::from_vec(part, n, &Device::Cpu).map_err(|e| e.to_string())?;
            store.insert(v.as_tensor(), g);
            at += n;
        }
        buf.load_grads(&store).map_err(|e| e.to_string())
    }

    fn read_average<T: Element>(
        &self,
        buf: &VarBuffer<T>,
        k: u8,
        out: &mut [T],
    ) -> Result<(), String> {
        let mut at = 0;
        for i in 0..buf.vars().len() {
            let avg = buf
                .slot(i, Slot::Average(k))
                .ok_or_else(|| format!("average {k} was never allocated"))?;
            out.get_mut(at..at + avg.len())
                .ok_or("output too short")?
                .copy_from_slice(avg);
            at += avg.len();
        }
        Ok(())
    }
}
