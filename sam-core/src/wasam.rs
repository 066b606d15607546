//! WASAM: SAM with stochastic weight averaging of the iterates.

use crate::backend::{AverageFold, MAX_AVERAGES, ParamBuffer, SlotSpec};
use crate::engine::{Engine, Phase, StepStatus};
use crate::error::{Error, invalid};
use crate::group::{Group, GroupOptions};
use crate::optimizer::{Optimizer, SamOptimizer, sealed};
use crate::phases::{self, Finish};
use crate::sam::{SamConfig, sam_second_half};

/// Host-side state of [`Wasam`] for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WasamState {
    /// Number of steps applied so far.
    pub steps: u64,
    /// Number of snapshots in each average.
    pub counts: [u64; MAX_AVERAGES],
    /// A fold is owed for a step finished with an external base optimizer.
    pub pending_fold: bool,
}

/// SAM with weight averaging (WASAM): after each step `t ≥ start_k`, average `k` takes the new
/// weights, `avg_k ← avg_k + (w − avg_k)/(n_k + 1)`, in the same pass as the step.
///
/// Several averages with different start steps can run at once (up to
/// [`MAX_AVERAGES`]); each lives in a slot of the buffers. To evaluate an average, [`swap`]
/// it in: the returned guard holds the averaged weights in the live storage (this is where a
/// framework recomputes batch-norm statistics for the averaged weights, through
/// [`Swapped::groups_mut`]) and swaps back when finished or dropped.
///
/// Reference: Kaddour et al., *When Do Flat Minima Optimizers Work?*, NeurIPS 2022,
/// <https://arxiv.org/abs/2202.00661>; upstream JeanKaddour/WASAM `wasam.py`, `swa_utils.py`
/// (conformance `verification/SCHEMA.md` §7.2).
///
/// [`swap`]: Wasam::swap
///
/// ```
/// use sam_core::{BaseRule, Group, Optimizer, Perturbation, SamConfig, SgdConfig, Wasam};
/// use sam_core::reference::SliceBuffer;
/// let mut w = [4.0_f64];
/// let mut g = [0.0];
/// let mut slots = [0.0; 3]; // backup, average 0, average 1
/// let base = BaseRule::sgd(SgdConfig { lr: 0.5, ..Default::default() })?;
/// let mut groups = [Group::new(SliceBuffer::new(&mut w, &mut g, &mut slots)?, base)];
/// let mut wasam = Wasam::new(SamConfig::from(Perturbation::sam(0.0)), &[0, 1])?;
/// for _ in 0..3 {
///     wasam.step(&mut groups, |gs| {
///         let (w, g) = gs[0].buffer.weights_and_grad();
///         g[0] = w[0]; // L = w²/2: each step halves w: 2, 1, 0.5
///         Ok::<_, sam_core::Error<_>>(())
///     })?;
/// }
/// let swapped = wasam.swap(&mut groups, 0)?;
/// assert_eq!(swapped.groups()[0].buffer.weights(), &[3.5 / 3.0]); // mean of 2, 1, 0.5
/// swapped.swap_back()?;
/// assert_eq!(groups[0].buffer.weights(), &[0.5]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Wasam {
    cfg: SamConfig,
    starts: heapless::Vec<u64, MAX_AVERAGES>,
    counts: [u64; MAX_AVERAGES],
    pending_fold: bool,
    swapped: u8,
    engine: Engine,
}

impl Wasam {
    /// WASAM around SAM/ASAM `cfg`, with one average per entry of `swa_starts` (the 0-based
    /// step from which it takes snapshots; 1 to [`MAX_AVERAGES`] entries).
    pub fn new(cfg: SamConfig, swa_starts: &[u64]) -> Result<Self, Error> {
        cfg.perturbation.validate()?;
        if swa_starts.is_empty() {
            return Err(invalid("swa_starts", "at least one average is needed"));
        }
        let starts = heapless::Vec::from_slice(swa_starts)
            .map_err(|_| invalid("swa_starts", "at most MAX_AVERAGES averages are supported"))?;
        Ok(Wasam {
            cfg,
            starts,
            counts: [0; MAX_AVERAGES],
            pending_fold: false,
            swapped: 0,
            engine: Engine::new(),
        })
    }

