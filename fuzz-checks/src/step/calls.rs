//! One operation applied to a world: the closure and two-call steps, the base optimizer,
//! WASAM swaps, checkpoints and option changes, each checked against its prediction.

use super::*;

/// Runs one guarded step (`first_step` … finish) on variant `V`.
pub(crate) fn guarded<V: SamOptimizer, B: Inspect>(
    opt: &mut V,
    groups: &mut [Group<B>],
    j: &Judge,
    params: &[Option<PerturbParams>],
    g2r: &Recipe,
    finish: Finish,
    m: &mut Model,
) -> Result<Outcome, Violation> {
    let before = strip(snaps(groups), j.first.reinterpret);
    let g1: Vec<Vec<f64>> = before.iter().map(|s| s.g.clone()).collect();
    let out = match run_first(opt, groups, g2r, finish) {
        Err((got, name)) => {
            let now = snaps(groups);
            judge_first_error(j, got, name, &before, &now, "first_step")?;
            check_grads(&now, &g1, "first_step")?;
            return Ok(format!("first_step: {name}"));
        }
        Ok(out) => out,
    };
    if j.pred() != Pred::Ok {
        return Err(Violation::new(
            None,
            format!("first_step succeeded, predicted {:?}", j.pred()),
        ));
    }
    // What the step starts from once its first half passed the checks: a WASAM fold owed is
    // applied then.
    let base = apply_fold(&before, j.fold.as_ref(), j.is_f64);
    // A first half reads the gradient storage and leaves it as it is (gradient accumulation).
    check_grads(&out.perturbed, &g1, "first_step")?;
    if j.climbs {
        check_perturbation(&before, &out.perturbed, params, j.stashes, j.is_f64)?;
        check_same(&base, &out.perturbed, "first_step", false, None)?;
    } else {
        check_unchanged(&base, &out.perturbed, "first_step (no climb)")?;
        check_stash(
            j,
            &before,
            &out.perturbed,
            &g1,
            false,
            "first_step (no climb)",
        )?;
    }
    let g2 = out.g2;
    let now = snaps(groups);
    let phase = opt.phase();
    let label = match finish {
        Finish::Second => "second_step",
        Finish::External => "restore_with_gradient",
        Finish::Cancel => "cancel",
        Finish::Drop => "drop",
        Finish::Forget => "forget",
    };
    if finish == Finish::Forget && j.climbs {
        if phase != Phase::Perturbed {
            return Err(Violation::new(
                None,
                "a leaked guard left the optimizer out of the perturbed phase".into(),
            ));
        }
        if !now
            .iter()
            .zip(&out.perturbed)
            .all(|(a, b)| same(&a.w, &b.w))
        {
            return Err(Violation::new(
                None,
                "a leaked guard changed the perturbed weights".into(),
            ));
        }
        // Recover must bring back the clean weights; the slots are as the first step left
        // them (a fold owed happened there).
        let snap = out
            .perturbed
            .iter()
            .zip(&before)
            .map(|(p, b)| GroupSnap {
                w: b.w.clone(),
                ..p.clone()
            })
            .collect();
        m.leaked = Some((Phase::Perturbed, snap));
        return Ok("forget".into());
    }
    if phase != Phase::Idle {
        return Err(Violation::new(
            None,
            format!("{label}: optimizer not idle afterwards"),
        ));
    }
    // Not applied: nothing changed but the scratch slots (and the gradient the caller wrote).
    let unchanged = |what: &str| -> Result<(), Violation> {
        check_unchanged(&base, &now, what)?;
        check_stash(j, &before, &now, &g1, j.climbs, what)?;
        check_grads(&now, &g2, what)
    };
    let result = match (out.result, finish) {
        (None, _) | (Some(Ok(_)), Finish::Cancel) => {
            unchanged(label)?;
            return Ok(label.into());
        }
        (Some(Err(e)), Finish::Cancel) => {
            return Err(Violation::new(None, format!("cancel failed: {e}")));
        }
        (Some(r), _) => r,
    };
    let expect = predict_second(j, finish, &g1, &g2)?;
    let external = finish == Finish::External;
    match (result, expect.against(outcome_of(&result))) {
        (Ok(StepStatus::Applied), Ok(None)) => {
            if external {
                check_unchanged(&base, &now, "restore_with_gradient")?;
                if j.is_sam_like {
                    check_grads(
                        &now,
                        &g2,
                        "restore_with_gradient (the final gradient is g2)",
                    )?;
                }
            } else {
                check_grads(&now, &g2, label)?;
            }
            if !j.climbs {
                check_stash(j, &before, &now, &g1, false, label)?;
            }
            let class = judge_applied(j, &before, &now, &g1, &g2, external, label)?;
            m.in_class &= class;
            Ok(format!("{label}: applied"))
        }
        (Ok(StepStatus::Skipped(r)), Ok(Some(p))) if r == p => {
            unchanged(label)?;
            Ok(format!("{label}: skipped {r:?}"))
        }
        (Err(e), Err(name)) if e == name => {
            unchanged(label)?;
            Ok(format!("{label}: {e}"))
        }
        (r, p) => Err(Violation::new(
            expect.finding,
            format!("{label} returned {r:?}, predicted {p:?}"),
        )),
    }
}

