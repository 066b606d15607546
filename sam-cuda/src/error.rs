//! The backend's error type.

use std::fmt;

/// A CUDA library that `sam-cuda` loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Library {
    /// The CUDA driver (`libcuda.so.1`, installed with the NVIDIA driver).
    Driver,
    /// The runtime compiler (`libnvrtc.so.12` or `.13`, from a CUDA toolkit or the
    /// `nvidia-cuda-nvrtc` wheels).
    Nvrtc,
}

impl fmt::Display for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Library::Driver => "the CUDA driver library (libcuda)",
            Library::Nvrtc => "the NVRTC library (libnvrtc)",
        })
    }
}

/// Everything that can go wrong in `sam-cuda`. No function of the crate panics on these
/// conditions: they are returned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CudaError {
    /// A CUDA library could not be loaded (no driver installed, or `libnvrtc` not on the
    /// library path; see the crate docs for `LD_LIBRARY_PATH`).
    LibraryMissing {
        /// Which one.
        library: Library,
    },
    /// The driver is there but the requested device is not (no GPU, or `ordinal` too large).
    NoDevice {
        /// The requested device ordinal.
        ordinal: usize,
        /// The number of devices the driver reports.
        count: usize,
    },
    /// NVRTC failed to compile the kernels (the message includes the compiler log).
    Compile(String),
    /// A CUDA driver call failed (the message names the call and the CUDA error).
    Driver(String),
    /// Two lengths that must agree do not (host data vs. tensor or group, shape vs. data).
    LengthMismatch {
        /// What was compared.
        what: &'static str,
        /// The length required.
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A tensor index is out of range.
    TensorIndex {
        /// The index given.
        index: usize,
        /// The number of tensors in the group.
        count: usize,
    },
    /// A pass needs a slot that the prepared [`SlotSpec`](sam_core::backend::SlotSpec) lacks, or ran
    /// before [`ParamBuffer::prepare`](sam_core::backend::ParamBuffer::prepare).
    MissingSlot,
    /// A size overflows the address arithmetic (elements × slots × element size).
    TooLarge,
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::LibraryMissing { library: Library::Driver } => f.write_str(
                "the CUDA driver library (libcuda) could not be loaded: no NVIDIA driver on this machine",
            ),
            CudaError::LibraryMissing { library: Library::Nvrtc } => f.write_str(
                "the NVRTC library (libnvrtc) could not be loaded: put its directory on LD_LIBRARY_PATH \
                 (for example from `pip install nvidia-cuda-nvrtc-cu12`)",
            ),
            CudaError::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device with ordinal {ordinal} (the driver reports {count})")
            }
            CudaError::Compile(m) => write!(f, "NVRTC compilation failed: {m}"),
            CudaError::Driver(m) => write!(f, "CUDA driver error: {m}"),
            CudaError::LengthMismatch { what, expected, found } => {
                write!(f, "length mismatch ({what}): expected {expected}, found {found}")
            }
            CudaError::TensorIndex { index, count } => {
                write!(f, "tensor index {index} out of range (the group has {count} tensors)")
            }
            CudaError::MissingSlot => {
                f.write_str("a pass needs a slot that was not prepared (call ParamBuffer::prepare)")
            }
            CudaError::TooLarge => f.write_str("the group is too large for the address arithmetic"),
        }
    }
}

impl std::error::Error for CudaError {}

impl CudaError {
    /// A driver error from the call `what`.
    pub(crate) fn driver(what: &str, e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(format!("{what}: {e:?}"))
    }
}
