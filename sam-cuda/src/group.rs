//! [`CudaGroup`]: one parameter group in device memory, and its host-side tensor table.

use std::ops::Range;

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DeviceRepr, ValidAsZeroBits};
use sam_core::backend::{
    AverageFold, BaseStep, GradMix, ParamBuffer, PerturbSpec, ReduceSpec, Reduction, Slot,
    SlotSpec, UpdateSpec, Weighting,
};

use crate::abi::{self, DeviceReduction};
use crate::context::{Context, Functions, Kernel};
use crate::error::CudaError;

mod sealed {
    pub trait Sealed {
        /// The index of this type's kernels in `Functions::typed` (the order of `TYPES`).
        const KERNELS: usize;
    }
    impl Sealed for f32 {
        const KERNELS: usize = 0;
    }
    impl Sealed for f64 {
        const KERNELS: usize = 1;
    }
    #[cfg(feature = "half")]
    impl Sealed for half::bf16 {
        const KERNELS: usize = 2;
    }
    #[cfg(feature = "half")]
    impl Sealed for half::f16 {
        const KERNELS: usize = 3;
    }
}

/// An element type the kernels are compiled for: `f32`, `f64`, and with the feature `half`
/// also `half::bf16` and `half::f16` (stored as their bit patterns, converted on the device as
/// sam-core converts them). Sealed.
pub trait CudaReal:
    sam_core::backend::Real + DeviceRepr + ValidAsZeroBits + sealed::Sealed
{
}

impl CudaReal for f32 {}
impl CudaReal for f64 {}
#[cfg(feature = "half")]
impl CudaReal for half::bf16 {}
#[cfg(feature = "half")]
impl CudaReal for half::f16 {}

impl Functions {
    fn reduce_for<T: CudaReal>(&self) -> &Kernel {
        &self.typed[T::KERNELS].reduce
    }
    fn perturb_for<T: CudaReal>(&self) -> &Kernel {
        &self.typed[T::KERNELS].perturb
    }
    fn update_for<T: CudaReal>(&self) -> &Kernel {
        &self.typed[T::KERNELS].update
    }
    fn fold_for<T: CudaReal>(&self) -> &Kernel {
        &self.typed[T::KERNELS].fold
    }
    fn swap_for<T: CudaReal>(&self) -> &Kernel {
        &self.typed[T::KERNELS].swap
    }
}

/// One tensor of a group: a view at `offset` of the group's flat allocations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// First element in the group's flat numbering (and in every per-role allocation).
    pub offset: usize,
    /// Number of elements (the product of `shape`; 1 for a scalar `[]`).
    pub len: usize,
    /// The shape, as given (row-major, contiguous).
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// The element range `offset..offset + len`.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The host-side table of a group's tensors: their shapes and offsets in the flat layout.
///
/// Tensors are packed back to back, in the order given, without padding: tensor `i` starts
/// where tensor `i − 1` ends. The group's element `j` (the numbering every pass and the
/// canonical reduction order use) is therefore the `j`-th element of the concatenation, exactly
/// as in a `sam_core::reference::SliceBuffer` over the same concatenated slice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TensorTable {
    tensors: Vec<TensorInfo>,
    len: usize,
}

impl TensorTable {
    /// The table for tensors of these shapes. `Err(TooLarge)` if an element count overflows.
    pub fn from_shapes<S: AsRef<[usize]>>(shapes: &[S]) -> Result<Self, CudaError> {
        let mut tensors = Vec::with_capacity(shapes.len());
        let mut offset = 0usize;
        for shape in shapes {
            let shape = shape.as_ref();
            let len = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or(CudaError::TooLarge)?;
            tensors.push(TensorInfo {
                offset,
                len,
                shape: shape.to_vec(),
            });
            offset = offset.checked_add(len).ok_or(CudaError::TooLarge)?;
        }
        Ok(TensorTable {
            tensors,
            len: offset,
        })
    }

    /// Total number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the group has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of tensors.
    pub fn count(&self) -> usize {
        self.tensors.len()
    }

    /// Tensor `index`, if it exists.
    pub fn get(&self, index: usize) -> Option<&TensorInfo> {
        self.tensors.get(index)
    }

    /// Tensor `index`, or [`CudaError::TensorIndex`].
    pub fn tensor(&self, index: usize) -> Result<&TensorInfo, CudaError> {
        self.tensors.get(index).ok_or(CudaError::TensorIndex {
            index,
            count: self.tensors.len(),
        })
    }

