r"""The outer step of local SGD, shared by :class:`~lookahead_dist.sync.local_sgd.LocalSGD` and the
torchft strategy (:mod:`lookahead_dist.sync.ft`), and the proxy that steps a user's outer optimizer.

Note [The outer step]
---------------------
With N ranks holding fast weights :math:`\theta^{(i)}` after k inner steps from the shared slow
weights :math:`\phi`, the sync computes the *pseudo-gradient* (the average progress, negated)

.. math::
    d = \phi - \frac{1}{N}\sum_i \theta^{(i)}

and an outer SGD step with learning rate :math:`\alpha` and momentum :math:`\beta` (state
:math:`u`, zero at first):

.. math::
    \begin{aligned}
        u &\leftarrow \beta u + d \\
        \phi &\leftarrow \phi - \alpha\,(d + \beta u) \quad &\text{(nesterov=True)} \\
        \phi &\leftarrow \phi - \alpha\,u \quad &\text{(nesterov=False)} \\
        \theta^{(i)} &\leftarrow \phi \quad &\text{(every rank)}
    \end{aligned}

:math:`\beta = 0` (the default) is Lookahead's own step, :math:`\phi \leftarrow \phi +
\alpha(\bar\theta - \phi)`; with :math:`\alpha = 1` as well it is periodic model averaging
(local SGD). :math:`\beta > 0` is SlowMo's slow momentum (without its division by the inner LR:
fold that into :math:`\alpha`), and ``nesterov=True`` is the DiLoCo outer optimizer (typically
:math:`\alpha = 0.7, \beta = 0.9`). Both are exactly ``torch.optim.SGD(lr=alpha, momentum=beta,
nesterov=...)`` applied to :math:`\phi` with gradient :math:`d`.

Note [Outer optimizer]
----------------------
``outer_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True)`` is called
once, at construction, with one param-group dict per Lookahead param group. Its parameters are
*proxies*: empty tensors that, at each outer step, alias this rank's slow weights
(``proxy.data = slow``; a chunk when sharded) and get the averaged pseudo-gradient
``d = phi - mean theta`` as ``.grad``; the step updates the slow weights in place. So the
optimizer exists before the first step (build an LR scheduler on ``opt.local_sgd.outer_optimizer``
right away), survives ``load_state_dict`` (which replaces the slow tensors), and its state is keyed
by objects that never change. Its per-parameter state is mirrored into the Lookahead state under
``lookahead_outer_state_<key>`` (same tensor objects), with ``lookahead_outer_steps`` counting its
steps, so checkpoints and DCP carry it with the slow weights; template slots are allocated with the
slow weights, shaped as a twin optimizer on a 2-element probe reveals them (state of another shape
appears after the first outer step). The learning rate and other hyperparameters live in its
``param_groups``: checkpoint the LR scheduler as usual. Each bucket steps once per sync of its
fragment; tensors of other fragments have ``grad=None`` and are skipped. ``alpha`` is then unused by
the outer step (it still drives ``pullback="pullback"``). The built-in step (Note [The outer step])
equals ``SGD(lr=alpha, momentum=outer_momentum, nesterov=nesterov)`` here (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._keys import OUTER_STATE_PREFIX, OUTER_STEPS_KEY
from .._sync import local_tensor
from ._plan import shaped_like

if TYPE_CHECKING:
    from ._plan import Plan
    from .base import SyncHost

__all__ = ["OuterOptimizerProxy", "outer_step_"]


def outer_step_(slow: list[torch.Tensor], mom: list[torch.Tensor], d: list[torch.Tensor], alpha: float,
                beta: float, nesterov: bool) -> None:
    """Note [The outer step], in place on the slow weights (flat views are taken here); ``mom``
    holds the outer momenta (unused when ``beta == 0``); ``d`` may be overwritten."""
    s = [t.view(-1) for t in slow]
    if beta == 0.0:
        torch._foreach_add_(s, d, alpha=-alpha)
        return
    u = [t.view(-1) for t in mom]
    torch._foreach_mul_(u, beta)
    torch._foreach_add_(u, d)
    if nesterov:
        torch._foreach_add_(d, u, alpha=beta)
        torch._foreach_add_(s, d, alpha=-alpha)
    else:
        torch._foreach_add_(s, u, alpha=-alpha)


class OuterOptimizerProxy:
    """``outer_optimizer=`` (Note [Outer optimizer]) for :class:`~lookahead_dist.sync.local_sgd.LocalSGD`
    (a mixin: it keeps ``_proxies``, ``_outer_opt`` and ``_outer_spec`` on the strategy)."""

    def _add_outer_group(self, params: list[torch.Tensor]) -> None:
        proxies = []
        for p in params:
            if p not in self._proxies:
                local = local_tensor(p)
                self._proxies[p] = torch.empty(0, dtype=local.dtype, device=local.device)
            proxies.append(self._proxies[p])
        if self._outer_opt is None:
            opt = self.options.outer_optimizer([{"params": proxies}])
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"LocalSGDOptions `outer_optimizer` must return a torch.optim.Optimizer, got "
                                f"{type(opt).__name__}")
            self._outer_opt = opt
        else:
            self._outer_opt.add_param_group({"params": proxies})

    def _outer_placeholders(self, slow: torch.Tensor) -> dict[str, Any]:
        """Template slots for the outer optimizer's state, shaped as a probe step reveals them."""
        if self._outer_spec is None:
            self._outer_spec = {}
            try:  # a twin of the outer optimizer on a 2-element probe: which keys, which shapes
                probe = torch.zeros(2)
                opt = self._outer_opt
                popt = type(opt)([probe], **opt.defaults)
                probe.grad = torch.zeros(2)
                popt.step()
                for key, v in popt.state[probe].items():
                    if isinstance(v, torch.Tensor) and v.shape == probe.shape:
                        self._outer_spec[key] = "param"
                    elif isinstance(v, torch.Tensor) and v.dim() == 0:
                        self._outer_spec[key] = torch.zeros_like(v)
            except Exception:  # noqa: BLE001 - an optimizer that cannot step on a CPU probe: no slots
                self._outer_spec = {}
        out: dict[str, Any] = {}
        for key, kind in self._outer_spec.items():
            out[OUTER_STATE_PREFIX + key] = torch.zeros_like(slow) if kind == "param" else kind.clone()
        return out

    def _restore_outer(self, p: torch.Tensor, saved: dict[str, Any], name: str) -> dict[str, Any]:
        steps = int(saved.get(OUTER_STEPS_KEY, 0))
        device = local_tensor(p).device
        shape = self.expected_shape(p)
        out: dict[str, Any] = {OUTER_STEPS_KEY: steps}
        live: dict[str, Any] = {}
        for key, v in saved.items():
            if not (isinstance(key, str) and key.startswith(OUTER_STATE_PREFIX)):
                continue
            if isinstance(v, torch.Tensor):
                if v.dim() > 0 and v.numel() != shape.numel():
                    raise ValueError(
                        f"Lookahead checkpoint: {name} `{key}` has shape {tuple(v.shape)} where the slow weight "
                        f"has {tuple(shape)}; was it saved with another world size or sharding?")
                v = v.to(device=device, copy=True).reshape(shape) if v.dim() > 0 else v.clone()
            out[key] = v
            live[key[len(OUTER_STATE_PREFIX):]] = v
        proxy = self._proxies.get(p)
        if steps > 0 and proxy is not None and self._outer_opt is not None:
            self._outer_opt.state[proxy] = live
        for key, v in self._outer_placeholders(torch.zeros(shape, device=device)).items():
            out.setdefault(key, v)
        return out

    def _outer_user(self, host: SyncHost, plan: Plan, d: list[torch.Tensor]) -> None:
        """One step of the user's outer optimizer on the bucket's slow weights, gradient ``d``."""
        opt = self._outer_opt
        proxies = [self._proxies[p] for p in plan.params]
        for px, s, g in zip(proxies, plan.slow_t, d):
            px.data = s  # alias: the step updates the slow weight in place
            px.grad = shaped_like(g, s)
        opt.step()
        for px, p in zip(proxies, plan.params):
            px.grad = None
            entry = host.state_entry(p)
            for key, v in opt.state.get(px, {}).items():
                entry[OUTER_STATE_PREFIX + key] = v
            entry[OUTER_STEPS_KEY] = entry.get(OUTER_STEPS_KEY, 0) + 1
