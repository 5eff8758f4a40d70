"""The training checkpoint: what training changes, saved asynchronously with Orbax, for exact resume.

Layout: ``{workdir}/checkpoints/{step}/{state,data,base}`` (``workdir`` may be ``gs://...``:
paths go through ``etils.epath``, as Orbax's do).

* ``state``: ``{"step", "trainable", "opt_state"}``: the step counter, the **trainable**
  parameters only (``trainable_labels``: LoRA adapters, connector, routers, a trainable tower),
  as a nested dict keyed by parameter path, and the optimizer state (its moments exist for
  trainable parameters only).
* ``data``: the grain iterator position of every process (one file per process), so a resumed
  run sees the same batches, in the same order, as an uninterrupted one.
* ``base``: a JSON reference to the frozen weights the run started from (:func:`base_reference`):
  ``model.init_from``, ``model.vision.init_from`` and the init seed. Frozen parameters never
  change, so they are rebuilt from this reference, not saved at every step (16 GB of Llama-3-8B
  weights per save otherwise).

Restoring = build the step-0 state (seed, then ``init_from``), then overlay ``state``:
:func:`restore_latest` for training, :func:`restore_trainable` for a model read back for
inference (``mod_jax.convert.pretrained.restore_params``).
"""

from __future__ import annotations

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from mod_jax.config import ConfigError

ITEMS = ("state", "data", "base")


def _name(path) -> str:
  """'llm/stacks/0/attn/q/value' for a jax key path."""
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _nest(flat: dict) -> dict:
  tree: dict = {}
  for name, leaf in flat.items():
    node = tree
    *heads, last = name.split("/")
    for h in heads:
      node = node.setdefault(h, {})
    node[last] = leaf
  return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def trainable_params(params, labels) -> dict:
  """The ``'train'``-labelled leaves of ``params`` (an ``nnx.State``) as a nested dict of arrays
  keyed by parameter path (``{'connector': {'fc1': {'bias': {'value': array}}}}``)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = [_name(p) for p, _ in flat]
  return _nest(
    {n: x for n, (_, x), lab in zip(names, flat, jax.tree.leaves(labels)) if lab == "train"}
  )


def with_trainable(params, trainable: dict):
  """``params`` with the leaves named in ``trainable`` (nested dict) replaced.

  Raises:
    ValueError: ``trainable`` names a parameter ``params`` lacks, or a leaf of another shape.
  """
  flat = _flatten(trainable)
  seen = set()

  def put(path, x):
    name = _name(path)
    if name not in flat:
      return x
    seen.add(name)
    if tuple(flat[name].shape) != tuple(x.shape):
      raise ValueError(
        f"checkpoint parameter {name!r} has shape {tuple(flat[name].shape)}, the model "
        f"{tuple(x.shape)}; the checkpoint belongs to another model config."
      )
    return flat[name]

  out = jax.tree_util.tree_map_with_path(put, params)
  if missing := sorted(set(flat) - seen):
    raise ValueError(
      f"checkpoint parameters {missing[:5]} (of {len(missing)}) are not in the model."
    )
  return out


def base_reference(config) -> dict:
  """The frozen weights a run starts from: ``{"init_from", "vision_init_from", "seed"}``."""
  m = config.model
  return {
    "init_from": m.get("init_from") or None,
    "vision_init_from": m.vision.get("init_from") or None,
    "seed": int(config.seed),
  }


def manager(workdir: str, train_cfg, *, read_only: bool = False) -> ocp.CheckpointManager:
  """An asynchronous CheckpointManager over ``{workdir}/checkpoints`` keeping
  ``train.max_checkpoints`` (``read_only``: for readers, never creates or deletes)."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=None if read_only else train_cfg.max_checkpoints,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=not read_only,
  )
  return ocp.CheckpointManager(
    epath.Path(workdir) / "checkpoints", options=options, item_names=ITEMS
  )