    /// All tensors, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, TensorInfo> {
        self.tensors.iter()
    }
}

/// A host tensor to create a group from: contiguous row-major data and its shape.
#[derive(Debug, Clone, Copy)]
pub struct HostTensor<'a, T> {
    /// The values, `shape.iter().product()` of them.
    pub data: &'a [T],
    /// The shape.
    pub shape: &'a [usize],
}

impl<'a, T> HostTensor<'a, T> {
    /// A tensor with this data and shape.
    pub fn new(data: &'a [T], shape: &'a [usize]) -> Self {
        HostTensor { data, shape }
    }
}

/// One parameter group in device memory: a [`ParamBuffer`] for the SAM optimizers of
/// `sam-core`.
///
/// # Layout
///
/// A group owns exactly three device allocations, whatever the number of tensors:
///
/// | allocation | length | contents |
/// |---|---|---|
/// | weights | `n` | every tensor's weights, back to back ([`TensorTable`]) |
/// | gradient | `n` | the gradients, same offsets |
/// | slots | `count · n` | the optimizer's slots, slot after slot in the order of [`SlotSpec::index`]; slot `k` of tensor `i` at `k·n + offset_i` |
///
/// Tensors are views at offsets of these allocations. This is what makes every pass **one
/// kernel launch per group**, regardless of the tensor count (a ResNet-50 has 161 parameter
/// tensors; a per-tensor launch would cost more than the memory traffic for the small ones),
/// and what lets a pass be one contiguous grid-stride loop. It is also the layout of
/// `sam_core::reference::SliceBuffer`, so element `j` means the same in both.
///
/// The weights and gradient allocations never move: their device pointers are valid for the
/// group's lifetime. The slot allocation is replaced when [`prepare`](ParamBuffer::prepare)
/// receives a different [`SlotSpec`] (values of the slots both specs have are kept).
///
/// All passes run on the context's stream ([`Context::stream`]).
#[derive(Debug)]
pub struct CudaGroup<T: CudaReal> {
    ctx: Context,
    table: TensorTable,
    // Allocations have at least one element (an empty group keeps valid pointers).
    w: CudaSlice<T>,
    g: CudaSlice<T>,
    slots: Option<CudaSlice<T>>,
    spec: Option<SlotSpec>,
    scratch: Option<CudaSlice<DeviceReduction>>,
}

fn slots_of(spec: &SlotSpec) -> impl Iterator<Item = Slot> + '_ {
    let backup = spec.backup.then_some(Slot::Backup);
    let stash = spec.stash.then_some(Slot::Stash);
    backup
        .into_iter()
        .chain(stash)
        .chain((0..spec.state).map(Slot::State))
        .chain((0..spec.averages).map(Slot::Average))
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<(), CudaError> {
    if expected == found {
        Ok(())
    } else {
        Err(CudaError::LengthMismatch {
            what,
            expected,
            found,
        })
    }
}

