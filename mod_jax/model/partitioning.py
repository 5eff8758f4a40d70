"""Logical axis names for parameters and activations (MaxText style).

Every parameter is created with a tuple of logical axis names (``embed``, ``mlp``, ``heads`` …);
activations are constrained with :func:`shard`. The mapping to physical mesh axes lives in one
table, ``config.mesh.logical_axis_rules`` (see ``mod_jax/config.py``). Sharding is applied
explicitly by ``mod_jax/train/sharding.py`` (``jit`` out_shardings), never eagerly at creation, so
the same module code builds an unsharded reference model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

LogicalNames = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def param(
  rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: LogicalNames, dtype=jnp.float32
) -> nnx.Param:
  """Creates an ``nnx.Param`` of ``shape`` annotated with logical axis ``names`` (one per dim)."""
  if len(names) != len(shape):
    raise ValueError(f"param shape {tuple(shape)} and logical names {names} differ in rank.")
  return nnx.Param(
    init(next_key(rngs.params), tuple(shape), dtype),
    out_sharding=tuple(names),
    eager_sharding=False,
  )


def next_key(stream: nnx.RngStream) -> jax.Array:
  """The stream's next key, exactly as ``stream()`` (flax ``nnx.RngStream.__call__``: the key
  folded with the counter, then the counter + 1), but cheap while tracing.

  ``stream()`` bumps its counter through ``Variable.__setitem__``, whose same-sharding check asks
  the new counter for ``.sharding``; on a tracer JAX answers with an AttributeError whose message
  walks the whole trace so far. Once per parameter, that is quadratic: building the 8B model abstractly
  (``nnx.eval_shape``, twice per ``mod-jax compile``) took 58 s with ``stream()``, 1.6 s with this.
  """
  stream.count._check_can_update()
  key = jax.random.fold_in(stream.key[...], stream.count[...])
  stream.count.set_value(stream.count[...] + 1)
  return key


def logical_to_spec(names: LogicalNames, rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec with ``rules`` (None: replicated dimension).

  A mesh axis shards at most one dimension: a later name whose mesh axes are already used gets
  the rest of its axes, or None.

  No rules at all (an unsharded model, built with ``rules=None``) replicate every dimension.

  Raises:
    ValueError: a name has no rule in a non-empty table (a typo would otherwise replicate the
      dimension silently).
  """
  if not rules:
    return PartitionSpec(*(None for _ in names))
  table = dict((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)
  unknown = [n for n in names if n is not None and n not in table]
  if unknown:
    raise ValueError(
      f"logical axis names {unknown} (of {tuple(names)}) have no rule in "
      f"mesh.logical_axis_rules, which names {sorted(table)}. Add a rule (name, mesh axis or "
      f"None) or fix the name."
    )
  used: set[str] = set()
  out = []
  for n in names:
    axes = table[n] if n is not None else None
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    flat = tuple(a for a in flat if a not in used)  # a mesh axis may shard one dim only
    used.update(flat)
    out.append(None if not flat else flat[0] if len(flat) == 1 else flat)
  return PartitionSpec(*out)


def on_mesh(spec: PartitionSpec, mesh) -> PartitionSpec:
  """``spec`` without the mesh axes that ``mesh`` does not have (an axis a mesh leaves out has
  size 1, e.g. ``context`` on a (data, fsdp, tensor) mesh)."""
  names = set(mesh.axis_names)

  def keep(axes):
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    flat = tuple(a for a in flat if a in names)
    return None if not flat else flat[0] if len(flat) == 1 else flat

  return PartitionSpec(*(keep(a) for a in spec))


def mesh_axes_of(name: str, rules: Rules | None) -> tuple[str, ...]:
  """The mesh axes logical axis ``name`` maps to under ``rules`` that the current (abstract)
  mesh has with size > 1; () without rules, without a mesh, or when it is not sharded."""
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return ()
  axes = dict((k, v) for k, v in rules).get(name)
  flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in flat if a in mesh.axis_names and mesh.shape[a] > 1)


def shard(x: jax.Array, names: LogicalNames, rules: Rules | None) -> jax.Array:
  """Constrains activation ``x`` to the sharding of its logical ``names``; no-op without a mesh.

  Raises:
    ValueError: a name has no rule in ``rules`` (checked with or without a mesh).
  """
  if not rules:
    return x
  spec = logical_to_spec(names, rules)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, on_mesh(spec, mesh))
