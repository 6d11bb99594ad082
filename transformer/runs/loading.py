"""Reading a run's parameters: the newest checkpoint's, copied into a model by name and shape."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from transformer.runs.checkpoint import Checkpointer

log = logging.getLogger(__name__)


def latest_params(workdir: str | Path) -> dict:
  """The newest checkpoint's parameters of another run, as a nested dict of NumPy arrays."""
  directory = Path(workdir).absolute() / "checkpoints"
  steps = []
  if directory.is_dir():
    # Orbax's own listing: it leaves out the temporary directories of unfinished saves
    # ("8.orbax-checkpoint-tmp-<time>"), which a glob for digits would take for steps.
    listing = Checkpointer(directory, read_only=True)
    steps = listing.steps()
    listing.close()
  if not steps:
    raise FileNotFoundError(f"init_from: no checkpoint in {directory}: train that run first")
  path = directory / str(steps[-1]) / "state"
  checkpointer = ocp.StandardCheckpointer()
  # Restore onto this host's first device, whatever mesh the other run was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata.tree)
    return checkpointer.restore(path, target)["params"]
  finally:
    checkpointer.close()


def load_params_into(model: nnx.Module, workdir: str | Path) -> None:
  """Copies every parameter whose path and shape match from `workdir`'s latest checkpoint.

  A pre-trained decoder-only or encoder-only model can so start a fine-tuning run; parameters
  the source lacks (e.g. a new classification head) keep their fresh initialisation.
  """
  source = dict(_flatten(latest_params(workdir)))
  params = nnx.state(model, nnx.Param)
  copied, fresh = 0, []
  for path, variable in nnx.to_flat_state(params):
    key = tuple(str(p) for p in path)
    value = source.get(key)
    if value is not None and value.shape == variable.shape:
      variable.set_value(value.astype(variable.dtype))
      copied += 1
    else:
      fresh.append("/".join(key))
  nnx.update(model, params)
  log.info("init_from %s: %d parameters copied, %d initialised fresh%s", workdir, copied,
           len(fresh), f" ({', '.join(fresh[:5])}...)" if fresh else "")
  if copied == 0:
    raise ValueError(f"init_from {workdir}: no parameter matches this model's names and shapes; "
                     "check that both runs use the same model sizes")


def _flatten(tree, prefix=()):
  """(path of str keys, array) pairs of a restored nested dict; a Variable's "value" level
  is dropped so paths match `nnx.to_flat_state`."""
  if isinstance(tree, dict):
    for key, child in tree.items():
      leaf_value = key == "value" and not isinstance(child, dict)
      yield from _flatten(child, prefix if leaf_value else prefix + (str(key),))
  else:
    yield prefix, np.asarray(tree)