def save(mngr: ocp.CheckpointManager, step: int, state, labels, data_iterator, base: dict) -> None:
  """Starts saving ``step`` and returns once the arrays are copied off the devices.

  The write continues in the background; the next :func:`save` or ``mngr.wait_until_finished()``
  waits for it. Saves trainable parameters, optimizer state, step, the data iterator and the
  base reference (module docstring); ``data_iterator`` None saves no data state.
  """
  item = {
    "step": state.step,
    "trainable": trainable_params(state.params, labels),
    "opt_state": state.opt_state,
  }
  args = {"state": ocp.args.StandardSave(item), "base": ocp.args.JsonSave(base)}
  if data_iterator is not None:
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  mngr.save(step, args=ocp.args.Composite(**args), force=True)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _check_base(saved: dict, base: dict, where: str) -> None:
  if saved != base:
    raise ConfigError(
      f"{where} was trained from the frozen base {saved}, but this config starts from {base}; "
      f"its trainable parameters only make sense on their own base. Set model.init_from / "
      f"model.vision.init_from / seed as the run had them, or use another --workdir."
    )


def restore_latest(mngr: ocp.CheckpointManager, state, labels, data_iterator, base: dict):
  """Restores the latest checkpoint onto ``state`` (the step-0 state built from ``base``: its
  frozen parameters are kept), into its shardings, and into ``data_iterator``.

  Returns:
    (state, step): ``state`` unchanged and step None when the directory has no checkpoint.

  Raises:
    ConfigError: the checkpoint was trained from another base.
  """
  step = mngr.latest_step()
  if step is None:
    return state, None
  saved_base = mngr.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]
  _check_base(dict(saved_base), base, f"checkpoint {step} in {mngr.directory}")
  target = _abstract(
    {
      "step": state.step,
      "trainable": trainable_params(state.params, labels),
      "opt_state": state.opt_state,
    }
  )
  restored = mngr.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iterator)
    ),
  )["state"]
  return state.replace(
    step=restored["step"],
    params=with_trainable(state.params, restored["trainable"]),
    opt_state=restored["opt_state"],
  ), step


def steps(workdir: str) -> list[int]:
  """The checkpointed steps of a training workdir, ascending ([] when there is none)."""
  root = epath.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return []
  with ocp.CheckpointManager(
    root, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS
  ) as mngr:
    return sorted(mngr.all_steps())


def restore_trainable(workdir: str, params, base: dict, step: int | None = None):
  """Reads the trainable parameters of a training workdir's checkpoint onto ``params``.

  ``params`` (``nnx.State``) must hold the run's frozen base already (``base``, as from
  :func:`base_reference` of the saved config); only ``state/trainable`` is read (no optimizer
  state, no data state), into the shardings of ``params``.

  Returns:
    (params with the trained leaves, step).

  Raises:
    FileNotFoundError: no checkpoint, or none at ``step``.
    ConfigError: the checkpoint's base is not ``base``.
  """
  have = steps(workdir)
  root = epath.Path(workdir) / "checkpoints"
  if not have:
    raise FileNotFoundError(
      f"no checkpoint in {root}; train first (mod-jax train --workdir {workdir})."
    )
  step = have[-1] if step is None else int(step)
  if step not in have:
    raise FileNotFoundError(f"no checkpoint at step {step} in {root}; available: {have}.")
  with ocp.CheckpointManager(
    root, options=ocp.CheckpointManagerOptions(read_only=True), item_names=ITEMS
  ) as mngr:
    saved_base = mngr.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]
  _check_base(dict(saved_base), base, f"{workdir} (step {step})")
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  with ocp.PyTreeCheckpointer() as ckpt:
    meta = ckpt.metadata(root / str(step) / "state")
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  saved = set(_flatten(dict(meta["trainable"])))
  if missing := sorted(saved - {_name(p) for p, _ in flat}):
    raise ValueError(
      f"{workdir} step {step}: checkpoint parameters {missing[:5]} (of {len(missing)}) are not "
      f"in the model; build it from the workdir's config.json."
    )
  target = _abstract({"trainable": _nest({_name(p): x for p, x in flat if _name(p) in saved})})
  with ocp.PyTreeCheckpointer() as ckpt:
    restored = ckpt.restore(
      root / str(step) / "state",
      args=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
      ),
    )
  return with_trainable(params, restored["trainable"]), step