/// Runs one closure-driven step on variant `V`; `j` was computed with the clean gradient the
/// closure writes on its first call.
pub(crate) fn closure<V: SamOptimizer, B: Inspect>(
    opt: &mut V,
    groups: &mut [Group<B>],
    j: &Judge,
    g1r: &Recipe,
    g2r: &Recipe,
    fail: u8,
    m: &mut Model,
) -> Result<Outcome, Violation> {
    let before = strip(snaps(groups), j.first.reinterpret);
    let phase_before = opt.phase();
    let mut seen: Vec<Vec<Vec<f64>>> = Vec::new();
    let r = opt.step(groups, |gs: &mut [Group<B>]| {
        let call = seen.len() + 1;
        write_recipe(gs, if call == 1 { g1r } else { g2r });
        seen.push(grads_of(gs));
        if usize::from(fail) == call {
            Err(Fail::Closure)
        } else {
            Ok(())
        }
    });
    let now = snaps(groups);
    if opt.phase() != phase_before {
        return Err(Violation::new(
            None,
            format!(
                "closure step changed the phase from {phase_before:?} to {:?}",
                opt.phase()
            ),
        ));
    }
    if seen.len() == 2 && (j.pred() != Pred::Ok || !j.climbs) {
        return Err(Violation::new(
            None,
            format!(
                "closure step called the closure twice, predicted {:?} (climbs: {})",
                j.pred(),
                j.climbs
            ),
        ));
    }
    // The step's gradient evaluations: two when it climbs, else one.
    let calls = if j.climbs { 2 } else { 1 };
    let g1 = seen.first().cloned().unwrap_or_default();
    let g2 = seen.get(1).cloned().unwrap_or_default();
    // The optimizer never writes the gradient storage: it holds the closure's last gradient.
    if let Some(last) = seen.last() {
        check_grads(&now, last, "closure step")?;
    }
    // After a climbing first half that passed its checks (the second closure call), a fold owed
    // happened, and the stash holds the clean gradient.
    let climbed = seen.len() == 2;
    let base = if climbed {
        apply_fold(&before, j.fold.as_ref(), j.is_f64)
    } else {
        before.clone()
    };
    let unchanged = |what: &str| -> Result<(), Violation> {
        check_unchanged(&base, &now, what)?;
        check_stash(j, &before, &now, &g1, climbed, what)
    };
    match r {
        Err(Fail::Closure) => {
            unchanged("closure step (closure failed)")?;
            Ok("closure: closure error".into())
        }
        Err(Fail::Core(e)) => {
            let (got, name) = (kind(&e), err_name(&e));
            if seen.len() == 1 {
                judge_first_error(j, got, name, &before, &now, "closure step")?;
                return Ok(format!("closure: {name}"));
            }
            let expect = predict_second(j, Finish::Second, &g1, &g2)?;
            match expect.against(Err(name)) {
                Err(p) if p == name => {
                    unchanged("closure step")?;
                    Ok(format!("closure: {name}"))
                }
                p => Err(Violation::new(
                    expect.finding,
                    format!("closure step returned {name} after two gradients, predicted {p:?}"),
                )),
            }
        }
        Ok(report) => match report.status {
            StepStatus::Skipped(SkipReason::NonFiniteClean) => {
                if seen.len() != 1 || j.pred() != Pred::NonFinite {
                    return Err(Violation::new(
                        None,
                        format!(
                            "closure step skipped for a non-finite clean gradient, predicted {:?}",
                            j.pred()
                        ),
                    ));
                }
                judge_first_error(
                    j,
                    Pred::NonFinite,
                    "NonFiniteGradient",
                    &before,
                    &now,
                    "closure step",
                )?;
                Ok("closure: skipped clean".into())
            }
            status => {
                if j.pred() != Pred::Ok || seen.len() != calls {
                    return Err(Violation::new(
                        None,
                        format!(
                            "closure step returned {status:?}, predicted {:?} ({} closure calls)",
                            j.pred(),
                            seen.len()
                        ),
                    ));
                }
                let expect = predict_second(j, Finish::Second, &g1, &g2)?;
                match (status, expect.against(outcome_of(&Ok(status)))) {
                    (StepStatus::Applied, Ok(None)) => {
                        if !j.climbs {
                            check_stash(j, &before, &now, &g1, false, "closure step")?;
                        }
                        let class =
                            judge_applied(j, &before, &now, &g1, &g2, false, "closure step")?;
                        m.in_class &= class;
                        Ok("closure: applied".into())
                    }
                    (StepStatus::Skipped(r), Ok(Some(p))) if r == p => {
                        unchanged("closure step (skipped)")?;
                        Ok(format!("closure: skipped {r:?}"))
                    }
                    (s, p) => Err(Violation::new(
                        expect.finding,
                        format!("closure step returned {s:?}, predicted {p:?}"),
                    )),
                }
            }
        },
    }
}

