//! Every mismatch between the Vars, their gradients and the buffer is an `Err` that names the
//! parameter, never a panic, and leaves the weights, the gradients and the optimizer as they
//! were.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sam_candle::{CandleError, Role, SamCandle, VarBuffer};
use sam_core::{BaseRule, Group, Optimizer, Phase, Sam, SamConfig, SgdConfig};

fn var(values: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).expect("t"))
        .expect("var")
}

fn sgd() -> BaseRule {
    BaseRule::sgd(SgdConfig {
        lr: 0.1,
        ..Default::default()
    })
    .expect("valid")
}

fn values(v: &Var) -> Vec<f32> {
    v.as_tensor()
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("values")
}

/// Two Vars, a SAM driver over them, and a valid gradient store.
fn setup() -> (Vec<Var>, SamCandle<Sam>, GradStore) {
    let vars = vec![
        var(&[1.0, -2.0, 3.0, 0.5], &[2, 2]),
        var(&[0.25, 4.0], &[2]),
    ];
    let buffer = VarBuffer::named([
        ("w".to_owned(), vars[0].clone()),
        ("b".to_owned(), vars[1].clone()),
    ])
    .expect("buffer");
    let sam = SamCandle::new(
        Sam::new(SamConfig::default()).expect("valid"),
        vec![Group::new(buffer, sgd())],
    );
    let mut grads = GradStore::default();
    for v in &vars {
        grads.insert(v.as_tensor(), v.as_tensor().affine(0.5, 0.1).expect("g"));
    }
    (vars, sam, grads)
}

