"""Converting between Lookahead and plain inner-optimizer checkpoints."""

from __future__ import annotations

from typing import Any

from ._keys import is_lookahead_key

__all__ = ["strip_lookahead_state"]


def strip_lookahead_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of a :meth:`Lookahead.state_dict` with every Lookahead entry removed.

    The result is exactly the inner optimizer's own state dict, for loading into the plain inner
    optimizer. (A raw Lookahead state dict loads into it too, but its extra per-parameter entries
    then stay in the inner state, and a tensor whose only state is a slow weight would make
    Adam-style optimizers skip their lazy initialisation.) Tensors are shared, not copied.
    """
    state = {}
    for idx, s in state_dict["state"].items():
        s = {key: v for key, v in s.items() if not is_lookahead_key(key)}
        if s:
            state[idx] = s
    groups = [{key: v for key, v in g.items() if not is_lookahead_key(key)} for g in state_dict["param_groups"]]
    return {**state_dict, "state": state, "param_groups": groups}