/// One step of the plain base optimizer with the gradient in the buffers.
pub(crate) fn base_step<B: Inspect>(
    b: &mut sam_core::BaseOptimizer,
    groups: &mut [Group<B>],
    j: &Judge,
    m: &mut Model,
) -> Result<Outcome, Violation> {
    let before = strip(snaps(groups), j.first.reinterpret);
    let g1: Vec<Vec<f64>> = before.iter().map(|s| s.g.clone()).collect();
    let r = b.apply(groups);
    let now = snaps(groups);
    check_grads(&now, &g1, "base step")?;
    match r {
        Err(e) => {
            let (got, name) = (kind(&e), err_name(&e));
            judge_first_error(j, got, name, &before, &now, "base step")?;
            Ok(format!("base: {name}"))
        }
        Ok(StepStatus::Skipped(SkipReason::NonFiniteClean)) => {
            judge_first_error(
                j,
                Pred::NonFinite,
                "NonFiniteGradient",
                &before,
                &now,
                "base step",
            )?;
            Ok("base: skipped".into())
        }
        Ok(StepStatus::Applied) if j.pred() == Pred::Ok => {
            let class = judge_applied(j, &before, &now, &g1, &[], false, "base step")?;
            m.in_class &= class;
            Ok("base: applied".into())
        }
        Ok(s) => Err(Violation::new(
            None,
            format!("base step returned {s:?}, predicted {:?}", j.pred()),
        )),
    }
}

/// The outcome of a call skipped in lockstep: it would prepare a buffer for another slot layout
/// (after a checkpoint load reset the record), which the reference backend does by
/// reinterpreting its slot memory while `sam-ndarray` keeps slots by role (both as documented),
/// so the backends would legitimately diverge.
pub(crate) const SKIPPED_RESPEC: &str = "skipped in lockstep (would prepare another slot layout)";