fn backend(e: sam_core::Error<CandleError>) -> CandleError {
    match e {
        sam_core::Error::Backend(b) => b,
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn bad_vars_are_refused_at_construction() {
    let f64_var = Var::zeros(3, DType::F64, &Device::Cpu).expect("var");
    assert_eq!(
        VarBuffer::<f32>::new(vec![f64_var.clone()]).err(),
        Some(CandleError::DType {
            param: "#0".into(),
            role: Role::Weight,
            expected: DType::F32,
            found: DType::F64
        })
    );
    assert!(VarBuffer::<f64>::new(vec![f64_var]).is_ok());
    let v = var(&[1.0], &[1]);
    assert_eq!(
        VarBuffer::<f32>::new(vec![v.clone(), v]).err(),
        Some(CandleError::DuplicateVar { param: "#1".into() })
    );
}

/// Runs `first_step` with `edit` applied to a valid gradient store and checks the error and
/// that nothing moved.
fn refused_first_step(edit: impl FnOnce(&[Var], &mut GradStore), want: CandleError) {
    let (vars, mut sam, mut grads) = setup();
    let before: Vec<Vec<f32>> = vars.iter().map(values).collect();
    edit(&vars, &mut grads);
    let e = sam.first_step(&grads).map(|_| ()).expect_err("refused");
    assert_eq!(backend(e), want);
    assert_eq!(vars.iter().map(values).collect::<Vec<_>>(), before);
    assert_eq!(sam.optimizer().phase(), Phase::Idle);
    assert_eq!(sam.optimizer().steps(), 0);
}

#[test]
fn bad_gradients_are_refused_before_anything_is_written() {
    refused_first_step(
        |v, g| {
            g.insert(
                v[1].as_tensor(),
                Tensor::zeros(3, DType::F32, &Device::Cpu).expect("t"),
            );
        },
        CandleError::ShapeMismatch {
            param: "b".into(),
            weight: vec![2],
            grad: vec![3],
        },
    );
    refused_first_step(
        |v, g| {
            g.insert(
                v[0].as_tensor(),
                Tensor::zeros((2, 2), DType::F64, &Device::Cpu).expect("t"),
            );
        },
        CandleError::DType {
            param: "w".into(),
            role: Role::Gradient,
            expected: DType::F32,
            found: DType::F64,
        },
    );
    refused_first_step(
        |v, g| {
            let t = Tensor::from_vec(vec![1.0_f32, 2.0, 3.0, 4.0], (2, 2), &Device::Cpu)
                .and_then(|t| t.t())
                .expect("transposed");
            g.insert(v[0].as_tensor(), t);
        },
        CandleError::NotContiguous {
            param: "w".into(),
            role: Role::Gradient,
        },
    );
    // The Var's own tensor as its gradient: a pass would write one through the other.
    refused_first_step(
        |v, g| {
            g.insert(v[1].as_tensor(), v[1].as_tensor().clone());
        },
        CandleError::AliasedGradient { param: "b".into() },
    );
}

#[test]
fn one_tensor_as_the_gradient_of_two_vars_is_refused() {
    let vars = vec![var(&[1.0, 2.0], &[2]), var(&[3.0, 4.0], &[2])];
    let mut buffer = VarBuffer::<f32>::new(vars.clone()).expect("buffer");
    let shared = Tensor::ones(2, DType::F32, &Device::Cpu).expect("t");
    let mut grads = GradStore::default();
    grads.insert(vars[0].as_tensor(), shared.clone());
    grads.insert(vars[1].as_tensor(), shared);
    assert_eq!(
        buffer.load_grads(&grads),
        Err(CandleError::AliasedGradient { param: "#1".into() })
    );
}

#[test]
fn a_gradient_missing_from_the_second_pass_is_an_error_and_the_weights_are_restored() {
    let (vars, mut sam, grads) = setup();
    let before: Vec<Vec<f32>> = vars.iter().map(values).collect();
    let p = sam.first_step(&grads).expect("first");
    assert_ne!(
        vars.iter().map(values).collect::<Vec<_>>(),
        before,
        "perturbed"
    );
    let mut second = GradStore::default();
    second.insert(
        vars[0].as_tensor(),
        Tensor::ones((2, 2), DType::F32, &Device::Cpu).expect("t"),
    );
    let e = p.second_step(&second).expect_err("refused");
    assert_eq!(
        backend(e),
        CandleError::MissingGradient { param: "b".into() }
    );
    assert_eq!(
        vars.iter().map(values).collect::<Vec<_>>(),
        before,
        "restored"
    );
    assert_eq!(sam.optimizer().phase(), Phase::Idle);
    // The driver steps normally afterwards.
    let p = sam.first_step(&grads).expect("first");
    p.second_step(&grads).expect("second");
    assert_eq!(sam.optimizer().steps(), 1);
}

#[test]
fn dropping_the_guard_restores_the_weights_exactly() {
    let (vars, mut sam, grads) = setup();
    let before: Vec<Vec<u32>> = vars
        .iter()
        .map(|v| values(v).iter().map(|x| x.to_bits()).collect())
        .collect();
    drop(sam.first_step(&grads).expect("first"));
    let after: Vec<Vec<u32>> = vars
        .iter()
        .map(|v| values(v).iter().map(|x| x.to_bits()).collect())
        .collect();
    assert_eq!(after, before);
    assert_eq!(sam.optimizer().phase(), Phase::Idle);
}

#[test]
fn a_failing_closure_aborts_the_step_with_the_weights_restored() {
    let (vars, mut sam, _) = setup();
    let before: Vec<Vec<f32>> = vars.iter().map(values).collect();
    let mut calls = 0;
    let r = sam.step(|| {
        calls += 1;
        if calls == 2 {
            candle_core::bail!("the second forward pass failed")
        }
        vars[0].as_tensor().sqr()?.sum_all()? + vars[1].as_tensor().sqr()?.sum_all()?
    });
    match r {
        Err(sam_core::Error::Backend(CandleError::Candle(m))) => {
            assert!(m.contains("second forward pass failed"), "{m}")
        }
        other => panic!("expected the closure's error, got {other:?}"),
    }
    assert_eq!(vars.iter().map(values).collect::<Vec<_>>(), before);
    assert_eq!(sam.optimizer().steps(), 0);
}

#[test]
fn a_varmap_groups_its_vars_by_prefix_in_name_order() {
    let map = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let _ = candle_nn::linear(3, 2, vb.pp("head")).expect("linear");
    let _ = candle_nn::linear(4, 3, vb.pp("body")).expect("linear");
    let all = VarBuffer::<f32>::from_varmap(&map, "").expect("buffer");
    let head = VarBuffer::<f32>::from_varmap(&map, "head.").expect("buffer");
    assert_eq!(all.vars().len(), 4);
    let dims: Vec<Vec<usize>> = head.vars().map(|v| v.dims().to_vec()).collect();
    assert_eq!(
        dims,
        vec![vec![2], vec![2, 3]],
        "head.bias, then head.weight"
    );
    // A dtype mismatch names the Var by its VarMap name.
    assert_eq!(
        VarBuffer::<f64>::from_varmap(&map, "body.").err(),
        Some(CandleError::DType {
            param: "body.bias".into(),
            role: Role::Weight,
            expected: DType::F64,
            found: DType::F32
        })
    );
}