    /// The SAM hyperparameters.
    pub fn config(&self) -> &SamConfig {
        &self.cfg
    }

    /// The start step of each average.
    pub fn swa_starts(&self) -> &[u64] {
        &self.starts
    }

    /// The number of snapshots in each average.
    pub fn counts(&self) -> &[u64] {
        &self.counts[..self.starts.len()]
    }

    /// The fold for the step with 0-based index `t` (`None` entries for averages not started).
    fn fold_for(&self, t: u64) -> AverageFold {
        let mut fold = AverageFold::NONE;
        for (k, &start) in self.starts.iter().enumerate() {
            if t >= start {
                fold.weights[k] = Some(1.0 / (self.counts[k] as f64 + 1.0));
            }
        }
        fold
    }

    fn count_fold(&mut self, fold: &AverageFold) {
        for (c, w) in self.counts.iter_mut().zip(fold.weights.iter()) {
            if w.is_some() {
                *c = c.saturating_add(1);
            }
        }
    }

    /// The averages' slot layout for a group.
    fn slots(&self) -> impl Fn(&GroupOptions) -> SlotSpec + use<> {
        let n_avg = self.starts.len() as u8;
        move |o: &GroupOptions| phases::slots(o, true, false, n_avg)
    }

    /// The fold owed for a step finished with an external base optimizer, if any.
    fn pending(&self) -> Option<AverageFold> {
        match (self.pending_fold, self.engine.steps.checked_sub(1)) {
            (true, Some(t)) => Some(self.fold_for(t)),
            _ => None,
        }
    }

    /// Applies a pending fold. The flag is cleared first: if a backend fails part-way, no group
    /// is ever folded twice.
    fn apply_pending<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<(), Error<B::Error>> {
        if let Some(fold) = self.pending() {
            self.pending_fold = false;
            for g in groups.iter_mut() {
                g.buffer.fold_averages(&fold).map_err(Error::Backend)?;
            }
            self.count_fold(&fold);
        }
        self.pending_fold = false;
        Ok(())
    }

    /// Folds the weights into the averages if a step was finished with an external base
    /// optimizer ([`Perturbed::restore_with_gradient`](crate::Perturbed::restore_with_gradient)) and that optimizer has stepped since.
    /// Called automatically by the next step and by [`swap`](Self::swap).
    pub fn update_averages<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<(), Error<B::Error>> {
        let slots = self.slots();
        self.engine.begin(groups, slots)?;
        self.apply_pending(groups)
    }

    /// Swaps the live weights with average `k` (bit-exact) for evaluation; the guard swaps back.
    /// Fails if average `k` does not exist or holds no snapshot yet.
    pub fn swap<'a, B: ParamBuffer>(
        &'a mut self,
        groups: &'a mut [Group<B>],
        k: u8,
    ) -> Result<Swapped<'a, B>, Error<B::Error>> {
        // Decide before writing anything (a pending fold may give average k its first snapshot).
        let ki = usize::from(k);
        let snapshot_owed = self
            .pending()
            .is_some_and(|f| f.weights.get(ki).is_some_and(Option::is_some));
        if ki >= self.starts.len() || (self.counts[ki] == 0 && !snapshot_owed) {
            return Err(Error::InvalidGroups {
                message: "that average does not exist or holds no snapshot yet",
            });
        }
        self.update_averages(groups)?;
        for i in 0..groups.len() {
            if let Err(e) = groups[i].buffer.swap_average(k) {
                for g in groups[..i].iter_mut() {
                    let _ = g.buffer.swap_average(k);
                }
                return Err(Error::Backend(e));
            }
        }
        self.engine.phase = Phase::Swapped;
        self.swapped = k;
        Ok(Swapped {
            engine: &mut self.engine,
            groups,
            k,
            armed: true,
        })
    }
}

/// The averaged weights are in the live storage (see [`Wasam::swap`]). Dropping the guard swaps
/// back; [`swap_back`](Self::swap_back) does too and reports errors.
#[must_use = "dropping the guard swaps the live weights back"]
pub struct Swapped<'a, B: ParamBuffer> {
    engine: &'a mut Engine,
    groups: &'a mut [Group<B>],
    k: u8,
    armed: bool,
}

impl<B: ParamBuffer> core::fmt::Debug for Swapped<'_, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Swapped").field("average", &self.k).finish()
    }
}

