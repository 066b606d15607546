//! Compile checks that need NVRTC but no GPU.
//!
//! Without libnvrtc on the library path these tests print why they are skipped and pass,
//! unless `SAM_CUDA_REQUIRE_NVRTC=1`, in which case they fail. To run them for real:
//!
//! ```text
//! python3 -m venv .venv-nvrtc && .venv-nvrtc/bin/pip install nvidia-cuda-nvrtc-cu12
//! export LD_LIBRARY_PATH=$PWD/.venv-nvrtc/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib
//! cargo test -p sam-cuda --test nvrtc
//! ```

use sam_cuda::internals::kernels;

/// Whether NVRTC is there; prints the skip reason (or panics if it is required) when not.
fn nvrtc_or_skip(test: &str) -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    let required = std::env::var("SAM_CUDA_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{test}: libnvrtc not found but SAM_CUDA_REQUIRE_NVRTC=1 (set LD_LIBRARY_PATH to the \
         nvidia-cuda-nvrtc wheel's lib dir)"
    );
    println!(
        "{test}: skipped: libnvrtc not found (set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc \
         wheel's lib dir)"
    );
    false
}

fn assert_clean(what: &str, c: &kernels::Compiled) {
    assert!(
        !c.has_diagnostics(),
        "{what}: NVRTC reported diagnostics (warnings are errors here):\n{}",
        c.log
    );
}

/// Every instruction mnemonic used in the PTX (first token of each instruction line, after an
/// optional `@p` / `@!p` predicate).
fn mnemonics(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("//")
                && !l.starts_with('.')
                && !l.starts_with('{')
                && !l.starts_with('}')
                && !l.starts_with('$')
                && !l.starts_with(')')
                && !l.starts_with('(')
        })
        .filter_map(|l| {
            let mut toks = l.split_whitespace();
            let first = toks.next()?;
            if first.starts_with('@') {
                toks.next()
            } else {
                Some(first)
            }
        })
        .collect()
}

#[test]
fn the_ptx_checks_can_fail() {
    if !nvrtc_or_skip("the_ptx_checks_can_fail") {
        return;
    }
    // With contraction allowed, NVRTC does fuse the element functions' multiply-adds: the
    // --fmad=false check below is not vacuous.
    let mut opts = kernels::compile_options(None);
    opts.retain(|o| o != "--fmad=false");
    opts.push("--fmad=true".into());
    let c = kernels::compile(&kernels::module_source(), "fmad.cu", &opts).expect("compiles");
    assert!(
        mnemonics(&c.ptx)
            .iter()
            .any(|m| m.starts_with("fma.rn.f64")),
        "expected fma.rn.f64 with --fmad=true"
    );
    let clean = kernels::compile_module(None).expect("compiles");
    let ops = mnemonics(&clean.ptx);
    for expected in [
        "div.rn.f64",
        "sqrt.rn.f64",
        "cvt.rn.f32.f64",
        "shfl.sync.down.b32",
        "bar.sync",
    ] {
        assert!(ops.contains(&expected), "{expected} not found in the PTX");
    }
}

#[test]
fn module_compiles_without_warnings_for_every_arch() {
    if !nvrtc_or_skip("module_compiles_without_warnings_for_every_arch") {
        return;
    }
    let (major, minor) = kernels::nvrtc_version().expect("nvrtcVersion");
    let archs = kernels::supported_archs().expect("nvrtcGetSupportedArchs");
    println!("NVRTC {major}.{minor}, supported virtual architectures {archs:?}");
    // NVRTC's default, the oldest non-deprecated (>= 75) and the newest it supports, and the
    // A100 and H100/H200 ones.
    let mut targets: Vec<Option<i32>> = vec![None];
    targets.extend(archs.iter().copied().find(|&a| a >= 75).map(Some));
    targets.extend(
        archs
            .iter()
            .copied()
            .filter(|&a| a == 80 || a == 90)
            .map(Some),
    );
    targets.extend(archs.last().copied().map(Some));
    targets.dedup();
    for arch in targets {
        let c = kernels::compile_module(arch).unwrap_or_else(|e| panic!("compute_{arch:?}: {e}"));
        assert_clean(&format!("module for compute_{arch:?}"), &c);
        for name in kernels::KERNEL_NAMES {
            assert!(
                c.ptx.contains(&format!(".entry {name}(")),
                "compute_{arch:?}: kernel {name} missing from the PTX"
            );
        }
        let ops = mnemonics(&c.ptx);
        // --fmad=false: no multiply-add may have been contracted (the Rust reference rounds
        // the product and the sum separately).
        let fused: Vec<_> = ops
            .iter()
            .filter(|m| m.starts_with("fma") || m.starts_with("mad.") && m.contains('f'))
            .collect();
        assert!(
            fused.is_empty(),
            "compute_{arch:?}: contracted multiply-adds in the PTX: {fused:?}"
        );
        // No atomics at all (the reduce is two-stage and deterministic).
        let atomics: Vec<_> = ops
            .iter()
            .filter(|m| m.starts_with("atom") || m.starts_with("red."))
            .collect();
        assert!(
            atomics.is_empty(),
            "compute_{arch:?}: atomics in the PTX: {atomics:?}"
        );
        // f64 division and square root must be the IEEE round-to-nearest instructions (or
        // the correctly rounded software sequences NVRTC emits for them), never approximations.
        assert!(
            !ops.iter().any(|m| m.starts_with("div.approx")
                || m.starts_with("sqrt.approx")
                || m.starts_with("rcp.approx.f64")),
            "compute_{arch:?}: approximate division/sqrt in the PTX"
        );
    }
}

