//! The kernel sources and their compilation to PTX with NVRTC.
//!
//! The sources live in `kernels/*.cu` and are embedded with `include_str!`; nothing is compiled
//! at build time (no `nvcc`). [`compile_module`] concatenates them into one program and compiles
//! it with [`compile_options`]; [`Context::new`](crate::Context::new) does this once per
//! context. NVRTC needs no GPU, so [`compile_module`] and [`check_layout`] also work on a
//! CPU-only machine that has `libnvrtc` (for example from the `nvidia-cuda-nvrtc-cu12` wheel).
//!
//! Every function here first checks that the library can be loaded and returns
//! [`CudaError::LibraryMissing`] otherwise (cudarc itself would panic).

use std::ffi::{CString, c_char};
use std::sync::OnceLock;

use cudarc::nvrtc::result as nvrtc;

use crate::abi;
use crate::error::{CudaError, Library};

/// Definitions shared by all kernels: ABI structs and element functions.
pub const COMMON: &str = include_str!("../../kernels/sam_common.cuh");
/// The two-stage reduce pass.
pub const REDUCE: &str = include_str!("../../kernels/reduce.cu");
/// The elementwise passes.
pub const PASSES: &str = include_str!("../../kernels/passes.cu");
/// Static layout assertions against the Rust ABI structs (not part of the module).
pub const LAYOUT_CHECK: &str = include_str!("../../kernels/layout_check.cu");

/// Every source file, by name.
pub const SOURCES: [(&str, &str); 4] = [
    ("sam_common.cuh", COMMON),
    ("reduce.cu", REDUCE),
    ("passes.cu", PASSES),
    ("layout_check.cu", LAYOUT_CHECK),
];

/// The entry points of the module built by [`module_source`].
pub const KERNEL_NAMES: [&str; 20] = [
    "sam_reduce_blocks_f32",
    "sam_reduce_blocks_f64",
    "sam_reduce_blocks_bf16",
    "sam_reduce_blocks_f16",
    "sam_reduce_combine",
    "sam_perturb_f32",
    "sam_perturb_f64",
    "sam_perturb_bf16",
    "sam_perturb_f16",
    "sam_update_f32",
    "sam_update_f64",
    "sam_update_bf16",
    "sam_update_f16",
    "sam_fold_f32",
    "sam_fold_f64",
    "sam_fold_bf16",
    "sam_fold_f16",
    "sam_swap_u16",
    "sam_swap_u32",
    "sam_swap_u64",
];

/// Whether `libnvrtc` can be loaded (cached after the first call).
pub fn nvrtc_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the NVRTC library by its usual names and
    // closes it again; loading NVIDIA's library runs no code of ours and has no other effect.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
}

/// Whether the CUDA driver library can be loaded (cached after the first call). This says
/// nothing about devices: see [`Context::device_count`](crate::Context::device_count).
pub fn driver_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `nvrtc_available`, for libcuda.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

fn require_nvrtc() -> Result<(), CudaError> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(CudaError::LibraryMissing {
            library: Library::Nvrtc,
        })
    }
}