impl<T: CudaReal> CudaGroup<T> {
    /// A group with zero weights and gradient for tensors of these shapes.
    pub fn zeros<S: AsRef<[usize]>>(ctx: &Context, shapes: &[S]) -> Result<Self, CudaError> {
        let table = TensorTable::from_shapes(shapes)?;
        let n = table.len();
        n.checked_mul(std::mem::size_of::<T>())
            .ok_or(CudaError::TooLarge)?;
        let stream = ctx.stream();
        let w = stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| CudaError::driver("cuMemAlloc (weights)", e))?;
        let g = stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| CudaError::driver("cuMemAlloc (gradient)", e))?;
        Ok(CudaGroup {
            ctx: ctx.clone(),
            table,
            w,
            g,
            slots: None,
            spec: None,
            scratch: None,
        })
    }

    /// A group holding these tensors (copied to the device); the gradient starts at zero.
    /// `Err(LengthMismatch)` if a tensor's data length differs from its shape's element count.
    pub fn new(ctx: &Context, tensors: &[HostTensor<'_, T>]) -> Result<Self, CudaError> {
        for t in tensors {
            let len = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or(CudaError::TooLarge)?;
            check_len("tensor data vs. shape", len, t.data.len())?;
        }
        let shapes: Vec<&[usize]> = tensors.iter().map(|t| t.shape).collect();
        let mut group = Self::zeros(ctx, &shapes)?;
        for (i, t) in tensors.iter().enumerate() {
            group.upload_weights_tensor(i, t.data)?;
        }
        Ok(group)
    }

    /// A group of one-dimensional tensors with these values.
    pub fn from_slices(ctx: &Context, tensors: &[&[T]]) -> Result<Self, CudaError> {
        let shapes: Vec<[usize; 1]> = tensors.iter().map(|t| [t.len()]).collect();
        let host: Vec<HostTensor<'_, T>> = tensors
            .iter()
            .zip(&shapes)
            .map(|(t, s)| HostTensor::new(t, s.as_slice()))
            .collect();
        Self::new(ctx, &host)
    }

    /// The context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// The tensor table (shapes and offsets).
    pub fn tensors(&self) -> &TensorTable {
        &self.table
    }

    /// Number of parameter elements.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the group has no elements.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The slots prepared so far, if any.
    pub fn slot_spec(&self) -> Option<SlotSpec> {
        self.spec
    }

    fn n(&self) -> usize {
        self.table.len()
    }

    fn tensor_range(&self, index: usize) -> Result<Range<usize>, CudaError> {
        Ok(self.table.tensor(index)?.range())
    }

    fn slot_range(&self, slot: Slot) -> Result<Range<usize>, CudaError> {
        let n = self.n();
        let k = self
            .spec
            .and_then(|s| s.index(slot))
            .ok_or(CudaError::MissingSlot)?;
        if self.slots.is_none() {
            return Err(CudaError::MissingSlot);
        }
        Ok(k * n..(k + 1) * n)
    }

    fn upload(
        dst: &mut CudaSlice<T>,
        range: Range<usize>,
        host: &[T],
        ctx: &Context,
    ) -> Result<(), CudaError> {
        check_len("host data vs. device range", range.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let mut view = dst.try_slice_mut(range).ok_or(CudaError::TooLarge)?;
        ctx.stream()
            .memcpy_htod(host, &mut view)
            .map_err(|e| CudaError::driver("cuMemcpyHtoD", e))
    }

    fn download(
        src: &CudaSlice<T>,
        range: Range<usize>,
        ctx: &Context,
    ) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); range.len()];
        if !out.is_empty() {
            let view = src.try_slice(range).ok_or(CudaError::TooLarge)?;
            ctx.stream()
                .memcpy_dtoh(&view, &mut out)
                .map_err(|e| CudaError::driver("cuMemcpyDtoH", e))?;
        }
        ctx.synchronize()?;
        Ok(out)
    }

    /// Copies all weights from the host (`len()` values, tensors back to back).
    pub fn upload_weights(&mut self, host: &[T]) -> Result<(), CudaError> {
        let n = self.n();
        Self::upload(&mut self.w, 0..n, host, &self.ctx)
    }

    /// Copies the weights of tensor `index` from the host.
    pub fn upload_weights_tensor(&mut self, index: usize, host: &[T]) -> Result<(), CudaError> {
        let r = self.tensor_range(index)?;
        Self::upload(&mut self.w, r, host, &self.ctx)
    }

    /// Copies the whole gradient from the host (`len()` values, tensors back to back).
    pub fn upload_grad(&mut self, host: &[T]) -> Result<(), CudaError> {
        let n = self.n();
        Self::upload(&mut self.g, 0..n, host, &self.ctx)
    }

    /// Copies the gradient of tensor `index` from the host.
    pub fn upload_grad_tensor(&mut self, index: usize, host: &[T]) -> Result<(), CudaError> {
        let r = self.tensor_range(index)?;
        Self::upload(&mut self.g, r, host, &self.ctx)
    }

    /// Downloads all weights (waits for queued passes).
    pub fn download_weights(&self) -> Result<Vec<T>, CudaError> {
        Self::download(&self.w, 0..self.n(), &self.ctx)
    }

    /// Downloads the weights of tensor `index`.
    pub fn download_weights_tensor(&self, index: usize) -> Result<Vec<T>, CudaError> {
        Self::download(&self.w, self.tensor_range(index)?, &self.ctx)
    }

    /// Downloads the whole gradient.
    pub fn download_grad(&self) -> Result<Vec<T>, CudaError> {
        Self::download(&self.g, 0..self.n(), &self.ctx)
    }

    /// Downloads the gradient of tensor `index`.
    pub fn download_grad_tensor(&self, index: usize) -> Result<Vec<T>, CudaError> {
        Self::download(&self.g, self.tensor_range(index)?, &self.ctx)
    }

    /// Downloads one slot (all `len()` values); `Err(MissingSlot)` if it is not prepared.
    pub fn download_slot(&self, slot: Slot) -> Result<Vec<T>, CudaError> {
        let r = self.slot_range(slot)?;
        let slots = self.slots.as_ref().ok_or(CudaError::MissingSlot)?;
        Self::download(slots, r, &self.ctx)
    }

    /// Downloads one slot of tensor `index`.
    pub fn download_slot_tensor(&self, slot: Slot, index: usize) -> Result<Vec<T>, CudaError> {
        let r = self.slot_range(slot)?;
        let t = self.tensor_range(index)?;
        let slots = self.slots.as_ref().ok_or(CudaError::MissingSlot)?;
        Self::download(slots, r.start + t.start..r.start + t.end, &self.ctx)
    }

    /// Copies one slot from the host (to restore a checkpoint); `Err(MissingSlot)` if it is
    /// not prepared.
    pub fn upload_slot(&mut self, slot: Slot, host: &[T]) -> Result<(), CudaError> {
        let r = self.slot_range(slot)?;
        let slots = self.slots.as_mut().ok_or(CudaError::MissingSlot)?;
        Self::upload(slots, r, host, &self.ctx)
    }

    /// The weights as a cudarc view (for kernels of a framework; use [`Context::stream`]).
    pub fn weights(&self) -> CudaView<'_, T> {
        self.w.slice(0..self.n())
    }

    /// The weights as a mutable cudarc view.
    pub fn weights_mut(&mut self) -> CudaViewMut<'_, T> {
        let n = self.n();
        self.w.slice_mut(0..n)
    }

    /// The gradient as a cudarc view.
    pub fn grad(&self) -> CudaView<'_, T> {
        self.g.slice(0..self.n())
    }

    /// The gradient as a mutable cudarc view (a backward pass writes here).
    pub fn grad_mut(&mut self) -> CudaViewMut<'_, T> {
        let n = self.n();
        self.g.slice_mut(0..n)
    }

    /// The weights of tensor `index` as a view.
    pub fn tensor_weights(&self, index: usize) -> Result<CudaView<'_, T>, CudaError> {
        let r = self.tensor_range(index)?;
        self.w.try_slice(r).ok_or(CudaError::TooLarge)
    }

    /// The weights of tensor `index` as a mutable view.
    pub fn tensor_weights_mut(&mut self, index: usize) -> Result<CudaViewMut<'_, T>, CudaError> {
        let r = self.tensor_range(index)?;
        self.w.try_slice_mut(r).ok_or(CudaError::TooLarge)
    }

    /// The gradient of tensor `index` as a view.
    pub fn tensor_grad(&self, index: usize) -> Result<CudaView<'_, T>, CudaError> {
        let r = self.tensor_range(index)?;
        self.g.try_slice(r).ok_or(CudaError::TooLarge)
    }

    /// The gradient of tensor `index` as a mutable view.
    pub fn tensor_grad_mut(&mut self, index: usize) -> Result<CudaViewMut<'_, T>, CudaError> {
        let r = self.tensor_range(index)?;
        self.g.try_slice_mut(r).ok_or(CudaError::TooLarge)
    }

    /// One slot as a view; `Err(MissingSlot)` if it is not prepared.
    pub fn slot(&self, slot: Slot) -> Result<CudaView<'_, T>, CudaError> {
        let r = self.slot_range(slot)?;
        self.slots
            .as_ref()
            .and_then(|s| s.try_slice(r))
            .ok_or(CudaError::MissingSlot)
    }

    fn base_ptr(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(self.ctx.stream());
        p
    }

    fn offset_ptr(base: u64, elements: usize) -> u64 {
        // Cannot overflow: offsets are within an allocation whose byte size fits in usize.
        base + (elements * std::mem::size_of::<T>()) as u64
    }

    /// Device address of the weights (valid for the group's lifetime; use on
    /// [`Context::stream`] or synchronize first).
    pub fn weights_ptr(&self) -> u64 {
        self.base_ptr(&self.w)
    }

    /// Device address of the gradient (valid for the group's lifetime).
    pub fn grad_ptr(&self) -> u64 {
        self.base_ptr(&self.g)
    }

    /// Device address of the weights of tensor `index`.
    pub fn tensor_weights_ptr(&self, index: usize) -> Result<u64, CudaError> {
        let r = self.tensor_range(index)?;
        Ok(Self::offset_ptr(self.weights_ptr(), r.start))
    }

    /// Device address of the gradient of tensor `index`.
    pub fn tensor_grad_ptr(&self, index: usize) -> Result<u64, CudaError> {
        let r = self.tensor_range(index)?;
        Ok(Self::offset_ptr(self.grad_ptr(), r.start))
    }

    /// Device address of a slot (valid until `prepare` changes the slot spec).
    pub fn slot_ptr(&self, slot: Slot) -> Result<u64, CudaError> {
        let r = self.slot_range(slot)?;
        let slots = self.slots.as_ref().ok_or(CudaError::MissingSlot)?;
        Ok(Self::offset_ptr(self.base_ptr(slots), r.start))
    }

    fn optional_slot_ptr(&self, slot: Slot, needed: bool) -> Result<u64, CudaError> {
        if needed { self.slot_ptr(slot) } else { Ok(0) }
    }

    fn ensure_scratch(&mut self, needed: usize) -> Result<(), CudaError> {
        if self.scratch.as_ref().is_some_and(|s| s.len() >= needed) {
            return Ok(());
        }
        let s = self
            .ctx
            .stream()
            .alloc_zeros::<DeviceReduction>(needed)
            .map_err(|e| CudaError::driver("cuMemAlloc (reduce scratch)", e))?;
        self.scratch = Some(s);
        Ok(())
    }
}