/// Applies one operation to a world, checking every promise; updates the model.
pub fn apply<B: Inspect, O: Drawn>(
    w: &mut World<B, O>,
    m: &mut Model,
    op: &Op,
    lockstep: bool,
) -> Result<Outcome, Violation> {
    let n = w.active;
    let leaked = m.leaked.is_some();
    match op {
        Op::Step { g1, g2, finish } => {
            w.write(g1);
            let g1v = grads_of(w.act());
            let j = judge(w, m, &g1v);
            if lockstep && j.first.reinterpret {
                return Ok(format!("step: {SKIPPED_RESPEC}"));
            }
            let inactive = snaps(&w.groups[n..]);
            let params = w.params();
            let groups = &mut w.groups[..n];
            let out = match w.opt.form() {
                Form::Sam(o) => guarded(o, groups, &j, &params, g2, *finish, m),
                Form::Base(b) => base_step(b, groups, &j, m),
            }?;
            w.note(m, &j.first);
            check_inactive(&inactive, &snaps(&w.groups[n..]))?;
            Ok(out)
        }
        Op::Closure { g1, g2, fail } => {
            let is_f64 = w.f64;
            let g1v: Vec<Vec<f64>> = w
                .act()
                .iter()
                .enumerate()
                .map(
                    |(gi, g)| match g1.values(gi, &g.buffer.weights_f64(), is_f64) {
                        Some(v) => v,
                        None => g.buffer.grads_f64(),
                    },
                )
                .collect();
            let mut j = judge(w, m, &g1v);
            // A closure that fails on its first call stops the step before the optimizer runs.
            let begins = *fail != 1 || matches!(w.opt.form(), Form::Base(_));
            if !begins {
                j.first.prepares = 0;
                j.first.reinterpret = false;
            }
            if lockstep && j.first.reinterpret {
                return Ok(format!("closure: {SKIPPED_RESPEC}"));
            }
            let inactive = snaps(&w.groups[n..]);
            let groups = &mut w.groups[..n];
            let out = match w.opt.form() {
                Form::Base(b) => {
                    write_recipe(groups, g1);
                    base_step(b, groups, &j, m)
                }
                Form::Sam(o) => closure(o, groups, &j, g1, g2, *fail, m),
            }?;
            if begins {
                w.note(m, &j.first);
            }
            check_inactive(&inactive, &snaps(&w.groups[n..]))?;
            Ok(out)
        }
        Op::Recover => {
            let before = snaps(&w.groups[..n]);
            let Some(r) = recover_opt(&mut w.opt, &mut w.groups[..n]) else {
                return Ok("recover: n/a".into());
            };
            let now = snaps(&w.groups[..n]);
            let phase = w.opt.phase();
            match m.leaked.take() {
                Some((leaked_phase, snap)) => {
                    if r.is_err() || phase != Phase::Idle {
                        return Err(Violation::new(
                            None,
                            format!(
                                "recover after a leaked {leaked_phase:?} guard: {:?}, phase {phase:?}",
                                r.err().map(|e| err_name(&e))
                            ),
                        ));
                    }
                    check_unchanged(
                        &snap,
                        &now,
                        &format!("recover after a leaked {leaked_phase:?} guard"),
                    )?;
                    Ok(format!("recover: {leaked_phase:?} undone"))
                }
                None => {
                    if let Err(e) = r {
                        return Err(Violation::new(
                            None,
                            format!("recover when idle failed: {}", err_name(&e)),
                        ));
                    }
                    check_unchanged(&before, &now, "recover when idle")?;
                    Ok("recover: no-op".into())
                }
            }
        }
        Op::SetGrads(r) => {
            w.write(r);
            Ok("set grads".into())
        }
        Op::Swap { k, touch, end } => swap(w, m, *k, touch.as_ref(), *end, lockstep),
        Op::UpdateAverages => {
            let Some(v) = w.opt.wasam().filter(|_| w.opt.swappable()) else {
                return Ok("update_averages: n/a".into());
            };
            let fold = owed_fold(v);
            let first = w.predict_begin(m);
            if lockstep && first.reinterpret {
                return Ok(format!("update_averages: {SKIPPED_RESPEC}"));
            }
            let before = strip(snaps(&w.groups[..n]), first.reinterpret);
            let Some(v) = w.opt.wasam_mut() else {
                unreachable!("checked above")
            };
            let groups = &mut w.groups[..n];
            let r = v.update_averages(groups);
            let now = snaps(groups);
            let (got, name) = match &r {
                Ok(()) => (Pred::Ok, "ok"),
                Err(e) => (kind(e), err_name(e)),
            };
            if got != first.pred {
                return Err(Violation::new(
                    None,
                    format!(
                        "update_averages returned {name}, predicted {:?}",
                        first.pred
                    ),
                ));
            }
            let expect = if got == Pred::Ok {
                apply_fold(&before, fold.as_ref(), w.f64)
            } else {
                before
            };
            check_unchanged(&expect, &now, &format!("update_averages ({name})"))?;
            w.note(m, &first);
            Ok(format!("update_averages: {name}"))
        }
        Op::External { lr } => {
            if leaked {
                return Ok("external: skipped".into());
            }
            for g in &mut w.groups[..n] {
                let (wv, gv) = (g.buffer.weights_f64(), g.buffer.grads_f64());
                let new: Vec<f64> = wv.iter().zip(&gv).map(|(w, g)| w - lr * g).collect();
                g.buffer.set_weights(&new);
            }
            Ok("external".into())
        }
        Op::Checkpoint {
            steps,
            counts,
            flip_pending,
        } => {
            let before = snaps(&w.groups);
            let (out, loaded) = checkpoint(&mut w.opt, *steps, *counts, *flip_pending)?;
            if loaded {
                m.shape = None;
            }
            check_unchanged(&before, &snaps(&w.groups), "checkpoint")?;
            Ok(out)
        }
        Op::Resume { fill } => {
            if lockstep && w.respec() {
                return Ok(format!("resume: {SKIPPED_RESPEC}"));
            }
            resume(w, m, if lockstep { 0.0 } else { *fill })
        }
        Op::Active(k) => {
            if !leaked {
                w.active = (*k).min(w.groups.len());
            }
            Ok("active".into())
        }
        Op::Permute(i, j) => {
            if !leaked && *i < w.groups.len() && *j < w.groups.len() {
                w.groups.swap(*i, *j);
                w.caps.swap(*i, *j);
                w.prepared.swap(*i, *j);
            }
            Ok("permute".into())
        }
        Op::Options { group, raw } => {
            let Some(g) = w.groups.get_mut(*group) else {
                return Ok("options: n/a".into());
            };
            let Ok(o) = raw.build() else {
                return Ok("options: invalid".into());
            };
            if leaked {
                return Ok("options: skipped".into());
            }
            g.options = o;
            Ok("options".into())
        }
    }
}

