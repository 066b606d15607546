//! [`Context`]: one GPU, its stream, and the compiled kernel module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUresult};
use cudarc::driver::{
    CudaContext as RawContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use crate::abi;
use crate::error::{CudaError, Library};
use crate::kernels;

/// A loaded kernel and the number of its blocks of `BLOCK_THREADS` threads the whole device
/// holds at once (SMs × resident blocks per SM): the grid of its grid-stride loop.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub f: CudaFunction,
    pub resident_blocks: u32,
}

/// The kernels of one storage type.
#[derive(Debug)]
pub(crate) struct TypedKernels {
    pub reduce: Kernel,
    pub perturb: Kernel,
    pub update: Kernel,
    pub fold: Kernel,
    /// The swap of values of this size (`sam_swap_u16/u32/u64`).
    pub swap: Kernel,
}

/// The kernels of the module, loaded once per context.
#[derive(Debug)]
pub(crate) struct Functions {
    pub combine: Kernel,
    /// Per storage type, in the order of [`TYPES`] (`CudaReal`'s index).
    pub typed: [TypedKernels; 4],
}

/// The storage types' kernel suffixes and swap kernels, in `Functions::typed` order.
const TYPES: [(&str, &str); 4] = [
    ("f32", "sam_swap_u32"),
    ("f64", "sam_swap_u64"),
    ("bf16", "sam_swap_u16"),
    ("f16", "sam_swap_u16"),
];

#[derive(Debug)]
struct Inner {
    ctx: Arc<RawContext>,
    stream: Arc<CudaStream>,
    _module: Arc<CudaModule>,
    functions: Functions,
    sm_count: u32,
    compute_capability: (i32, i32),
    arch: Option<i32>,
}

/// A handle to one GPU with the SAM kernels compiled and loaded: the `CudaContext` of this
/// crate. Cheap to clone (reference counted); every [`CudaGroup`](crate::CudaGroup) keeps one.
///
/// [`Context::new`] compiles the kernels with NVRTC (once per process and architecture; the PTX
/// is cached) and loads the module into the device's primary context (once per `Context`).
/// All passes of all groups of a context run in order on one stream, [`Context::stream`] (the
/// device's default stream); passes are asynchronous except
/// [`reduce`](sam_core::backend::ParamBuffer::reduce), which returns host values, and the downloads.
#[derive(Debug, Clone)]
pub struct Context {
    inner: Arc<Inner>,
}

fn driver_error(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::driver(what, e)
}

fn ptx_cache() -> &'static Mutex<HashMap<Option<i32>, String>> {
    static CACHE: OnceLock<Mutex<HashMap<Option<i32>, String>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn cached_ptx(arch: Option<i32>) -> Result<String, CudaError> {
    if let Ok(cache) = ptx_cache().lock() {
        if let Some(p) = cache.get(&arch) {
            return Ok(p.clone());
        }
    }
    let compiled = kernels::compile_module(arch)?;
    if let Ok(mut cache) = ptx_cache().lock() {
        cache.insert(arch, compiled.ptx.clone());
    }
    Ok(compiled.ptx)
}

impl Context {
    /// Number of CUDA devices. `Err(LibraryMissing)` without a driver; `Ok(0)` when the driver
    /// reports no device.
    pub fn device_count() -> Result<usize, CudaError> {
        if !kernels::driver_available() {
            return Err(CudaError::LibraryMissing {
                library: Library::Driver,
            });
        }
        match RawContext::device_count() {
            Ok(n) => Ok(usize::try_from(n).unwrap_or(0)),
            Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
            Err(e) => Err(CudaError::driver("cuInit/cuDeviceGetCount", e)),
        }
    }

    /// Whether a context could be created on some device: the driver and NVRTC libraries load
    /// and at least one device exists. Never panics.
    pub fn is_available() -> bool {
        kernels::nvrtc_available() && matches!(Self::device_count(), Ok(n) if n > 0)
    }

