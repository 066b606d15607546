//! Host-side behaviour that must hold on any machine, with or without CUDA: the error paths
//! when the driver, the device or NVRTC is missing (errors, never panics), and the error type.

use sam_cuda::internals::kernels;
use sam_cuda::{Context, CudaError, Library};

#[test]
fn context_creation_never_panics() {
    let driver = kernels::driver_available();
    let count = Context::device_count();
    match (driver, &count) {
        (
            false,
            Err(CudaError::LibraryMissing {
                library: Library::Driver,
            }),
        ) => {}
        (true, Ok(_)) => {}
        (true, Err(CudaError::Driver(m))) => println!("driver present but unusable: {m}"),
        other => panic!("unexpected device_count result: {other:?}"),
    }
    let r = Context::new(0);
    match (&r, &count) {
        (
            Err(CudaError::LibraryMissing {
                library: Library::Driver,
            }),
            _,
        ) => assert!(!driver),
        (
            Err(CudaError::NoDevice {
                ordinal: 0,
                count: 0,
            }),
            Ok(0),
        ) => {}
        (
            Err(CudaError::LibraryMissing {
                library: Library::Nvrtc,
            }),
            Ok(n),
        ) => {
            assert!(*n > 0 && !kernels::nvrtc_available())
        }
        (Ok(_), Ok(n)) => assert!(*n > 0),
        (Ok(_), Err(e)) => panic!("a context without a device count: {e}"),
        (Err(e), _) => println!("Context::new(0) failed: {e}"),
    }
    // An ordinal beyond every device is NoDevice whenever the driver loads.
    match Context::new(usize::MAX) {
        Err(CudaError::LibraryMissing {
            library: Library::Driver,
        }) => assert!(!driver),
        Err(CudaError::NoDevice { ordinal, .. }) => assert_eq!(ordinal, usize::MAX),
        Err(CudaError::Driver(m)) => println!("driver present but unusable: {m}"),
        other => panic!("unexpected: {other:?}"),
    }
    assert_eq!(Context::is_available(), r.is_ok());
}

#[test]
fn without_a_driver_every_entry_point_is_library_missing() {
    if kernels::driver_available() {
        println!("skipped: the CUDA driver library is present on this machine");
        return;
    }
    assert_eq!(
        Context::device_count(),
        Err(CudaError::LibraryMissing {
            library: Library::Driver
        })
    );
    assert_eq!(
        Context::new(0).err(),
        Some(CudaError::LibraryMissing {
            library: Library::Driver
        })
    );
    assert!(!Context::is_available());
}

#[test]
fn without_nvrtc_compilation_is_library_missing() {
    if kernels::nvrtc_available() {
        println!("skipped: libnvrtc is present (tests/nvrtc.rs compiles the kernels)");
        return;
    }
    let missing = Some(CudaError::LibraryMissing {
        library: Library::Nvrtc,
    });
    assert_eq!(kernels::compile_module(None).err(), missing);
    assert_eq!(kernels::check_layout().err(), missing);
    assert_eq!(kernels::nvrtc_version().err(), missing);
    assert_eq!(kernels::supported_archs().err(), missing);
    assert_eq!(kernels::arch_for_device(90), None);
}

#[test]
fn errors_display_and_are_std_errors() {
    let all = [
        CudaError::LibraryMissing {
            library: Library::Driver,
        },
        CudaError::LibraryMissing {
            library: Library::Nvrtc,
        },
        CudaError::NoDevice {
            ordinal: 1,
            count: 0,
        },
        CudaError::Compile("x.cu(1): error".into()),
        CudaError::Driver("cuLaunchKernel: CUDA_ERROR_INVALID_VALUE".into()),
        CudaError::LengthMismatch {
            what: "gradient",
            expected: 3,
            found: 2,
        },
        CudaError::TensorIndex { index: 4, count: 2 },
        CudaError::MissingSlot,
        CudaError::TooLarge,
    ];
    for e in all {
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(e.clone());
        let msg = boxed.to_string();
        assert!(!msg.is_empty());
        println!("{msg}");
    }
    assert!(
        CudaError::LibraryMissing {
            library: Library::Nvrtc
        }
        .to_string()
        .contains("libnvrtc")
    );
    // The core wraps backend errors.
    let core: sam_core::Error<CudaError> = sam_core::Error::Backend(CudaError::MissingSlot);
    assert!(core.to_string().contains("slot"));
}

#[test]
fn module_source_is_self_contained() {
    // The concatenated module names every kernel the context loads, and only the defines of
    // abi.rs parameterise it.
    let src = kernels::module_source();
    for name in kernels::KERNEL_NAMES {
        assert!(
            src.contains(&format!(" {name}(")) || src.contains(&format!("\n{name}(")),
            "{name} not defined"
        );
    }
    assert!(!src.contains("#include"), "NVRTC has no system headers");
    let opts = kernels::compile_options(Some(90));
    assert!(opts.iter().any(|o| o == "--fmad=false"));
    assert!(opts.iter().any(|o| o == "--gpu-architecture=compute_90"));
    assert!(opts.iter().any(|o| o.starts_with("-DSAM_BLOCK=4096")));
    assert!(opts.iter().any(|o| o.starts_with("-DSAM_LANES=8")));
}
