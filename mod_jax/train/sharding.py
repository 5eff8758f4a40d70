"""Device mesh, logical → physical shardings, and sharded creation of the train state.

Mesh axes ``data``, ``fsdp``, ``tensor``, ``context`` (docs/design.md §6); the only place physical axes are named is
``config.mesh.logical_axis_rules``. The mesh uses ``AxisType.Auto`` so logical constraints are
propagated by GSPMD (``jax.make_mesh`` defaults to Explicit axes now).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mod_jax.config import full_mesh_shape, resolve_mesh_shape, split_mesh_shape
from mod_jax.model.factory import build_model
from mod_jax.model.partitioning import logical_to_spec
from mod_jax.train.state import TrainState, make_optimizer
from mod_jax.train.step import train_step, train_step_options


def make_mesh(config, devices=None) -> Mesh:
  """Builds the (data, fsdp, tensor, context) mesh over ``devices`` (default: all global devices).

  Devices of several TPU slices (distinct ``slice_index``) get a hybrid mesh: within a slice the
  axes follow the ICI shape ``mesh.shape / mesh.dcn_shape``, across slices (DCN) the axes named
  by ``mesh.dcn_shape`` (default: all slices along ``data``, so only data-parallel gradient
  reductions cross DCN). ``jax.make_mesh`` refuses multi-slice device sets.

  Raises:
    ConfigError: ``config.mesh.shape`` does not match the device count, or ``mesh.dcn_shape``
      the number of slices.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = full_mesh_shape(resolve_mesh_shape(config.mesh.shape, len(devices)), config.mesh.axes)
  axes = tuple(config.mesh.axes)
  axis_types = (AxisType.Auto,) * len(axes)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    ici, dcn = split_mesh_shape(shape, config.mesh.get("dcn_shape"), num_slices)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, axes, axis_types=axis_types)
  return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)


def rules_of(config):
  return tuple(
    (k, tuple(v) if isinstance(v, list) else v) for k, v in config.mesh.logical_axis_rules
  )


def param_shardings(params, mesh: Mesh, rules):
  """NamedSharding per parameter from its ``out_sharding`` logical names."""

  def spec(v):
    names = v.get_metadata().get("out_sharding")
    return v.replace(
      NamedSharding(mesh, logical_to_spec(names, rules) if names else PartitionSpec())
    )

  return jax.tree.map(spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Batch arrays ``[B, T]`` / ``[B, F, ...]`` are split along their rows over the ``batch``
  logical axis and along their slots (text slots, frames) over ``length``: with a context axis
  of size R, device r holds text slots ``r·T/R ..`` and frames ``r·F/R ..`` of each row, the
  chunk the model keeps on it (``mod_jax/model/rows.py``)."""
  names = ("batch",) + (("length",) if ndim > 1 else ()) + (None,) * max(0, ndim - 2)
  return NamedSharding(mesh, logical_to_spec(names, rules))


def abstract_train_state(config, mesh: Mesh):
  """The train state's shapes and shardings on ``mesh``, with nothing allocated or computed.

  Returns:
    (abstract state: TrainState of ShapeDtypeStruct, graphdef, tx, state_shardings, init) where
    ``init()`` builds the real step-0 state (jit it with ``out_shardings=state_shardings``).

  Raises:
    TypeError: the model has state other than ``nnx.Param``.
  """
  rules = rules_of(config)
  abstract = nnx.eval_shape(lambda: build_model(config.model, rngs=config.seed, rules=rules))
  graphdef, abs_params, rest = nnx.split(abstract, nnx.Param, ...)  # type: ignore[misc]
  if jax.tree.leaves(rest):
    raise TypeError(f"model has non-Param state, unsupported by TrainState: {rest}")
  p_shard = param_shardings(abs_params, mesh, rules)
  tx = make_optimizer(config, abs_params)

  def init():
    return TrainState.create(
      nnx.state(build_model(config.model, rngs=config.seed, rules=rules), nnx.Param), tx
    )

  abs_state = jax.eval_shape(init)
  # Optimizer moments follow their parameter's sharding; counters are replicated.
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_shardings = optax.tree_map_params(
    tx,
    lambda _, s: s,
    abs_state.opt_state,
    p_shard,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  state_shardings = TrainState(step=replicated, params=p_shard, opt_state=opt_shardings)
  return abs_state, graphdef, tx, state_shardings, init


def create_train_state(config, mesh: Mesh):
  """Initializes model + optimizer directly into their shardings on ``mesh``.

  Returns:
    (state: TrainState, graphdef, tx, state_shardings)
  """
  _, graphdef, tx, state_shardings, init = abstract_train_state(config, mesh)
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=state_shardings)()
  return state, graphdef, tx, state_shardings


def jit_train_step(config, graphdef, tx, params, state_shardings=None):
  """The training step as the loop runs it: ``train_step`` bound by ``train_step_options``
  (``params``, abstract or real, give the trainable labels), state donated, and sharded with
  ``state_shardings`` if given. Lowerable from abstract shapes for an AOT topology: the step
  makes its PRNG key inside the trace.
  """
  return jax.jit(
    functools.partial(train_step, **train_step_options(config, graphdef, tx, params)),
    in_shardings=(state_shardings, None),
    out_shardings=(state_shardings, None),
    donate_argnums=0,
  )


def host_to_global(batch: dict, mesh: Mesh, rules) -> dict:
  """Per-process numpy batch → global jax.Arrays sharded over the batch axes."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
    for k, v in batch.items()
  }