/// The version of the loaded NVRTC, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    require_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); the two pointers are valid for writes.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    r.result()
        .map_err(|e| CudaError::Compile(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// The virtual architectures this NVRTC can compile for, as compute capabilities
/// (`[75, 80, 86, …]`).
pub fn supported_archs() -> Result<Vec<i32>, CudaError> {
    require_nvrtc()?;
    let mut count = 0;
    // SAFETY: the library is present; `count` is valid for writes.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut count) };
    r.result()
        .map_err(|e| CudaError::Compile(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
    let mut archs = vec![0; usize::try_from(count).unwrap_or(0)];
    if !archs.is_empty() {
        // SAFETY: `archs` has room for the `count` values NVRTC reported.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
        r.result()
            .map_err(|e| CudaError::Compile(format!("nvrtcGetSupportedArchs: {e:?}")))?;
    }
    Ok(archs)
}

/// The source of the kernel module: `sam_common.cuh`, `reduce.cu` and `passes.cu`, each
/// preceded by a `#line` directive so that compiler messages name the right file and line.
pub fn module_source() -> String {
    let mut s = String::with_capacity(COMMON.len() + REDUCE.len() + PASSES.len() + 128);
    for (name, src) in [
        ("sam_common.cuh", COMMON),
        ("reduce.cu", REDUCE),
        ("passes.cu", PASSES),
    ] {
        s.push_str(&format!("#line 1 \"{name}\"\n"));
        s.push_str(src);
        s.push('\n');
    }
    s
}

/// The NVRTC options of the module, for virtual architecture `compute_{arch}` (`None`: NVRTC's
/// default).
///
/// - `--fmad=false`: no contraction of `a*b + c` into a fused multiply-add. NVRTC contracts by
///   default; Rust does not, and sam-core's element functions round the product and the sum
///   separately. With contraction off, the kernels' f64 arithmetic is the same sequence of
///   correctly rounded operations as the Rust code, so elementwise results are bit-identical.
/// - `--ftz=false`, `--prec-div=true`, `--prec-sqrt=true`: IEEE single precision (only the
///   `f64 → f32` store rounding is single precision here; these keep subnormals intact).
/// - `-D…`: the constants and flags of [`abi::defines`].
pub fn compile_options(arch: Option<i32>) -> Vec<String> {
    let mut o: Vec<String> = [
        "--fmad=false",
        "--ftz=false",
        "--prec-div=true",
        "--prec-sqrt=true",
        "--std=c++17",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(a) = arch {
        o.push(format!("--gpu-architecture=compute_{a}"));
    }
    o.extend(abi::defines());
    o
}

/// The output of one NVRTC compilation.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The PTX text.
    pub ptx: String,
    /// NVRTC's log (warnings; empty for a clean compile).
    pub log: String,
}

impl Compiled {
    /// Whether the log reports any warning (or anything at all).
    pub fn has_diagnostics(&self) -> bool {
        !self.log.trim().is_empty()
    }
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one CUDA source with NVRTC and returns the PTX and the log. Errors carry the log.
pub fn compile(source: &str, name: &str, options: &[String]) -> Result<Compiled, CudaError> {
    require_nvrtc()?;
    let src = CString::new(source)
        .map_err(|_| CudaError::Compile("the source contains a NUL byte".into()))?;
    let cname = CString::new(name)
        .map_err(|_| CudaError::Compile("the program name contains a NUL byte".into()))?;
    if options.iter().any(|o| o.contains('\0')) {
        return Err(CudaError::Compile("an option contains a NUL byte".into()));
    }
    let prog = nvrtc::create_program(&src, Some(&cname))
        .map_err(|e| CudaError::Compile(format!("nvrtcCreateProgram: {e:?}")))?;
    // SAFETY: `prog` was created above from `src`/`cname`, which outlive it, and is destroyed
    // exactly once, below; no option contains a NUL byte (checked), so `compile_program`
    // cannot panic.
    let status = unsafe { nvrtc::compile_program(prog, options) };
    // SAFETY: as above (the log exists after a compile attempt, successful or not).
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|v| c_chars_to_string(&v))
        .unwrap_or_default();
    let ptx = match status {
        // SAFETY: as above; the program compiled.
        Ok(()) => unsafe { nvrtc::get_ptx(prog) }
            .map(|v| c_chars_to_string(&v))
            .map_err(|e| CudaError::Compile(format!("nvrtcGetPTX: {e:?}"))),
        Err(e) => Err(CudaError::Compile(format!("{name}: {e:?}\n{log}"))),
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    Ok(Compiled { ptx: ptx?, log })
}

/// Compiles the kernel module (see [`module_source`] and [`compile_options`]).
pub fn compile_module(arch: Option<i32>) -> Result<Compiled, CudaError> {
    compile(&module_source(), "sam_kernels.cu", &compile_options(arch))
}

/// Compiles `layout_check.cu` after `sam_common.cuh` with the Rust layouts as `-D` values:
/// succeeds only if every ABI struct has the same size, alignment and field offsets in C as in
/// Rust ([`abi::layouts`]).
pub fn check_layout() -> Result<Compiled, CudaError> {
    let src = format!(
        "#line 1 \"sam_common.cuh\"\n{COMMON}\n#line 1 \"layout_check.cu\"\n{LAYOUT_CHECK}\n"
    );
    let mut opts = compile_options(None);
    opts.extend(abi::layout_defines());
    compile(&src, "layout_check.cu", &opts)
}

/// The virtual architecture to compile for on a device of compute capability `cc`
/// (`major·10 + minor`): the largest one NVRTC supports that is not newer than the device, or
/// `None` (NVRTC's default) if that cannot be determined.
pub fn arch_for_device(cc: i32) -> Option<i32> {
    let archs = supported_archs().ok()?;
    archs.into_iter().filter(|&a| a <= cc).max()
}