/// Slot copies for checkpoints, through [`download_slot`](CudaGroup::download_slot) and
/// [`upload_slot`](CudaGroup::upload_slot) (a device-to-host or host-to-device copy each).
impl<T: CudaReal> sam_core::checkpoint::SlotAccess for CudaGroup<T> {
    fn prepared(&self) -> Option<SlotSpec> {
        self.slot_spec()
    }

    fn read_slot(&self, slot: Slot, out: &mut [T]) -> Result<(), CudaError> {
        check_len("slot copy vs. group length", self.n(), out.len())?;
        out.copy_from_slice(&self.download_slot(slot)?);
        Ok(())
    }

    fn write_slot(&mut self, slot: Slot, values: &[T]) -> Result<(), CudaError> {
        self.upload_slot(slot, values)
    }
}

impl<T: CudaReal> ParamBuffer for CudaGroup<T> {
    type Scalar = T;
    type Error = CudaError;

    fn len(&self) -> usize {
        self.table.len()
    }

    fn prepare(&mut self, spec: &SlotSpec) -> Result<(), CudaError> {
        if self.spec == Some(*spec) && self.slots.is_some() {
            return Ok(());
        }
        let n = self.n();
        let total = spec.count().checked_mul(n).ok_or(CudaError::TooLarge)?;
        total
            .checked_mul(std::mem::size_of::<T>())
            .ok_or(CudaError::TooLarge)?;
        let stream = self.ctx.stream().clone();
        let mut fresh = stream
            .alloc_zeros::<T>(total.max(1))
            .map_err(|e| CudaError::driver("cuMemAlloc (slots)", e))?;
        if let (Some(old_spec), Some(old)) = (self.spec, self.slots.as_ref()) {
            if n > 0 {
                for slot in slots_of(&old_spec) {
                    if let (Some(from), Some(to)) = (old_spec.index(slot), spec.index(slot)) {
                        let src = old
                            .try_slice(from * n..(from + 1) * n)
                            .ok_or(CudaError::TooLarge)?;
                        let mut dst = fresh
                            .try_slice_mut(to * n..(to + 1) * n)
                            .ok_or(CudaError::TooLarge)?;
                        stream
                            .memcpy_dtod(&src, &mut dst)
                            .map_err(|e| CudaError::driver("cuMemcpyDtoD (slots)", e))?;
                    }
                }
            }
        }
        self.slots = Some(fresh);
        self.spec = Some(*spec);
        Ok(())
    }