#[test]
fn each_source_compiles_on_its_own() {
    if !nvrtc_or_skip("each_source_compiles_on_its_own") {
        return;
    }
    let opts = kernels::compile_options(None);
    let common =
        kernels::compile(kernels::COMMON, "sam_common.cuh", &opts).expect("sam_common.cuh");
    assert_clean("sam_common.cuh", &common);
    for (name, src) in [
        ("reduce.cu", kernels::REDUCE),
        ("passes.cu", kernels::PASSES),
    ] {
        let full = format!(
            "#line 1 \"sam_common.cuh\"\n{}\n#line 1 \"{name}\"\n{src}\n",
            kernels::COMMON
        );
        let c = kernels::compile(&full, name, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_clean(name, &c);
    }
}

#[test]
fn abi_structs_match_the_c_layout() {
    if !nvrtc_or_skip("abi_structs_match_the_c_layout") {
        return;
    }
    let c = kernels::check_layout().unwrap_or_else(|e| panic!("layout check: {e}"));
    assert_clean("layout_check.cu", &c);
    assert!(c.ptx.contains(".entry sam_layout_check("));
}

#[test]
fn layout_check_catches_a_wrong_offset() {
    if !nvrtc_or_skip("layout_check_catches_a_wrong_offset") {
        return;
    }
    // The same check with one Rust value off by 8 must fail to compile: the static_asserts
    // really compare against the injected numbers.
    let src = format!("{}\n{}\n", kernels::COMMON, kernels::LAYOUT_CHECK);
    let mut opts = kernels::compile_options(None);
    let mut defs = sam_cuda::internals::abi::layout_defines();
    let i = defs
        .iter()
        .position(|d| d.starts_with("-DSAM_OFFSETOF_SamUpdateArgs_adam="))
        .expect("adam offset define");
    let off: usize = defs[i].split('=').nth(1).unwrap().parse().unwrap();
    defs[i] = format!("-DSAM_OFFSETOF_SamUpdateArgs_adam={}", off + 8);
    opts.extend(defs);
    let err = kernels::compile(&src, "layout_check.cu", &opts)
        .expect_err("a wrong offset must not compile");
    let msg = err.to_string();
    assert!(
        msg.contains("SamUpdateArgs.adam"),
        "unexpected message: {msg}"
    );
}

#[test]
fn compile_errors_are_reported_with_the_log() {
    if !nvrtc_or_skip("compile_errors_are_reported_with_the_log") {
        return;
    }
    let err = kernels::compile(
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "bad.cu",
        &[],
    )
    .expect_err("must not compile");
    match err {
        sam_cuda::CudaError::Compile(m) => {
            assert!(m.contains("undefined_thing"), "log missing: {m}")
        }
        e => panic!("wrong error: {e:?}"),
    }
    // A warning is not an error for NVRTC but is visible in the log.
    let c = kernels::compile(
        "extern \"C\" __global__ void k() { int unused = 1; }",
        "warn.cu",
        &[],
    )
    .expect("compiles");
    println!("log of a program with an unused variable: {:?}", c.log);
}

/// `ptxas` for the optional assembly check: `$SAM_CUDA_PTXAS`, else `ptxas` on the `PATH`.
fn ptxas() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SAM_CUDA_PTXAS") {
        return Some(p.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join("ptxas"))
        .find(|p| p.is_file())
}

#[test]
fn ptx_assembles_for_a100_and_h100() {
    // What the driver does when it loads the module (JIT of the PTX to SASS), done offline
    // with ptxas (from the `nvidia-cuda-nvcc-cu12` wheel) when it is available.
    if !nvrtc_or_skip("ptx_assembles_for_a100_and_h100") {
        return;
    }
    let Some(ptxas) = ptxas() else {
        println!(
            "ptx_assembles_for_a100_and_h100: skipped: no ptxas (set SAM_CUDA_PTXAS or put ptxas on PATH)"
        );
        return;
    };
    let dir = std::env::temp_dir().join(format!("sam-cuda-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (arch, sm) in [(80, "sm_80"), (90, "sm_90")] {
        let c = kernels::compile_module(Some(arch)).expect("compiles");
        let ptx = dir.join(format!("sam_{sm}.ptx"));
        std::fs::write(&ptx, &c.ptx).unwrap();
        let out = std::process::Command::new(&ptxas)
            .arg(format!("--gpu-name={sm}"))
            .arg("-v")
            .arg("-o")
            .arg(dir.join(format!("sam_{sm}.cubin")))
            .arg(&ptx)
            .output()
            .expect("run ptxas");
        let log = String::from_utf8_lossy(&out.stderr);
        println!("ptxas {sm}:\n{log}");
        assert!(out.status.success(), "ptxas {sm} failed:\n{log}");
        let warnings: Vec<_> = log.lines().filter(|l| l.contains("warning")).collect();
        assert!(warnings.is_empty(), "ptxas {sm} warnings: {warnings:?}");
        // No kernel may use local memory (no stack frame, no spills): local memory is reserved
        // for every resident thread of the device, and the passes are bandwidth-bound.
        let mut current = String::new();
        let mut checked = 0;
        for line in log.lines() {
            if let Some(rest) = line.split("Function properties for ").nth(1) {
                current = rest.trim().to_string();
            }
            if line.contains("stack frame") {
                assert!(
                    line.contains("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"),
                    "{sm} {current}: {}",
                    line.trim()
                );
                checked += 1;
            }
        }
        assert_eq!(
            checked,
            kernels::KERNEL_NAMES.len(),
            "{sm}: ptxas reported on every kernel"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
