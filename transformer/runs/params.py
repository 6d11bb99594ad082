"""A model's parameters as a flat {name: array} dict, and putting such a dict into a model.

Names join the path of each `nnx.Param` with "/" ("decoder/layers/0/self_attention/query"): the
names of the exported model file, and of the checkpoints' parameters once flattened. A model with
stacked layers (model.scan_layers) names them "decoder/layers/self_attention/query", [L, ...];
loading converts either layout into the model's (`transformer.model.stacking`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from transformer.errors import UserError
from transformer.model.config import TransformerConfig
from transformer.model.stacking import params_in_layout
from transformer.model.transformer import create_model

FlatParams = dict[str, np.ndarray]


def model_params(model: nnx.Module) -> FlatParams:
  """The model's parameters by name (host arrays)."""
  return {
    "/".join(str(k) for k in path): np.asarray(variable.get_value())
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def state_params(params: Any) -> FlatParams:
  """A parameter tree as a flat dict: an `nnx.State` of Params, or the nested dict a checkpoint
  restores (whose Variables appear as {"value": array} levels, dropped from the names)."""
  if isinstance(params, nnx.State):
    return {
      "/".join(str(k) for k in path): np.asarray(
        leaf.get_value() if hasattr(leaf, "get_value") else leaf
      )
      for path, leaf in nnx.to_flat_state(params)
    }
  return dict(_flatten(params))


def _flatten(tree: Any, prefix: tuple[str, ...] = ()):
  if isinstance(tree, Mapping):
    for key, child in tree.items():
      leaf_value = key == "value" and not isinstance(child, Mapping)
      yield from _flatten(child, prefix if leaf_value else (*prefix, str(key)))
  else:
    yield "/".join(prefix), np.asarray(tree)


def model_shapes(task: str, config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """{name: shape} of every parameter of the task's model of `config`, by the per-layer names an
  export writes (a scanned model's are the unrolled one's), found by tracing its construction
  (`nnx.eval_shape`): nothing is allocated."""
  unrolled = config.replace(scan_layers=False)
  abstract = nnx.eval_shape(lambda: create_model(task, unrolled, seed=0))
  return {
    "/".join(str(k) for k in path): tuple(variable.shape)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }


def difference(wanted: Mapping[str, tuple[int, ...]], given: Mapping[str, Any]) -> str | None:
  """The first name that is missing, extra or of another shape, in words; None if all agree.
  `given` holds arrays, or anything with their `shape` (a file's header)."""
  missing = sorted(wanted.keys() - given.keys())
  extra = sorted(given.keys() - wanted.keys())
  reshaped = sorted(k for k in wanted.keys() & given.keys() if tuple(given[k].shape) != wanted[k])
  if missing:
    return f"parameter {missing[0]} is missing ({len(missing)} in all)"
  if reshaped:
    k = reshaped[0]
    return (
      f"parameter {k} has shape {tuple(given[k].shape)}, the model needs {wanted[k]} "
      f"({len(reshaped)} in all)"
    )
  if extra:
    return f"parameter {extra[0]} is not the model's ({len(extra)} in all)"
  return None


def load_strict(model: nnx.Module, params: Mapping[str, np.ndarray], source: str) -> None:
  """Puts `params` into `model`, which must have exactly these names and shapes: a model loaded
  for use is never partly random. A mismatch is a one-line error naming the parameter."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  wanted = {"/".join(str(k) for k in path): tuple(variable.shape) for path, variable in flat}
  params = params_in_layout(params, wanted)
  problem = difference(wanted, params)
  if problem:
    raise UserError(
      f"{source} does not fit the model: {problem}; its configuration and its "
      "parameters disagree (restore the run's files, or train again)"
    )
  for path, variable in flat:
    variable.set_value(
      jnp.asarray(np.asarray(params["/".join(str(k) for k in path)]), variable.dtype)
    )
  nnx.update(model, state)


def load_matching(model: nnx.Module, params: Mapping[str, np.ndarray]) -> tuple[int, list[str]]:
  """Copies every parameter whose name and shape match into `model` (a warm start: a new head
  keeps its fresh initialisation); returns (how many were copied, names left fresh)."""
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  params = params_in_layout(params, ("/".join(str(k) for k in path) for path, _ in flat))
  copied, fresh = 0, []
  for path, variable in flat:
    name = "/".join(str(k) for k in path)
    value = params.get(name)
    if value is not None and tuple(value.shape) == tuple(variable.shape):
      variable.set_value(jnp.asarray(np.asarray(value), variable.dtype))
      copied += 1
    else:
      fresh.append(name)
  nnx.update(model, state)
  return copied, fresh