    /// Opens device `ordinal`, compiles (or takes from the cache) the kernels and loads them.
    ///
    /// Errors, in the order checked: [`CudaError::LibraryMissing`] (`Driver`) when libcuda
    /// cannot be loaded, [`CudaError::NoDevice`] when the driver reports no device with this
    /// ordinal, `LibraryMissing` (`Nvrtc`) when libnvrtc cannot be loaded,
    /// [`CudaError::Compile`] and [`CudaError::Driver`].
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let count = Self::device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        if !kernels::nvrtc_available() {
            return Err(CudaError::LibraryMissing {
                library: Library::Nvrtc,
            });
        }
        let ctx = RawContext::new(ordinal).map_err(driver_error("cuDevicePrimaryCtxRetain"))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(driver_error("cuDeviceGetAttribute"))?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_error("cuDeviceGetAttribute"))?;
        let arch = kernels::arch_for_device(compute_capability.0 * 10 + compute_capability.1);
        let ptx = cached_ptx(arch)?;
        if ptx.contains('\0') {
            return Err(CudaError::Compile("the PTX contains a NUL byte".into()));
        }
        let module = ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(driver_error("cuModuleLoadData"))?;
        let sms = u32::try_from(sm_count).unwrap_or(1).max(1);
        let load = |name: &str| -> Result<Kernel, CudaError> {
            let f = module
                .load_function(name)
                .map_err(driver_error("cuModuleGetFunction"))?;
            // Occupancy of the elementwise block size; 4 blocks per SM if the query fails.
            let per_sm = f
                .occupancy_max_active_blocks_per_multiprocessor(abi::BLOCK_THREADS, 0, None)
                .unwrap_or(4)
                .max(1);
            Ok(Kernel {
                f,
                resident_blocks: sms.saturating_mul(per_sm),
            })
        };
        let typed = |t: &str, swap: &str| -> Result<TypedKernels, CudaError> {
            Ok(TypedKernels {
                reduce: load(&format!("sam_reduce_blocks_{t}"))?,
                perturb: load(&format!("sam_perturb_{t}"))?,
                update: load(&format!("sam_update_{t}"))?,
                fold: load(&format!("sam_fold_{t}"))?,
                swap: load(swap)?,
            })
        };
        let [a, b, c, d] = TYPES.map(|(t, swap)| typed(t, swap));
        let functions = Functions {
            combine: load("sam_reduce_combine")?,
            typed: [a?, b?, c?, d?],
        };
        let stream = ctx.default_stream();
        Ok(Context {
            inner: Arc::new(Inner {
                ctx,
                stream,
                _module: module,
                functions,
                sm_count: sms,
                compute_capability,
                arch,
            }),
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ctx.ordinal()
    }

    /// The device's name.
    pub fn name(&self) -> Result<String, CudaError> {
        self.inner
            .ctx
            .name()
            .map_err(driver_error("cuDeviceGetName"))
    }

    /// The device's compute capability `(major, minor)`.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.compute_capability
    }

    /// The virtual architecture the kernels were compiled for (`compute_XY` as `XY`), or `None`
    /// for NVRTC's default.
    pub fn nvrtc_arch(&self) -> Option<i32> {
        self.inner.arch
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.inner
            .ctx
            .mem_get_info()
            .map_err(driver_error("cuMemGetInfo"))
    }

    /// Waits until every pass queued on [`stream`](Self::stream) has finished, and reports an
    /// error of any of them.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.inner
            .stream
            .synchronize()
            .map_err(driver_error("cuStreamSynchronize"))
    }

    /// The stream every pass runs on. A framework that writes gradients on another stream must
    /// order it with this one (or synchronize) before a pass reads them.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The underlying cudarc context.
    pub fn cuda_context(&self) -> &Arc<RawContext> {
        &self.inner.ctx
    }

    pub(crate) fn functions(&self) -> &Functions {
        &self.inner.functions
    }

    /// Launches an elementwise kernel over `n` elements: one block of `BLOCK_THREADS` per 256
    /// elements, at most as many blocks as the device holds at once (the grid-stride loop
    /// covers the rest).
    ///
    /// # Safety
    ///
    /// As [`launch`](Self::launch).
    pub(crate) unsafe fn launch_elementwise<A: DeviceRepr>(
        &self,
        k: &Kernel,
        n: usize,
        args: &A,
    ) -> Result<(), CudaError> {
        let needed = n.div_ceil(abi::BLOCK_THREADS as usize).max(1);
        let grid = u32::try_from(needed.min(k.resident_blocks.max(1) as usize)).unwrap_or(u32::MAX);
        // SAFETY: forwarded to the caller.
        unsafe { self.launch(&k.f, grid, abi::BLOCK_THREADS, args) }
    }

    /// Launches `f` with one by-value argument struct.
    ///
    /// # Safety
    ///
    /// `f` must be a kernel of this module whose only parameter is the C struct mirrored by
    /// `A`, and every device pointer in `args` must address live memory of this context large
    /// enough for the `n` elements the kernel touches, not freed before the kernel ends (frees
    /// of `CudaSlice`s are ordered on the same stream).
    pub(crate) unsafe fn launch<A: DeviceRepr>(
        &self,
        f: &CudaFunction,
        grid: u32,
        block: u32,
        args: &A,
    ) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (grid.max(1), 1, 1),
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.inner.stream.launch_builder(f);
        b.arg(args);
        // SAFETY: the caller guarantees the signature and the memory (see above); `args`
        // outlives the call, during which the driver copies the parameter bytes.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(driver_error("cuLaunchKernel"))
    }
}