/// WASAM `swap(k)`, optionally writing the live (averaged) weights, then ending as `end` says.
///
/// Predicted: `InvalidGroups` unless average `k` exists and holds a snapshot or gets its first
/// from the fold owed (checked first, in any phase), then [`World::predict_begin`]; on success
/// the fold owed is applied, the live weights are average `k` and average `k` the live weights
/// (bit for bit), and after the swap back (or `recover` of a leaked guard) everything is as
/// after the fold, except that average `k` holds what the live weights held while swapped.
pub(crate) fn swap<B: Inspect, O: Drawn>(
    w: &mut World<B, O>,
    m: &mut Model,
    k: u8,
    touch: Option<&Recipe>,
    end: SwapEnd,
    lockstep: bool,
) -> Result<Outcome, Violation> {
    let Some(v) = w.opt.wasam().filter(|_| w.opt.swappable()) else {
        return Ok("swap: n/a".into());
    };
    let n = w.active;
    let phase = v.phase();
    let fold = owed_fold(v);
    let ki = usize::from(k);
    let owed = fold.is_some_and(|f| f.get(ki).is_some_and(Option::is_some));
    let valid = ki < v.swa_starts().len() && (v.counts()[ki] > 0 || owed);
    let first = if valid {
        w.predict_begin(m)
    } else {
        First::refused(Pred::InvalidGroups)
    };
    if lockstep && first.reinterpret {
        return Ok(format!("swap: {SKIPPED_RESPEC}"));
    }
    let before = strip(snaps(&w.groups[..n]), first.reinterpret);
    let Some(v) = w.opt.wasam_mut() else {
        unreachable!("checked above")
    };
    let groups = &mut w.groups[..n];
    let out = run_swap(v, groups, k, touch, end);
    let after = snaps(groups);
    let phase_after = v.phase();
    let out = match out {
        Err((got, name)) => {
            if got != first.pred {
                return Err(Violation::new(
                    None,
                    format!(
                        "swap({k}) returned {name} in phase {phase:?}, predicted {:?} (average valid: {valid})",
                        first.pred
                    ),
                ));
            }
            check_unchanged(&before, &after, &format!("swap ({name})"))?;
            w.note(m, &first);
            return Ok(format!("swap: {name}"));
        }
        Ok(out) => out,
    };
    if first.pred != Pred::Ok {
        return Err(Violation::new(
            None,
            format!(
                "swap({k}) succeeded in phase {phase:?}, predicted {:?}",
                first.pred
            ),
        ));
    }
    w.note(m, &first);
    let avg = Slot::Average(k);
    let folded = apply_fold(&before, fold.as_ref(), w.f64);
    for (i, (f, s)) in folded.iter().zip(&out.swapped).enumerate() {
        let Some(fa) = f.slot(avg) else { continue };
        if !same(&s.w, fa) {
            return Err(Violation::new(
                None,
                format!(
                    "swap: live weights of group {i} are not average {k} ({})",
                    first_diff(&s.w, fa)
                ),
            ));
        }
        if s.slot(avg).is_some_and(|sa| !same(sa, &f.w)) {
            return Err(Violation::new(
                None,
                format!("swap: average {k} of group {i} does not hold the live weights"),
            ));
        }
    }
    check_same(&folded, &out.swapped, "swap", false, Some(avg))?;
    // Swapped back: as after the fold, average k holding what the live weights held.
    let at = role_index(avg).expect("a role");
    let back: Vec<GroupSnap> = folded
        .into_iter()
        .zip(&out.touched)
        .map(|(mut f, t)| {
            if f.slots[at].is_some() {
                f.slots[at] = Some(t.clone());
            }
            f
        })
        .collect();
    match out.back {
        None => {
            if phase_after != Phase::Swapped {
                return Err(Violation::new(
                    None,
                    "a leaked swap guard left the optimizer unswapped".into(),
                ));
            }
            m.leaked = Some((Phase::Swapped, back));
            return Ok("swap: leaked".into());
        }
        Some(Err(e)) => return Err(Violation::new(None, format!("swap_back failed: {e}"))),
        Some(Ok(())) => {}
    }
    if phase_after != Phase::Idle {
        return Err(Violation::new(
            None,
            "swap back left the optimizer swapped".into(),
        ));
    }
    check_unchanged(&back, &after, "swap twice")?;
    Ok("swap: back".into())
}