    fn reduce(&mut self, spec: &ReduceSpec) -> Result<Reduction, CudaError> {
        let stash = self.optional_slot_ptr(Slot::Stash, spec.reads_stash())?;
        let n = self.n();
        if n == 0 {
            return Ok(Reduction::ZERO);
        }
        let blocks = sam_core::backend::kernel::block_count(n);
        let passes = abi::combine_passes(blocks as u64).ok_or(CudaError::TooLarge)?;
        // Scratch: the `blocks` partials, then two node buffers for the passes of stage 2
        // (ping-pong), each as large as the first pass's output.
        let cap = usize::try_from(passes[0].grid).map_err(|_| CudaError::TooLarge)?;
        self.ensure_scratch(blocks + 2 * cap)?;
        let scratch = self.scratch.as_ref().ok_or(CudaError::TooLarge)?;
        let scratch_ptr = {
            let (p, _sync) = scratch.device_ptr(self.ctx.stream());
            p
        };
        let entry = std::mem::size_of::<DeviceReduction>() as u64;
        let node_buffers = [blocks as u64, (blocks + cap) as u64];
        let (mut flags, mut eta) = (0u32, 0.0f64);
        match spec.perturb {
            Some(Weighting::Plain) => flags |= abi::RED_PERTURB,
            Some(Weighting::Adaptive { eta: e }) => {
                flags |= abi::RED_PERTURB | abi::RED_ADAPTIVE;
                eta = e;
            }
            None => {}
        }
        if spec.grad {
            flags |= abi::RED_GRAD;
        }
        if spec.stash {
            flags |= abi::RED_STASH;
        }
        if spec.dot {
            flags |= abi::RED_DOT;
        }
        let args = abi::ReduceArgs {
            w: self.weights_ptr(),
            g: self.grad_ptr(),
            stash,
            partials: scratch_ptr,
            n: n as u64,
            blocks: blocks as u64,
            scale_perturb: spec.scale_perturb,
            scale_grad: spec.scale_grad,
            scale_stash: spec.scale_stash,
            eta,
            unscale: spec.unscale,
            flags,
            pad_: 0,
        };
        let pairs = blocks.saturating_mul(abi::LANES);
        let grid = u32::try_from(pairs.div_ceil(abi::BLOCK_THREADS as usize))
            .unwrap_or(u32::MAX)
            .min(1 << 20);
        let f = self.ctx.functions();
        // SAFETY: `sam_reduce_blocks_*` takes one `SamReduceArgs` (mirrored by `ReduceArgs`);
        // `w`, `g` (and `stash` when read) address `n` live elements of this group, `partials`
        // the scratch, which has room for `blocks` results; the block size is a multiple of 8,
        // as the kernel requires. All stay alive until the synchronization below.
        unsafe {
            self.ctx
                .launch(&f.reduce_for::<T>().f, grid, abi::BLOCK_THREADS, &args)?
        };
        let mut src = 0u64;
        let mut result_at = 0u64;
        for (i, pass) in passes.iter().enumerate() {
            let out = node_buffers[i % 2];
            let combine = abi::CombineArgs {
                partials: scratch_ptr,
                src,
                out: scratch_ptr + out * entry,
                count: blocks as u64,
                depth: pass.depth,
                leaf: u32::from(i == 0),
            };
            let grid = u32::try_from(pass.grid).map_err(|_| CudaError::TooLarge)?;
            // SAFETY: `sam_reduce_combine` takes one `SamCombineArgs`; the first pass reads the
            // `blocks` partials written by the launch before (same stream), later passes the
            // `2^depth` nodes the previous pass wrote to `src`; `out` has room for `grid` nodes
            // (`grid <= cap`); blocks of `2^levels <= COMBINE_THREADS` threads, as compiled.
            unsafe {
                self.ctx
                    .launch(&f.combine.f, grid, 1 << pass.levels, &combine)?
            };
            src = scratch_ptr + out * entry;
            result_at = out;
        }
        let mut host = [DeviceReduction::default()];
        let at = result_at as usize;
        let out = scratch.try_slice(at..at + 1).ok_or(CudaError::TooLarge)?;
        self.ctx
            .stream()
            .memcpy_dtoh(&out, &mut host)
            .map_err(|e| CudaError::driver("cuMemcpyDtoH (reduce)", e))?;
        self.ctx.synchronize()?;
        Ok(host[0].to_core())
    }

