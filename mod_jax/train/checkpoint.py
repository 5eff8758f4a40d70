"""Orbax checkpoints of the train state and the grain data-iterator state, for exact resume.

Layout: ``{workdir}/checkpoints/{step}/{state,data}``. ``state`` is the TrainState pytree
(params + optimizer + step); ``data`` is the grain iterator position, so a resumed run sees the
same batches, in the same order, as an uninterrupted one.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: str, train_cfg) -> ocp.CheckpointManager:
  """A CheckpointManager over ``{workdir}/checkpoints`` keeping ``train.max_checkpoints``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=train_cfg.max_checkpoints, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  """Saves state and iterator position at ``step`` (blocking)."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
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
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored["state"], step
