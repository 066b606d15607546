//! `sam-mpi`: [`sam_core::collective::Collective`] over an MPI communicator (the `mpi` crate,
//! over the system's Open MPI or MPICH), for data-parallel SAM on CPUs.
//!
//! Every worker (MPI process) wraps each of its groups in a
//! [`Distributed`](sam_core::collective::Distributed) over one [`MpiCollective`] and steps them
//! with the same optimizer; the backward pass averages the gradients as the chosen
//! [`SyncPolicy`](sam_core::collective::SyncPolicy) says, with [`MpiCollective::average`].
//!
//! - [`sum`](Collective::sum) gathers the few scalars of every worker
//!   (`MPI_Allgather`) and adds them in rank order on each worker: the same bits everywhere, in
//!   the order that makes a sharded step reproducible (`sam_core::collective`'s docs);
//! - [`max`](Collective::max) is `MPI_Allreduce` with `MPI_MAX` (exact in any order);
//! - [`MpiCollective::average`] is `MPI_Allreduce` with `MPI_SUM` over the gradient, then a
//!   division by the worker count, in the gradient's type.
//!
//! Errors: the MPI library's default error handler aborts every process of the job when a
//! call fails or a process dies (`mpirun` reports which), so the calls return no error and no
//! worker hangs on a lost peer. Run with `mpirun -np N` (the tests in `tests/mpirun.rs` do).

#![deny(missing_docs)]

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::topology::Communicator;
use sam_core::collective::Collective;

/// The collective of a data-parallel run over the processes of an MPI communicator.
#[derive(Debug)]
pub struct MpiCollective<'c, C> {
    comm: &'c C,
}

impl<'c, C: Communicator> MpiCollective<'c, C> {
    /// The collective over `comm`'s processes (for example `universe.world()`).
    pub fn new(comm: &'c C) -> Self {
        MpiCollective { comm }
    }

    /// `g ← mean of g over the processes`: an `MPI_Allreduce` sum in `T`, then a division by
    /// the process count (the backward pass's gradient averaging).
    pub fn average<T>(&self, g: &mut [T])
    where
        T: Equivalence + Copy + core::ops::Div<Output = T> + From<u16>,
    {
        let send = g.to_vec();
        self.comm
            .all_reduce_into(&send[..], g, SystemOperation::sum());
        let n = T::from(u16::try_from(self.comm.size()).unwrap_or(u16::MAX));
        for v in g.iter_mut() {
            *v = *v / n;
        }
    }
}

impl<C: Communicator> Collective for MpiCollective<'_, C> {
    type Error = core::convert::Infallible;

    fn rank(&self) -> usize {
        usize::try_from(self.comm.rank()).unwrap_or(0)
    }

    fn workers(&self) -> usize {
        usize::try_from(self.comm.size()).unwrap_or(1)
    }

    fn sum(&self, x: &mut [f64]) -> Result<(), Self::Error> {
        let len = x.len();
        let mut all = vec![0.0; len * self.workers()];
        self.comm.all_gather_into(&x[..], &mut all[..]);
        for (i, v) in x.iter_mut().enumerate() {
            *v = all[i];
            for part in all.chunks_exact(len.max(1)).skip(1) {
                *v += part[i];
            }
        }
        Ok(())
    }

    fn max(&self, x: &mut [f64]) -> Result<(), Self::Error> {
        let send = x.to_vec();
        self.comm
            .all_reduce_into(&send[..], x, SystemOperation::max());
        Ok(())
    }
}