impl<B: ParamBuffer> Swapped<'_, B> {
    /// The groups, holding the averaged weights.
    pub fn groups(&self) -> &[Group<B>] {
        self.groups
    }

    /// The groups, mutably: evaluate the averaged model, or recompute batch-norm statistics for
    /// it (that state belongs to the framework, not to these buffers). Writes to the weights are
    /// swapped back into the average.
    pub fn groups_mut(&mut self) -> &mut [Group<B>] {
        self.groups
    }

    /// Swaps the live weights back.
    pub fn swap_back(mut self) -> Result<(), Error<B::Error>> {
        self.undo()
    }

    fn undo(&mut self) -> Result<(), Error<B::Error>> {
        self.armed = false;
        self.engine.phase = Phase::Idle;
        let mut first = Ok(());
        for g in self.groups.iter_mut() {
            if let Err(e) = g.buffer.swap_average(self.k) {
                if first.is_ok() {
                    first = Err(Error::Backend(e));
                }
            }
        }
        first
    }
}

impl<B: ParamBuffer> Drop for Swapped<'_, B> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.undo();
        }
    }
}

impl sealed::Core for Wasam {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// SAM's first half; a fold still owed to the averages is applied once the step's checks
    /// have passed.
    fn first_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
    ) -> Result<bool, Error<B::Error>> {
        let p = self.cfg.perturbation;
        let layout = self.slots();
        let norms =
            phases::climb_norms(&mut self.engine, groups, layout, |o| p.weighting(o), false)?;
        self.apply_pending(groups)?;
        phases::climb(groups, &norms, p.eps, false, |o| (p.rho(o), p.weighting(o)))?;
        Ok(true)
    }

    fn second_half<B: ParamBuffer>(
        &mut self,
        groups: &mut [Group<B>],
        finish: Finish,
    ) -> Result<StepStatus, Error<B::Error>> {
        let fold = if finish == Finish::Base {
            self.fold_for(self.engine.steps)
        } else {
            AverageFold::NONE
        };
        let check = self.cfg.check_second_gradient;
        let status = sam_second_half(&mut self.engine, groups, finish, check, fold)?;
        if status == StepStatus::Applied {
            self.count_fold(&fold);
            self.pending_fold = finish == Finish::External;
        }
        Ok(status)
    }
}

impl Optimizer for Wasam {
    type State = WasamState;

    fn variant(&self) -> &'static str {
        "wasam"
    }

    /// The backup, the base rule's state, and the averages.
    fn slot_spec(&self, options: &GroupOptions) -> SlotSpec {
        self.slots()(options)
    }

    /// The host-side state (only between steps, not while swapped).
    fn state(&self) -> Result<WasamState, Error> {
        self.engine.expect(Phase::Idle)?;
        Ok(WasamState {
            steps: self.engine.steps,
            counts: self.counts,
            pending_fold: self.pending_fold,
        })
    }

    /// A state with a fold pending before any step is refused ([`Error::InvalidState`]).
    fn load_state(&mut self, state: &WasamState) -> Result<(), Error> {
        self.engine.expect(Phase::Idle)?;
        if state.pending_fold && state.steps == 0 {
            return Err(Error::InvalidState {
                message: "a fold cannot be pending before the first step",
            });
        }
        self.engine
            .load(&crate::engine::OptimizerState { steps: state.steps })?;
        self.counts = state.counts;
        self.pending_fold = state.pending_fold;
        Ok(())
    }

    /// Restores the live weights after a leaked [`Perturbed`](crate::Perturbed) or [`Swapped`] guard (no-op when
    /// idle).
    fn recover<B: ParamBuffer>(&mut self, groups: &mut [Group<B>]) -> Result<(), Error<B::Error>> {
        match self.engine.phase {
            Phase::Perturbed => {
                Engine::restore_all(groups)?;
                self.engine.phase = Phase::Idle;
            }
            Phase::Swapped => {
                // A leaked `Swapped` guard: swap the live weights back.
                for g in groups.iter_mut() {
                    g.buffer
                        .swap_average(self.swapped)
                        .map_err(Error::Backend)?;
                }
                self.engine.phase = Phase::Idle;
            }
            Phase::Idle => {}
        }
        Ok(())
    }
}

impl SamOptimizer for Wasam {}