/// Saves the host state, edits it ([`Drawn::edit_state`]), loads it back. Returns the outcome
/// and whether a state was loaded (which resets the optimizer's record of the groups).
pub(crate) fn checkpoint<O: Drawn>(
    opt: &mut O,
    steps: Option<u64>,
    counts: Option<u64>,
    flip: bool,
) -> Result<(Outcome, bool), Violation> {
    let phase = opt.phase();
    let old = match opt.state() {
        Ok(st) => st,
        Err(Error::WrongPhase { .. }) if phase != Phase::Idle => {
            return Ok(("checkpoint: WrongPhase".into(), false));
        }
        Err(e) => {
            return Err(Violation::new(
                None,
                format!("state() in phase {phase:?}: {e}"),
            ));
        }
    };
    if phase != Phase::Idle {
        return Err(Violation::new(
            None,
            format!("state() succeeded in phase {phase:?}"),
        ));
    }
    let mut st = old.clone();
    let refuse = O::edit_state(&mut st, steps, counts, flip);
    match (opt.load_state(&st), refuse) {
        (Ok(()), false) => {
            if opt.state().ok() != Some(st) {
                return Err(Violation::new(
                    None,
                    "load_state did not restore the state".into(),
                ));
            }
            Ok(("checkpoint: loaded".into(), true))
        }
        // Nothing changes on a refused state.
        (Err(Error::InvalidState { .. }), true) => {
            if opt.state().ok() != Some(old) {
                return Err(Violation::new(
                    None,
                    "load_state refused a state but changed the optimizer".into(),
                ));
            }
            Ok(("checkpoint: InvalidState".into(), false))
        }
        (r, _) => Err(Violation::new(
            None,
            format!(
                "load_state({st:?}) returned {r:?}, predicted {}",
                if refuse { "InvalidState" } else { "Ok" }
            ),
        )),
    }
}

