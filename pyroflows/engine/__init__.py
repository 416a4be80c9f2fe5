"""The training engine: one loop for every way pyroflows trains.

:func:`pyroflows.fit` (maximum likelihood), :func:`pyroflows.infer.fit_svi` (a Pyro ELBO on a
model and a guide) and :func:`pyroflows.infer.fit_target` (reverse KL to an unnormalised
density) are short front-ends: each checks its arguments, builds a **loss** and a **minibatch
source**, and runs :func:`train`. The pieces, one concept per module:

* :mod:`~pyroflows.engine.losses`: what is minimised, as objects (:class:`Loss` and its
  implementations :class:`NegativeLogLikelihood`, :class:`ReverseKL`, :class:`SVILoss`,
  :class:`FlowMatching`). A new way to train is a new loss.
* :mod:`~pyroflows.engine.step`: one optimiser step of any loss, eager or compiled
  (:class:`Step`; :class:`TrainStep` is the maximum-likelihood step of a flow, public since
  0.1).
* :mod:`~pyroflows.engine.optim`: optimisers by name and the one learning-rate
  :func:`schedule` (warmup, then cosine), and :class:`PyroOptimizer` for ``pyro.optim``.
* :mod:`~pyroflows.engine.sources`: minibatches (:class:`Batches`: epochs over tensors;
  :class:`Chunks`: validation data; :class:`NoData`) and the checks data pass first.
* :mod:`~pyroflows.engine.checkpoint`: one checkpoint format with one version number
  (:class:`Checkpoint`), refused with :class:`CheckpointError` when unusable.
* :mod:`~pyroflows.engine.distributed`: data-parallel training on ``torch.distributed``
  (:class:`Distributed`: sharded epochs, DistributedDataParallel, reduced losses and
  validation, rank-0 files), used by every front-end under ``torchrun``.
* :mod:`~pyroflows.engine.loop`: the loop itself (:func:`train`): steps, the divergence guard,
  validation with early stopping and the best state, checkpoints and resuming, progress and
  callbacks; and what it returns (:class:`History`, :class:`TrainingDiverged`).

Example:
    A loop of your own from the engine's pieces (what ``pf.fit`` does, without validation):

    >>> import torch, pyroflows as pf
    >>> from pyroflows import engine
    >>> _ = torch.manual_seed(0)
    >>> flow = pf.MAF(dim=2, layers=2, hidden=(16, 16))
    >>> loss = engine.NegativeLogLikelihood(flow)
    >>> opt = engine.make_optimizer("adam", loss.parameters(), lr=1e-2)
    >>> step = engine.Step(loss, opt, clip_grad=10.0)
    >>> source = engine.Batches((torch.randn(512, 2) + 3.0,), 128, torch.Generator())
    >>> history = engine.train(step, source, 100, schedule=engine.schedule(opt, 100),
    ...                        progress=False)
    >>> history.steps, history.train_loss[-1] < history.train_loss[0]
    (100, True)
"""

from .checkpoint import Checkpoint, CheckpointError, name_of
from .distributed import Distributed, DistributedError
from .loop import DIVERGENCE, SYNC_EVERY, History, TrainingDiverged, train
from .losses import FlowMatching, Loss, NegativeLogLikelihood, ReverseKL, SVILoss
from .optim import PyroOptimizer, make_optimizer, make_pyro_optimizer, schedule
from .sources import Batch, Batches, Chunks, NoData
from .step import Step, TrainStep

__all__ = [
    "DIVERGENCE",
    "SYNC_EVERY",
    "Batch",
    "Batches",
    "Checkpoint",
    "CheckpointError",
    "Chunks",
    "Distributed",
    "DistributedError",
    "FlowMatching",
    "History",
    "Loss",
    "NegativeLogLikelihood",
    "NoData",
    "PyroOptimizer",
    "ReverseKL",
    "SVILoss",
    "Step",
    "TrainStep",
    "TrainingDiverged",
    "make_optimizer",
    "make_pyro_optimizer",
    "name_of",
    "schedule",
    "train",
]
