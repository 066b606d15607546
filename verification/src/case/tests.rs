//! Unit tests of the case parser on the vendored cases and edited copies of them.

use super::*;

fn cases_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cases")
}

fn case_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(cases_dir())
        .expect("cases dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
            (stem, std::fs::read(&p).expect("read case"))
        })
        .collect()
}

fn small_case() -> Vec<u8> {
    std::fs::read(cases_dir().join("sam_multigroup_sgd.json")).expect("read")
}

#[test]
fn every_vendored_case_parses() {
    let files = case_files();
    assert!(files.len() >= 41, "found {} cases", files.len());
    for (stem, bytes) in &files {
        let c = parse_case(bytes).unwrap_or_else(|e| panic!("{stem}: {e}"));
        assert_eq!(&c.name, stem);
        assert_eq!(c.expected.loss.len(), c.steps);
        assert_eq!(c.offsets().len(), c.params.len());
        assert!(c.expected.params.iter().all(|p| p.len() == c.n_elements()));
    }
}

#[test]
fn resolution_and_defaults() {
    let c = parse_case(&small_case()).expect("parse");
    assert_eq!(c.variant, VariantSpec::Sam);
    assert_eq!(c.groups.len(), 2);
    assert_eq!(c.groups[0].params, vec![0]);
    assert_eq!(c.groups[0].rho, 0.246);
    assert_eq!(
        c.groups[1].base,
        BaseHyper::Sgd(sam_core::SgdConfig {
            lr: 0.286,
            momentum: 0.136,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false
        })
    );
    assert_eq!(c.offsets(), vec![0, 9]);

    // Minimal adamw + wsam: every default applied.
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("json");
    v["optimizer"] = serde_json::json!({"variant": "wsam", "base": {"kind": "adamw"}});
    v["param_groups"] = serde_json::json!([{"params": ["W", "b"]}]);
    let c = parse_case(v.to_string().as_bytes()).expect("parse");
    assert_eq!(
        c.variant,
        VariantSpec::Wsam {
            gamma: 0.9,
            decouple: true,
            max_norm: None,
            sam_eps: 1e-12
        }
    );
    assert_eq!(
        c.groups[0],
        GroupSpec {
            params: vec![0, 1],
            base: BaseHyper::AdamW(sam_core::AdamConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
                amsgrad: false
            }),
            rho: 0.05,
            adaptive: false,
        }
    );
}

#[test]
fn gsam_groups_and_schedules() {
    let bytes = std::fs::read(cases_dir().join("gsam_multigroup_const_lr.json")).expect("read");
    let c = parse_case(&bytes).expect("parse");
    assert!(matches!(
        c.variant,
        VariantSpec::Gsam {
            lr_schedule: None,
            ..
        }
    ));
    assert_eq!(c.groups[0].base.lr(), 0.0754);
    assert_eq!(c.groups[1].rho, 0.0);
    assert!(c.expected.lr.is_some() && c.expected.rho.is_some());
}