    fn perturb(&mut self, spec: &PerturbSpec) -> Result<(), CudaError> {
        let backup = self.slot_ptr(Slot::Backup)?;
        let stash = self.optional_slot_ptr(Slot::Stash, spec.stash)?;
        let n = self.n();
        if n == 0 {
            return Ok(());
        }
        let (mut flags, mut eta) = (0u32, 0.0f64);
        if spec.stash {
            flags |= abi::PERTURB_STASH;
        }
        if let Weighting::Adaptive { eta: e } = spec.weighting {
            flags |= abi::PERTURB_ADAPTIVE;
            eta = e;
        }
        let args = abi::PerturbArgs {
            w: self.weights_ptr(),
            g: self.grad_ptr(),
            backup,
            stash,
            n: n as u64,
            scale: spec.scale,
            coeff: spec.coeff,
            eta,
            unscale: spec.unscale,
            flags,
            pad_: 0,
        };
        // SAFETY: `sam_perturb_*` takes one `SamPerturbArgs`; every pointer addresses `n` live
        // elements of this group (the slots were checked above); frees are stream-ordered.
        unsafe {
            self.ctx
                .launch_elementwise(self.ctx.functions().perturb_for::<T>(), n, &args)
        }
    }

    fn restore(&mut self) -> Result<(), CudaError> {
        let r = self.slot_range(Slot::Backup)?;
        let n = self.n();
        if n == 0 {
            return Ok(());
        }
        let slots = self.slots.as_ref().ok_or(CudaError::MissingSlot)?;
        let src = slots.try_slice(r).ok_or(CudaError::MissingSlot)?;
        let mut dst = self.w.try_slice_mut(0..n).ok_or(CudaError::TooLarge)?;
        self.ctx
            .stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| CudaError::driver("cuMemcpyDtoD (restore)", e))
    }

    fn update(&mut self, spec: &UpdateSpec) -> Result<(), CudaError> {
        let backup = self.optional_slot_ptr(Slot::Backup, spec.restore)?;
        let reads_stash = spec.reads_stash();
        let stash = self.optional_slot_ptr(Slot::Stash, reads_stash)?;
        let n_state = spec.base.state_slots();
        let mut state = [0u64; 3];
        for (k, p) in state.iter_mut().enumerate().take(n_state) {
            *p = self.slot_ptr(Slot::State(k as u8))?;
        }
        let mut avg = [0u64; 4];
        let mut avg_weight = [0.0f64; 4];
        let mut avg_mask = 0u32;
        for (k, w) in spec.average.weights.iter().enumerate().take(abi::AVERAGES) {
            if let Some(w) = w {
                avg[k] = self.slot_ptr(Slot::Average(k as u8))?;
                avg_weight[k] = *w;
                avg_mask |= 1 << k;
            }
        }
        let n = self.n();
        if n == 0 {
            return Ok(());
        }
        let mut flags = 0u32;
        if spec.restore {
            flags |= abi::UPDATE_RESTORE;
        }
        if reads_stash {
            flags |= abi::UPDATE_READ_STASH;
        }
        let (mix_a, mix_b) = match spec.grad {
            GradMix::Current => (1.0, 0.0),
            GradMix::Mix { a, b } => {
                flags |= abi::UPDATE_MIX;
                (a, b)
            }
        };
        let (post_a, post_b) = match spec.post {
            Some(p) => {
                flags |= abi::UPDATE_POST;
                (p.a, p.b)
            }
            None => (0.0, 0.0),
        };
        let (restash_a, restash_b) = match spec.restash {
            Some(m) => {
                flags |= abi::UPDATE_RESTASH;
                (m.a, m.b)
            }
            None => (0.0, 0.0),
        };
        let mut args = abi::UpdateArgs {
            w: self.weights_ptr(),
            g: self.grad_ptr(),
            backup,
            stash,
            state,
            avg,
            n: n as u64,
            mix_a,
            mix_b,
            post_a,
            post_b,
            restash_a,
            restash_b,
            unscale: spec.unscale,
            avg_weight,
            flags,
            n_state: n_state as u32,
            avg_mask,
            ..Default::default()
        };
        match &spec.base {
            BaseStep::External => args.base = abi::BASE_EXTERNAL,
            BaseStep::Sgd(k) => {
                args.base = abi::BASE_SGD;
                args.sgd = abi::SgdScalars {
                    neg_lr: k.neg_lr,
                    weight_decay: k.weight_decay,
                    momentum: k.momentum,
                    one_minus_dampening: k.one_minus_dampening,
                    nesterov: u32::from(k.nesterov),
                    first: u32::from(k.first),
                };
            }
            BaseStep::Adam(k) => {
                args.base = abi::BASE_ADAM;
                args.adam = abi::AdamScalars {
                    decay: k.decay,
                    l2: k.l2,
                    one_minus_beta1: k.one_minus_beta1,
                    beta2: k.beta2,
                    one_minus_beta2: k.one_minus_beta2,
                    bc2_sqrt: k.bc2_sqrt,
                    neg_step_size: k.neg_step_size,
                    eps: k.eps,
                    amsgrad: u32::from(k.amsgrad),
                    pad_: 0,
                };
            }
        }
        // SAFETY: `sam_update_*` takes one `SamUpdateArgs`; every non-zero pointer addresses `n`
        // live elements of this group (each slot the flags make the kernel touch was checked
        // above); frees are stream-ordered.
        unsafe {
            self.ctx
                .launch_elementwise(self.ctx.functions().update_for::<T>(), n, &args)
        }
    }

    fn fold_averages(&mut self, fold: &AverageFold) -> Result<(), CudaError> {
        let mut args = abi::FoldArgs {
            w: self.weights_ptr(),
            n: self.n() as u64,
            ..Default::default()
        };
        for (k, w) in fold.weights.iter().enumerate().take(abi::AVERAGES) {
            if let Some(w) = w {
                args.avg[k] = self.slot_ptr(Slot::Average(k as u8))?;
                args.weight[k] = *w;
                args.mask |= 1 << k;
            }
        }
        let n = self.n();
        if n == 0 || args.mask == 0 {
            return Ok(());
        }
        // SAFETY: `sam_fold_*` takes one `SamFoldArgs`; `w` and each average in `mask` address
        // `n` live elements of this group (checked above).
        unsafe {
            self.ctx
                .launch_elementwise(self.ctx.functions().fold_for::<T>(), n, &args)
        }
    }

    fn swap_average(&mut self, k: u8) -> Result<(), CudaError> {
        let avg = self.slot_ptr(Slot::Average(k))?;
        let n = self.n();
        if n == 0 {
            return Ok(());
        }
        let args = abi::SwapArgs {
            a: self.weights_ptr(),
            b: avg,
            n: n as u64,
        };
        // SAFETY: `sam_swap_u32`/`u64` takes one `SamSwapArgs`, and moves elements of the size
        // of `T` (f32 ↔ u32, f64 ↔ u64); both pointers address `n` live, disjoint elements.
        unsafe {
            self.ctx
                .launch_elementwise(self.ctx.functions().swap_for::<T>(), n, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_offsets_are_packed_in_order() {
        let t =
            TensorTable::from_shapes(&[vec![2, 3], vec![], vec![4], vec![0, 5], vec![1]]).unwrap();
        assert_eq!(t.count(), 5);
        assert_eq!(t.len(), 12);
        let offs: Vec<_> = t.iter().map(|x| (x.offset, x.len)).collect();
        assert_eq!(offs, [(0, 6), (6, 1), (7, 4), (11, 0), (11, 1)]);
        assert_eq!(t.tensor(2).unwrap().range(), 7..11);
        assert_eq!(
            t.tensor(5),
            Err(CudaError::TensorIndex { index: 5, count: 5 })
        );
        assert_eq!(t.get(1).unwrap().shape, Vec::<usize>::new());
    }

    #[test]
    fn table_rejects_overflow() {
        assert_eq!(
            TensorTable::from_shapes(&[vec![usize::MAX, 2]]),
            Err(CudaError::TooLarge)
        );
        assert_eq!(
            TensorTable::from_shapes(&[vec![usize::MAX], vec![1]]),
            Err(CudaError::TooLarge)
        );
        let empty: [Vec<usize>; 0] = [];
        let t = TensorTable::from_shapes(&empty).unwrap();
        assert!(t.is_empty() && t.count() == 0);
    }

    #[test]
    fn slot_roles_follow_spec_order() {
        let spec = SlotSpec {
            backup: true,
            stash: true,
            state: 2,
            averages: 2,
        };
        let roles: Vec<_> = slots_of(&spec).collect();
        assert_eq!(roles.len(), spec.count());
        for (i, r) in roles.iter().enumerate() {
            assert_eq!(spec.index(*r), Some(i));
        }
        assert_eq!(slots_of(&SlotSpec::default()).count(), 0);
    }
}
