"""A transform used the other way round: :class:`Inverted`.

Which direction of a transform is fast decides where it belongs in a flow: the density
direction (data -> base) for maximum likelihood, the sampling direction (base -> data) for
variational inference. :class:`~pyroflows.transforms.MaskedAutoregressive` chooses with its
``orientation``; :class:`Inverted` gives the same choice to any transform, e.g. a BNAF or a
residual block whose network evaluation is to be the density direction.
"""

from __future__ import annotations

from .base import FlowTransform

__all__ = ["Inverted"]


class Inverted(FlowTransform):
    """``transform`` with its directions swapped: ``Inverted(t)(x) = t⁻¹(x)``.

    The forward map is the wrapped transform's inverse and the inverse its forward map, with
    log|det J| negated; the parameters are the wrapped module's (shared, not copied), and the
    context, when there is one, is passed on. Which direction is fast swaps with it: a
    transform whose forward pass is one network evaluation and whose inverse is numerical (a
    BNAF, a residual block) becomes one whose *inverse* is the network evaluation, i.e. the
    density direction of a flow. Its own inverse is the wrapped forward map, a closed form:
    ``inverse_kind`` is ``"exact"``.

    Args:
        transform: a :class:`FlowTransform` over vectors (``event_dim = 1``) that does not change
            the event shape, with an inverse (``inverse_kind`` not ``"none"``).

    Shapes:
        As the wrapped transform: ``(*batch, dim)`` in and out, log|det J| of shape ``batch``.

    Example:
        >>> import torch
        >>> from pyroflows.transforms import ElementwiseAffine, Inverted
        >>> t = ElementwiseAffine(2)
        >>> with torch.no_grad():
        ...     _ = t.log_scale.fill_(1.0)
        >>> x = torch.ones(2)
        >>> torch.allclose(Inverted(t)(t(x)), x)
        True
        >>> float(Inverted(t).log_abs_det_jacobian(x, t.inv(x)))  # -2 * 1.0
        -2.0
    """

    def __init__(self, transform: FlowTransform) -> None:
        if not isinstance(transform, FlowTransform):
            raise TypeError(
                f"transform: expected a pyroflows FlowTransform; got {type(transform).__name__}"
            )
        if transform.domain.event_dim != 1 or transform.codomain.event_dim != 1:
            raise ValueError(
                f"transform: expected a transform of vectors (event_dim 1); got "
                f"{type(transform).__name__} with event_dim {transform.domain.event_dim}"
            )
        if transform.inverse_kind == "none":
            raise ValueError(
                f"transform: {type(transform).__name__} has no inverse (inverse_kind='none'), "
                "so it cannot be used the other way round"
            )
        super().__init__(transform.event_shape, transform.context_dim)
        self.transform = transform
        self.domain = transform.codomain
        self.codomain = transform.domain
        self.inverse_kind = "exact"  # the wrapped forward map
        if hasattr(transform, "sign"):
            self._sign = transform.sign

    @property
    def sign(self) -> int:
        if not hasattr(self, "_sign"):
            raise AttributeError(f"{type(self.transform).__name__} declares no sign of det J")
        return self._sign

    def _forward_and_log_det(self, x, context):
        return self.transform._inverse_and_log_det(x, context)

    def _inverse_and_log_det(self, y, context):
        return self.transform._forward_and_log_det(y, context)

    def _log_abs_det(self, x, y, context):
        return -self.transform._log_abs_det(y, x, context)