/// Applies `edit` to the JSON of a valid case and returns the parse error text.
fn error_after(file: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let bytes = std::fs::read(cases_dir().join(file)).expect("read");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    edit(&mut v);
    match parse_case(v.to_string().as_bytes()) {
        Ok(_) => panic!("edited case was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_inputs_are_rejected_with_clear_messages() {
    use serde_json::json;
    let sgd = "sam_multigroup_sgd.json";
    let checks: Vec<(String, &str)> = vec![
        (
            error_after(sgd, |v| v["param_groups"][1]["options"]["foo"] = json!(1)),
            "param_groups[1].options.foo: unknown field `foo`, expected one of `kind`, `lr`, \
             `momentum`, `dampening`, `weight_decay`, `nesterov`, `betas`, `eps`, `amsgrad`, \
             `rho`, `adaptive`",
        ),
        (
            error_after(sgd, |v| {
                v["params"][0]["init"]
                    .as_array_mut()
                    .expect("a")
                    .truncate(8)
            }),
            "params[0]: init has 8 values but shape [3,3] needs 9",
        ),
        (
            error_after(sgd, |v| v["schema"] = json!("sam-conformance/2")),
            "schema: unsupported schema 'sam-conformance/2', expected 'sam-conformance/1'",
        ),
        (
            error_after(sgd, |v| v["optimizer"]["variant"] = json!("lookahead")),
            "optimizer.variant: unknown variant 'lookahead', expected sam, wasam, wsam or gsam",
        ),
        (
            error_after(sgd, |v| v["optimizer"]["base"]["kind"] = json!("rmsprop")),
            "optimizer.base.kind: unknown base kind 'rmsprop', expected sgd, adam or adamw",
        ),
        (
            error_after(sgd, |v| v["param_groups"][1]["params"] = json!(["b", "W"])),
            "param_groups[1].params[1]: param 'W' is already in param_groups[0]",
        ),
        (
            error_after(sgd, |v| v["param_groups"][1]["params"] = json!([])),
            "params[1]: param 'b' is in no param group",
        ),
        (
            error_after(sgd, |v| v["param_groups"][1]["params"] = json!(["c"])),
            "param_groups[1].params[0]: unknown param 'c'",
        ),
        (
            error_after(sgd, |v| v["params"][1]["shape"] = json!([3, 1])),
            "params[1]: b has shape [3,1] but the softmax objective needs [3]",
        ),
        (
            error_after(sgd, |v| v["objective"]["y"][2] = json!(3)),
            "objective.y[2]: label 3 out of range for 3 classes",
        ),
        (
            error_after(sgd, |v| v["steps"] = json!(2.5)),
            "steps: must be a non-negative integer, got 2.5",
        ),
        (
            error_after(sgd, |v| v["steps"] = json!(-1)),
            "steps: must be a non-negative integer, got -1",
        ),
        (
            error_after(sgd, |v| {
                v["expected"]["loss"].as_array_mut().expect("a").pop();
            }),
            "expected.loss: has 13 values, expected 14",
        ),
        (
            error_after(sgd, |v| {
                v["expected"]["params"][4]
                    .as_array_mut()
                    .expect("a")
                    .push(json!(0))
            }),
            "expected.params[4]: row has 13 values, expected 12",
        ),
        (
            error_after(sgd, |v| {
                v["optimizer"]["base"]
                    .as_object_mut()
                    .expect("o")
                    .remove("lr");
            }),
            "optimizer.base.lr: missing required field",
        ),
        (
            error_after("wasam_sgd_momentum.json", |v| {
                v["expected"]
                    .as_object_mut()
                    .expect("o")
                    .remove("swa_params");
            }),
            "expected.swa_params: missing required field",
        ),
        (
            error_after("gsam_proportion_cosine.json", |v| {
                v["optimizer"]["lr_schedule"] = json!(null)
            }),
            "optimizer.rho_schedule: kind 'proportion' requires a non-null lr_schedule",
        ),
        (
            error_after("gsam_multigroup_const_lr.json", |v| {
                v["param_groups"][0]["options"]["rho"] = json!(0.1)
            }),
            "param_groups[0].options: unknown key 'rho' for base kind sgd (gsam groups take base keys only)",
        ),
        (
            error_after("gsam_multigroup_const_lr.json", |v| {
                v["optimizer"]["rho_schedule"]["kind"] = json!("step")
            }),
            "optimizer.rho_schedule.kind: unknown schedule kind 'step', expected linear, cosine or proportion",
        ),
        (
            error_after("asam_sgd_plain.json", |v| {
                v["objective"]["a"][1][0] = json!(123.0)
            }),
            "objective.a: not symmetric: a[1][0] != a[0][1]",
        ),
        (
            error_after("asam_sgd_plain.json", |v| {
                v["objective"]["a"][2].as_array_mut().expect("a").pop();
            }),
            "objective.a[2]: row has 7 values, expected 8",
        ),
        (
            error_after("f32_wasam.json", |v| v["params"][1]["init"][0] = json!(0.1)),
            "params[1].init[0]: 0.1 is not exactly representable in f32",
        ),
        (
            error_after("asam_adamw.json", |v| {
                v["optimizer"]["base"]["betas"] = json!([0.9])
            }),
            "optimizer.base.betas: invalid length 1, expected an array of length 2",
        ),
        (
            error_after(sgd, |v| v["steps"] = json!(100_001)),
            "steps: value is 100001, above the cap of 100000",
        ),
        (
            error_after(sgd, |v| {
                v["params"][0]["shape"] = json!([1_000_000, 1_000_000])
            }),
            "params[0].shape: element count is 1000000000000, above the cap of 1000000",
        ),
        (
            error_after(sgd, |v| v["params"][0]["shape"] = json!([u64::MAX, 4])),
            "params[0].shape: element count overflows, above the cap of 1000000",
        ),
        (
            error_after(sgd, |v| v["expected"]["lr"] = json!([])),
            "expected: unknown key 'lr' for variant sam",
        ),
    ];
    for (got, want) in checks {
        assert_eq!(got, want);
    }
    assert_eq!(
        parse_case(b"{\"schema\": \"x\" 2}").map_err(|e| e.to_string()),
        Err("invalid JSON: expected `,` or `}` at line 1 column 16".to_owned())
    );
    let big = vec![b' '; MAX_INPUT_BYTES + 1];
    assert_eq!(
        parse_case(&big).map_err(|e| e.to_string()),
        Err(format!(
            "input is {} bytes, above the cap of {MAX_INPUT_BYTES}",
            MAX_INPUT_BYTES + 1
        ))
    );
}

/// The text of a valid case with `from` replaced by `to` once (for edits a JSON value cannot
/// hold, such as a duplicate key), and the parse error text.
fn error_after_text(file: &str, from: &str, to: &str) -> String {
    let bytes = std::fs::read(cases_dir().join(file)).expect("read");
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    let text = v.to_string();
    assert!(text.contains(from), "{from} not in {file}");
    match parse_case(text.replacen(from, to, 1).as_bytes()) {
        Ok(_) => panic!("edited case was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn structure_is_checked_by_the_serde_layer_with_the_field_path() {
    use serde_json::json;
    let sgd = "sam_multigroup_sgd.json";
    let wsam = "wsam_multigroup.json";
    let checks: Vec<(String, &str)> = vec![
        (
            error_after_text(sgd, "\"schema\":", "\"steps\":1,\"schema\":"),
            "duplicate field `steps`",
        ),
        (
            error_after_text(sgd, "\"lr\":", "\"lr\":1,\"lr\":"),
            "optimizer.base: duplicate field `lr`",
        ),
        (
            error_after(sgd, |v| v["optimizer"]["rho"] = json!(null)),
            "optimizer.rho: invalid type: null, expected f64",
        ),
        (
            error_after(sgd, |v| v["param_groups"][0]["options"] = json!(null)),
            "param_groups[0].options: invalid type: null, expected an object",
        ),
        (
            error_after(sgd, |v| v["params"][0]["init"][3] = json!("x")),
            "params[0].init[3]: invalid type: string \"x\", expected f64",
        ),
        (
            error_after(sgd, |v| v["params"][1]["shape"][0] = json!(true)),
            "params[1].shape[0]: invalid type: boolean `true`, expected a non-negative integer",
        ),
        (
            error_after(sgd, |v| v["dtype"] = json!("f16")),
            "dtype: unknown variant `f16`, expected `f32` or `f64`",
        ),
        (
            error_after(sgd, |v| v["extra"] = json!(1)),
            "extra: unknown field `extra`, expected one of `schema`, `name`, `description`, \
             `reference`, `dtype`, `tolerance`, `objective`, `params`, `param_groups`, \
             `optimizer`, `steps`, `expected`",
        ),
        (
            error_after(sgd, |v| {
                v.as_object_mut().expect("o").remove("name");
            }),
            "missing field `name`",
        ),
        (
            error_after(sgd, |v| v["optimizer"]["max_norm"] = json!(null)),
            "optimizer: unknown key 'max_norm' for variant sam",
        ),
        (
            error_after(sgd, |v| {
                v["param_groups"][0]["options"]["kind"] = json!("sgd")
            }),
            "param_groups[0].options: unknown key 'kind' for base kind sgd",
        ),
        (
            error_after(sgd, |v| v["optimizer"]["base"]["adaptive"] = json!(true)),
            "optimizer.base: unknown key 'adaptive' for base kind sgd",
        ),
        (
            error_after(wsam, |v| v["optimizer"]["max_norm"] = json!("1")),
            "optimizer.max_norm: invalid type: string \"1\", expected f64",
        ),
    ];
    for (got, want) in checks {
        assert_eq!(got, want);
    }
    // `null` is the documented "none" of `max_norm` and `lr_schedule`.
    let bytes = std::fs::read(cases_dir().join(wsam)).expect("read");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    v["optimizer"]["max_norm"] = json!(null);
    let c = parse_case(v.to_string().as_bytes()).expect("parse");
    assert!(matches!(
        c.variant,
        VariantSpec::Wsam { max_norm: None, .. }
    ));
    let bytes = std::fs::read(cases_dir().join("gsam_multigroup_const_lr.json")).expect("read");
    let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    v["optimizer"]["lr_schedule"] = json!(null);
    parse_case(v.to_string().as_bytes()).expect("parse");
}

#[test]
fn another_schema_version_is_named_before_its_contents() {
    assert_eq!(
        parse_case(b"{\"schema\": \"sam-conformance/2\", \"new\": {}}").map_err(|e| e.to_string()),
        Err("schema: unsupported schema 'sam-conformance/2', expected 'sam-conformance/1'".into())
    );
}

#[test]
fn integral_floats_accepted_as_integers() {
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("json");
    v["steps"] = serde_json::json!(14.0);
    v["params"][0]["shape"] = serde_json::json!([3.0, 3]);
    let c = parse_case(v.to_string().as_bytes()).expect("parse");
    assert_eq!((c.steps, c.params[0].shape.clone()), (14, vec![3, 3]));
}

#[test]
fn hyperparameter_domains_are_not_checked() {
    let mut v: serde_json::Value = serde_json::from_slice(&small_case()).expect("json");
    v["optimizer"] = serde_json::json!({"variant": "wsam", "rho": -1.0, "gamma": 1.5,
        "base": {"kind": "sgd", "lr": -0.1, "momentum": 2.0}});
    let c = parse_case(v.to_string().as_bytes()).expect("parse");
    assert_eq!(c.groups[0].rho, 0.246);
    assert!(matches!(c.variant, VariantSpec::Wsam { gamma: 1.5, .. }));
    assert_eq!(c.groups[1].base.lr(), 0.286);
}

/// xorshift64*, enough for fuzz-style tests without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn truncations_never_panic_and_are_rejected() {
    for (stem, bytes) in case_files().iter().step_by(5) {
        let len = bytes.trim_ascii_end().len();
        let stride = (len / 300).max(1);
        let cuts = (0..len).step_by(stride).chain(len.saturating_sub(64)..len);
        for cut in cuts {
            assert!(
                parse_case(&bytes[..cut]).is_err(),
                "{stem} truncated at {cut} was accepted"
            );
        }
    }
}

#[test]
fn random_mutations_never_panic() {
    let files = case_files();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let tokens: [&[u8]; 12] = [
        b"-",
        b"0",
        b"1e308",
        b"1e999",
        b"\"",
        b",",
        b"]",
        b"[",
        b"{}",
        b"null",
        b"3.5",
        b"99999999999",
    ];
    for _ in 0..3000 {
        let (_, base) = &files[rng.below(files.len())];
        let mut bytes = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[at] = rng.next() as u8,
                1 => {
                    let t = tokens[rng.below(tokens.len())];
                    bytes.splice(at..at, t.iter().copied());
                }
                _ => {
                    let end = (at + 1 + rng.below(16)).min(bytes.len());
                    bytes.drain(at..end);
                }
            }
        }
        let _ = parse_case(&bytes);
    }
    for len in [0, 1, 2, 7, 100, 5000] {
        let noise: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(parse_case(&noise).is_err());
    }
    let deep = "[".repeat(100_000);
    assert!(parse_case(deep.as_bytes()).is_err());
}