/// A checkpoint round trip ([`Op::Resume`]): save, make the active buffers fresh
/// ([`Inspect::refresh`]), load into a freshly built optimizer, go on with that one.
///
/// Predicted: `WrongPhase` unless idle (nothing changes); otherwise the load succeeds, the
/// optimizer's host state is the saved one, and every weight, gradient, base-state slot,
/// average and persistent stash holds the bits it held (zeros for a group whose buffer was
/// not prepared for the layout its options need, as `Checkpoint::save` documents). Groups
/// whose slot memory is too small for their layout are not resumed (`n/a`).
pub(crate) fn resume<B: Inspect, O: Drawn>(
    w: &mut World<B, O>,
    m: &mut Model,
    fill: f64,
) -> Result<Outcome, Violation> {
    let n = w.active;
    if (0..n).any(|i| w.spec(i).count().saturating_mul(w.groups[i].buffer.len()) > w.caps[i]) {
        return Ok("resume: n/a (slot memory)".into());
    }
    let ckpt = match Checkpoint::save(&w.opt, w.act()) {
        Ok(c) => c,
        Err(e) => {
            if m.leaked.is_some() && matches!(e, Error::WrongPhase { .. }) {
                return Ok("resume: WrongPhase".into());
            }
            return Err(Violation::new(
                None,
                format!("Checkpoint::save when idle: {}", err_name(&e)),
            ));
        }
    };
    if m.leaked.is_some() {
        return Err(Violation::new(
            None,
            "Checkpoint::save succeeded with a guard leaked".into(),
        ));
    }
    let before = snaps(w.act());
    // What the loaded buffers must hold: the saved roles as they were (zeros where the buffer
    // held another layout or none), the scratch roles whatever they hold.
    let keeps_stash = w.opt.keeps_stash();
    let want: Vec<GroupSnap> = before
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let spec = w.spec(i);
            let saved = w.prepared[i] == Some(spec);
            let mut s = b.clone();
            for (k, role) in Slot::ALL.iter().enumerate() {
                s.slots[k] =
                    (spec.index(*role).is_some() && persistent(*role, keeps_stash)).then(|| {
                        if saved {
                            b.slots[k].clone().unwrap_or_default()
                        } else {
                            vec![0.0; b.w.len()]
                        }
                    });
            }
            s
        })
        .collect();
    for g in &mut w.groups[..n] {
        g.buffer.refresh(fill);
    }
    let mut fresh = w.initial.clone();
    if let Err(e) = ckpt.load(&mut fresh, &mut w.groups[..n]) {
        return Err(Violation::new(
            None,
            format!("Checkpoint::load of its own checkpoint: {}", err_name(&e)),
        ));
    }
    if fresh.state().ok() != w.opt.state().ok() {
        return Err(Violation::new(
            None,
            "the resumed optimizer's host state differs from the saved one".into(),
        ));
    }
    let held = |r| persistent(r, keeps_stash);
    if let Some(d) = diff_groups(&want, &snaps(w.act()), held, same, false) {
        return Err(Violation::new(
            None,
            format!("resume: the loaded buffers do not hold what was saved: {d}"),
        ));
    }
    w.opt = fresh;
    for i in 0..n {
        w.prepared[i] = Some(w.spec(i));
    }
    // A fresh optimizer learns the groups again at its next step.
    m.shape = None;
    Ok("resume: loaded".into())
}

/// With `SAM_FUZZ_TRACE=1`, prints each operation and its outcome to stderr.
pub(crate) fn trace(op: &Op, out: &Result<Outcome, Violation>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var("SAM_FUZZ_TRACE").is_ok_and(|v| v == "1")) {
        eprintln!("op {op:?}\n  -> {out:?}");
    }
}
