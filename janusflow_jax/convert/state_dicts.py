"""State dicts held in memory (torch tensors from a `.pth` / `model.state_dict()`, or numpy arrays) run through
`convert/tensors.py`'s rules into nested parameter trees and back. Used by the OmniMamba tables (`convert/dinosiglip.py`,
`convert/vq.py`), whose sources are torch pickles and live timm / LlamaGen modules rather than safetensors files."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from janusflow_jax.convert.tensors import (CheckpointMismatchError, Rule, StateDict, export_tensors, flatten,
                                           import_tensors, numpy_dtype, torch_to_numpy)


class _NumpyView(Mapping):
    """Torch tensors seen as numpy arrays, converted one at a time on access (bf16 included; no second copy of a
    whole release)."""

    def __init__(self, state: Mapping):
        self._state = state

    def __getitem__(self, key):
        value = self._state[key]
        return torch_to_numpy(value) if hasattr(value, "detach") else value

    def __iter__(self):
        return iter(self._state)

    def __len__(self):
        return len(self._state)

    def __contains__(self, key):
        return key in self._state


def as_numpy_state(state: Mapping) -> Mapping[str, np.ndarray]:
    return state if isinstance(state, StateDict) else _NumpyView(state)


def import_params(state: Mapping, rules: Iterable[Rule], expected: Mapping[str, tuple], param_dtype: str,
                  source: str, prefix: str = "", ignore: Callable[[str], bool] = lambda key: False) -> dict:
    """`tensors.import_tensors` over `state` (keys under `prefix`; others ignored) -> a nested parameter tree."""
    flat = import_tensors(as_numpy_state(state), rules, expected, numpy_dtype(param_dtype), source=source,
                          strip=prefix, ignore=ignore)
    return traverse_util.unflatten_dict(flat, sep="/")


def export_params(params, rules: Iterable[Rule], dtype: str | None = None) -> dict[str, np.ndarray]:
    """A parameter tree -> {torch key: array} by `rules`; a parameter no rule covers is an error."""
    rules = list(rules)
    flat = {k: np.asarray(v) for k, v in flatten(jax.device_get(nn.unbox(params))).items()}
    known = {r[0] for r in rules}
    extra = [(k, flat[k].shape) for k in flat if k not in known]
    if extra:
        raise CheckpointMismatchError("<jax params>", unexpected=extra)
    return export_tensors(flat, rules, None if dtype is None else numpy_dtype(dtype))
