"""Orbax checkpoints of the train state and the grain data-iterator state, for exact resume.

Layout: ``{workdir}/checkpoints/{step}/{state,data}``. ``state`` is the TrainState pytree
(params + optimizer + step); ``data`` is the grain iterator position, so a resumed run sees the
same batches, in the same order, as an uninterrupted one. :func:`restore_params` reads a trained
model back for inference (``config.json`` + the params of ``state``, not the optimizer).
"""

from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def manager(workdir: str, train_cfg) -> ocp.CheckpointManager:
  """A CheckpointManager over ``{workdir}/checkpoints`` keeping ``train.max_checkpoints``."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=train_cfg.max_checkpoints, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, "checkpoints")),
    options=options,
    item_names=("state", "data"),
  )


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  """Saves state and iterator position at ``step`` (blocking)."""
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
    ),
    force=True,
  )
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, state, data_iterator):
  """Restores the latest checkpoint into the shardings of ``state`` and into ``data_iterator``.

  Returns:
    (state, step) — ``state`` unchanged and step None when the directory has no checkpoint.
  """
  step = mngr.latest_step()
  if step is None:
    return state, None
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)
    ),
  )
  return restored["state"], step


def _merge_config(base, loaded: dict):
  """``base`` (ConfigDict) overridden by the JSON values of ``loaded``; new keys are added.

  JSON turns tuples into lists; where the default is a tuple the value becomes a tuple again.
  """
  for key, value in loaded.items():
    if isinstance(value, dict) and key in base and isinstance(base[key], ml_collections.ConfigDict):
      _merge_config(base[key], value)
      continue
    default = base.get(key) if key in base else None
    if isinstance(value, list) and isinstance(default, tuple):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    with base.ignore_type():
      base[key] = value
  return base


def load_config(workdir: str):
  """The config a workdir was trained with (``{workdir}/config.json``, on ``base_config()``).

  Raises:
    FileNotFoundError: no ``config.json`` (not a ``mod-jax train`` workdir).
  """
  from mod_jax.config import base_config

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist: --workdir must be a directory written by "
      f"`mod-jax train` (config.json + checkpoints/)."
    )
  with open(path) as f:
    return _merge_config(base_config(), json.load(f))


def restore_params(workdir: str, step: int | None = None):
  """Restores a trained model's parameters from a ``mod-jax train`` workdir, for inference.

  Only the ``params`` subtree of the saved TrainState is read (no optimizer state), onto the
  first local device.

  Args:
    workdir: directory with ``config.json`` and ``checkpoints/``.
    step: checkpoint step; None takes the latest.

  Returns:
    ``(config, graphdef, params, step)``: the training config, the model's ``nnx`` graphdef and
    ``nnx.State`` of ``nnx.Param`` (``nnx.merge(graphdef, params)`` is the model).

  Raises:
    FileNotFoundError: no ``config.json``, no checkpoint, or no checkpoint at ``step``.
  """
  from flax import nnx

  from mod_jax.model.factory import build_model

  config = load_config(workdir)
  root = os.path.abspath(os.path.join(workdir, "checkpoints"))
  steps = []
  if os.path.isdir(root):
    mngr = ocp.CheckpointManager(
      root, options=ocp.CheckpointManagerOptions(read_only=True), item_names=("state",)
    )
    steps = list(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(
      f"no checkpoint in {root}; train first (mod-jax train --workdir {workdir})."
    )
  step = max(steps) if step is None else int(step)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {root}; available: {sorted(steps)}.")
  graphdef, abstract = nnx.split(
    nnx.eval_shape(lambda: build_model(config.model, rngs=config.seed)), nnx.Param
  )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {
    "params": jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
    )
  }
  restored = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
    os.path.join(root, str(step), "state"),
    args=ocp.args.PyTreeRestore(
      item=target,
      restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True,
    ),
  )
  return config, graphdef, restored["params"], step
