"""One optimiser step of any loss, eager or compiled: :class:`Step` (and :class:`TrainStep`,
the maximum-likelihood step of a flow on its own)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .losses import Loss, NegativeLogLikelihood
from .optim import PyroOptimizer, make_optimizer

__all__ = ["Step", "TrainStep"]


class _LossModule(nn.Module):
    """A loss as a module over its model's parameters, so that
    ``DistributedDataParallel`` can wrap it (its forward is the loss)."""

    def __init__(self, loss: Loss, module: nn.Module) -> None:
        super().__init__()
        self.model = module
        self.__dict__["loss"] = loss  # not a submodule: the loss is not an nn.Module

    def forward(self, *inputs: Any) -> torch.Tensor:
        return self.loss(*inputs)


class Step:
    """One optimiser step: the loss, its gradient, clipping and the optimiser's update.

    ``step(*inputs)`` zeroes the gradients, computes ``loss(*inputs)`` and back-propagates it
    (:meth:`~pyroflows.engine.Loss.backward`), clips the gradient norm over
    ``loss.parameters()`` when ``clip_grad`` is set, and steps the optimiser; it returns the loss
    before the step as a detached 0-d tensor (reading it with ``float()`` waits for a GPU, so
    read it only when needed).

    **Compiled steps.** ``compile=True`` runs the loss and its gradient through
    ``torch.compile``, which fuses the elementwise work of every layer. On CUDA it also records
    the whole step (loss, backward, clipping and the optimiser's update) as one CUDA graph after
    :attr:`WARMUP` ordinary steps, and from then on replays it for every batch of the same shape:
    one launch per step instead of hundreds, which is what small batches are bound by. The
    optimiser's param groups are switched to ``capturable`` with a tensor learning rate for that
    (LR schedulers update it in place). A batch of another shape takes an ordinary compiled
    step (compiling once more). A string is passed to ``torch.compile`` as its ``mode`` instead
    (e.g. ``"reduce-overhead"``: torch's own CUDA graphs of the loss and its gradient, without
    the optimiser). The first call always runs eagerly, so that data-dependent initialisation
    such as :class:`~pyroflows.transforms.ActNorm`'s happens outside any graph; compiling takes
    seconds to a minute. Compiling needs a loss computed by torch alone (not a Pyro ELBO, which
    computes its gradients itself).

    **Data-parallel steps.** :func:`~pyroflows.engine.train` calls :meth:`distribute` under a
    process group (:mod:`pyroflows.engine.distributed`): a loss over a module
    (:attr:`Loss.module`, e.g. a flow's NLL) then runs through ``DistributedDataParallel``, and
    the gradients of any other loss (a Pyro ELBO's, on the param store) are averaged across
    ranks after its backward pass; clipping and the optimiser then see the averaged gradient
    on every rank. Compiled steps compile through the DDP module (torch's compiled DDP); no
    CUDA graph is recorded under a process group.

    Args:
        loss: the :class:`~pyroflows.engine.Loss`.
        optimizer: a torch optimiser over ``loss.parameters()`` (or a
            :class:`~pyroflows.engine.PyroOptimizer`).
        clip_grad: maximum gradient norm, ``None`` for no clipping.
        compile: ``False``, ``True`` or a ``torch.compile`` mode.

    Example:
        >>> import torch, pyroflows as pf
        >>> from pyroflows.engine import NegativeLogLikelihood, Step
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.MAF(dim=2, layers=2, hidden=(16, 16))
        >>> step = Step(NegativeLogLikelihood(flow), torch.optim.Adam(flow.parameters(), 1e-2))
        >>> data = torch.randn(256, 2) * 0.5 + 1.0
        >>> first = step(data, None)
        >>> for _ in range(50):
        ...     last = step(data, None)
        >>> bool(last < first)
        True
    """

    #: ordinary (compiled) steps before a CUDA graph is recorded
    WARMUP = 3

    def __init__(
        self,
        loss: Loss,
        optimizer: torch.optim.Optimizer | PyroOptimizer,
        clip_grad: float | None = None,
        compile: bool | str = False,
    ) -> None:
        if clip_grad is not None and not clip_grad > 0:
            raise ValueError(f"clip_grad: expected a positive number or None; got {clip_grad!r}")
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile: expected a bool or a torch.compile mode; got {compile!r}")
        if compile and type(loss).backward is not Loss.backward:
            raise ValueError(
                f"compile: {type(loss).__name__} computes its gradients outside torch "
                "(e.g. a Pyro ELBO) and cannot be compiled; use compile=False"
            )
        if compile and loss.not_compilable is not None:
            raise ValueError(f"compile: {type(loss).__name__}: {loss.not_compilable}")
        self.loss = loss
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.compile = compile
        self.calls = 0
        self._compiled: Callable | None = None
        self._capture: bool | None = None  # decided on the first call, from the device
        self._graph: tuple | None = None  # (graph, static inputs, static loss)
        self.distributed: Any = None  # a Distributed once distribute() is called
        self._ddp: nn.Module | None = None

    def distribute(self, distributed: Any) -> None:
        """Train data-parallel on ``distributed`` (a
        :class:`~pyroflows.engine.distributed.Distributed`) from the next step on: call it after
        data-dependent initialisation, with the parameters already equal on every rank."""
        self.distributed = distributed
        self._capture = False  # collectives are not recorded in CUDA graphs here
        module = self.loss.module
        if module is not None and type(self.loss).backward is Loss.backward:
            self._ddp = distributed.wrap(_LossModule(self.loss, module))

    def _forward(self, *inputs: Any) -> torch.Tensor:
        if self._ddp is not None:
            return self._ddp(*inputs)
        return self.loss(*inputs)

    def _loss_fn(self) -> Callable:
        if self._compiled is None:
            mode = self.compile if isinstance(self.compile, str) else None
            # torch.compile keeps compiled variants on the function's code object, which every
            # Step would share (a few flows would exhaust dynamo's recompile limit and fall back
            # to eager silently): each step compiles its own copy.
            fn = Step._forward
            own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)
            self._compiled = torch.compile(types.MethodType(own, self), mode=mode, dynamic=False)
        return self._compiled

    def _update(self) -> None:
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.loss.parameters(), self.clip_grad)
        self.optimizer.step()

    def _step(self, inputs: tuple) -> torch.Tensor:
        # Once a graph is recorded, the gradients live in its memory: zero them in place.
        self.optimizer.zero_grad(set_to_none=self._graph is None)
        compiled = self.compile and self.calls > 0
        if compiled or self._ddp is not None:  # the loss through torch.compile and/or DDP
            loss = (self._loss_fn() if compiled else self._forward)(*inputs)
            loss.backward()
            loss = loss.detach()
        else:
            loss = self.loss.backward(*inputs)
        if self.distributed is not None and self._ddp is None:
            self.distributed.average_gradients(self.loss.parameters())
        self._update()
        return loss

    def _prepare_capture(self, device: torch.device | None) -> None:
        self._capture = self.compile is True and device is not None and device.type == "cuda"
        if not self._capture:
            return
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
                if not torch.is_tensor(group["lr"]):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)

    def _record(self, inputs: tuple) -> None:
        static = tuple(v.clone() if torch.is_tensor(v) else v for v in inputs)
        fn = self._loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = fn(*static)
            loss.backward()
            self._update()
        self._graph = (graph, static, loss.detach())

    def _device(self) -> torch.device | None:
        params = self.loss.parameters()
        return params[0].device if params else None

    def __call__(self, *inputs: Any) -> torch.Tensor:
        if self._capture is None:
            self._prepare_capture(self._device())
        if self._capture and self.calls > 0:
            return self._captured(inputs)
        loss = self._step(inputs)
        self.calls += 1
        return loss

    def _captured(self, inputs: tuple) -> torch.Tensor:
        graph = self._graph
        if graph is None and self.calls > self.WARMUP:
            self._record(inputs)
            graph = self._graph
        shapes = [tuple(v.shape) if torch.is_tensor(v) else v for v in inputs]
        if graph is not None and shapes == [
            tuple(v.shape) if torch.is_tensor(v) else v for v in graph[1]
        ]:
            for static, value in zip(graph[1], inputs, strict=True):
                if torch.is_tensor(static):
                    static.copy_(value)
            graph[0].replay()
            self.calls += 1
            return graph[2].clone()
        if graph is None:
            # Warm-up steps run on a side stream, as CUDA graph capture requires.
            device = self._device()
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                loss = self._step(inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.calls += 1
            return loss
        loss = self._step(inputs)
        self.calls += 1
        return loss


class TrainStep(Step):
    """One maximum-likelihood optimiser step of a flow on a minibatch: the body of ``pf.fit``.

    ``step(x)`` (``step(x, context)`` for a conditional flow) computes the mean negative
    log-likelihood of the batch (:class:`~pyroflows.engine.NegativeLogLikelihood`),
    back-propagates, clips the gradient norm (when ``clip_grad`` is set) and steps the optimiser;
    it returns the loss before the step as a detached 0-d tensor. The batch's shape is checked,
    its values are not (:func:`~pyroflows.fit` checks its data once, up front); a batch with NaN
    or inf gives a non-finite loss. ``compile`` works as for :class:`Step` (on CUDA, one CUDA
    graph of the whole step). The default optimiser is Adam with its fused implementation where
    torch has it.

    Args:
        flow: the flow to train (in place).
        optimizer: ``"adam"``, ``"adamw"``, a callable ``params -> torch.optim.Optimizer``, or an
            optimizer already built over the flow's parameters.
        lr: learning rate (of ``"adam"``/``"adamw"``).
        weight_decay: weight decay (of ``"adam"``/``"adamw"``).
        clip_grad: maximum gradient norm, ``None`` for no clipping.
        compile: ``False``, ``True`` or a ``torch.compile`` mode.

    Shapes:
        ``x``: ``(batch, *flow.event_shape)`` (``(batch, dim)`` for vectors); ``context``:
        ``(batch, context_dim)``; returns a 0-d tensor.

    Example:
        >>> import torch, pyroflows as pf
        >>> _ = torch.manual_seed(0)
        >>> flow = pf.MAF(dim=2, layers=2, hidden=(16, 16))
        >>> step = pf.TrainStep(flow, lr=1e-2)
        >>> data = torch.randn(256, 2) * 0.5 + 1.0
        >>> first = step(data)
        >>> for _ in range(50):
        ...     last = step(data)
        >>> bool(last < first)
        True
    """

    def __init__(
        self,
        flow: Any,
        optimizer: str | Callable | torch.optim.Optimizer = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        clip_grad: float | None = None,
        compile: bool | str = False,
    ) -> None:
        from ..flows import Flow

        if not isinstance(flow, Flow):
            raise TypeError(f"flow: expected a pyroflows Flow; got {type(flow).__name__}")
        if not lr > 0:
            raise ValueError(f"lr: expected a positive number; got {lr!r}")
        loss = NegativeLogLikelihood(flow)
        opt = make_optimizer(optimizer, loss.parameters(), lr, weight_decay)
        super().__init__(loss, opt, clip_grad=clip_grad, compile=compile)
        self.flow = flow

    @property
    def params(self) -> list[torch.Tensor]:
        """The trained parameters (those of the flow that require grad)."""
        return self.loss.parameters()

    def __call__(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        flow = self.flow
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != flow.event_shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            expected = ", ".join(map(str, flow.event_shape))
            raise ValueError(
                f"TrainStep: expected a batch of shape (batch, {expected}); got {shape}"
            )
        if flow.context_dim and (context is None or context.shape != (len(x), flow.context_dim)):
            shape = None if context is None else tuple(context.shape)
            raise ValueError(
                f"TrainStep: expected a context of shape ({len(x)}, {flow.context_dim}) for the "
                f"conditional flow; got {shape}"
            )
        return super().__call__(x, context)
