"""Ahead-of-time compilation of the train and streaming steps for a TPU topology (or local devices).

``mod-jax compile`` (:mod:`mod_jax.analysis.compile_main`) answers "does this config fit on that
pod?" on a CPU-only machine: with ``jax[tpu]`` installed (the ``tpu`` extra), libtpu describes a
topology of chips that are not there (``jax.experimental.topologies.get_topology_desc``), and the
real steps are lowered and compiled for it from abstract shapes — nothing is allocated, nothing is
computed. Per chip, XLA reports the bytes of arguments (parameters, optimizer state, batch shard),
outputs, aliased (donated) buffers and temporaries; peak = arguments + outputs − aliased +
temporaries (:func:`mod_jax.analysis.flops.xla_analysis`). A step that needs more than the chip's
HBM fails to compile with ``RESOURCE_EXHAUSTED … exceeds available HBM (95.74G)``: that is
reported as not fitting (``fits=False``), with what the compiler said.

What is compiled, exactly as it runs:

* the train step: ``mod_jax.train.step.train_step`` bound by ``train_step_options`` (AdamW
  state donated, frozen parameters labelled, remat, gradient accumulation), state and batch
  sharded over the config's mesh with its logical axis rules
  (:func:`mod_jax.train.sharding.abstract_train_state`, ``jit_train_step``, ``batch_sharding``),
  for the global batch ``train.batch_size``;
* its dense counterpart (:func:`mod_jax.analysis.flops.dense_counterpart`);
* the streaming per-frame step (``mod_jax.infer.streaming``'s jitted step: one interval token and
  one frame for one stream, KV caches of ``data.max_frames`` frames and ``data.max_text`` text
  entries, parameters sharded as in training, caches replicated).

Topology names count chips (libtpu's names): ``v5:4x4x4`` (or ``v5p:4x4x4``) is a v5p-128 slice,
64 chips (``chip_config_name="megacore"``); ``v5e:16x16`` is v5e-256; ``v4:2x2x2``, ``v6e:4x4``.
Cloud accelerator types are mapped to them: ``v5p-128`` (cores) → ``v5:4x4x4``,
``v5litepod-256`` (chips) → ``v5e:16x16``. ``num_slices`` > 1 gives a multi-slice topology whose
mesh is built by :func:`mod_jax.train.sharding.make_mesh` as a hybrid ICI × DCN mesh. For a
topology, ``model.attention_platform`` is set to ``"tpu"`` so the model takes its TPU kernels.

FLOPs: ``flops_per_step`` is the model's analytic count of one training step
(:func:`mod_jax.analysis.flops.analytic_flops`: forward + backward, no rematerialisation, the
materialised attention square) and ``flops_ratio`` compares those. XLA's own count of the
compiled program is reported as ``xla_flops_per_chip`` but is NOT a step count: XLA's cost
analysis counts the body of a while loop once, so a scanned layer stack (and the blockwise
kernel's loops) are counted once, not per layer (``mod-jax flops`` counts XLA FLOPs on the
unrolled program instead).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mod_jax.analysis import flops
from mod_jax.config import ConfigDict, validate
from mod_jax.infer import streaming
from mod_jax.model.factory import build_model
from mod_jax.model.mod import RoutingPlan
from mod_jax.train import sharding

GiB = 2**30

# HBM per chip that XLA may use, in bytes, as the TPU compiler reports it in its out-of-memory
# message ("exceeds available HBM (95.74G)", G = GiB), checked with libtpu from jax[tpu]==0.10.2.
# Used only when the compiler cannot be asked (:func:`hbm_bytes` probes it).
HBM_BY_DEVICE_KIND = {
  "TPU v4": 30.75 * GiB,
  "TPU v5": 95.74 * GiB,  # v5p
  "TPU v5 lite": 15.75 * GiB,  # v5e
  "TPU v6 lite": 31.25 * GiB,  # v6e (Trillium)
}


class TopologyError(ValueError):
  """An unknown or rejected TPU topology name, or libtpu is missing."""


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation: libtpu's topology prefix, chip config, mesh rank, cores per chip in the
  cloud accelerator-type name (``v5p-128`` counts cores, ``v5litepod-256`` chips)."""

  libtpu: str
  chip_config: str
  rank: int
  cores_per_chip: int


_GENERATIONS = {
  "v4": Generation("v4", "megacore", 3, 2),
  "v5": Generation("v5", "megacore", 3, 2),
  "v5p": Generation("v5", "megacore", 3, 2),
  "v5e": Generation("v5e", "default", 2, 1),
  "v5litepod": Generation("v5e", "default", 2, 1),  # the cloud name of v5e
  "v6e": Generation("v6e", "default", 2, 1),
}
_CHIP_NAMES = ("v4", "v5", "v5p", "v5e", "v6e")  # accepted before ':'
_CLOUD_NAMES = ("v4", "v5p", "v5e", "v5litepod", "v6e")  # accepted before '-'
EXAMPLES = (
  "v5:4x4x4 (v5p-128, 64 chips)",
  "v5p:2x2x1 (4 chips)",
  "v5e:16x16 (v5e-256)",
  "v5e:2x2",
  "v4:2x2x2",
  "v6e:4x4",
  "v5p-128",
  "v5litepod-256",
)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A resolved topology: ``name`` as libtpu takes it (``v5:4x4x4``), its chip config, chips per
  slice, and the name the user gave."""

  name: str
  chip_config: str
  chips: int
  given: str


def standard_shape(chips: int, rank: int) -> tuple[int, ...]:
  """The usual slice shape of ``chips`` chips (a power of two >= 4 for rank 3): the smallest
  axis doubles first, e.g. 64 → (4, 4, 4), 128 → (4, 4, 8), 256 → (16, 16) for rank 2."""
  if chips < 1 or chips & (chips - 1) or (rank == 3 and chips < 4):
    raise ValueError(
      f"{chips} chips is not a standard slice size (a power of two{', >= 4' if rank == 3 else ''})."
    )
  shape = [2, 2, 1] if rank == 3 else [1, 1]
  while math.prod(shape) < chips:
    i = min(range(rank), key=lambda j: (shape[j], -j))
    shape[i] *= 2
  return tuple(sorted(shape))


def parse_topology(name: str) -> Topology:
  """Resolves a topology name: libtpu's ``gen:AxBxC`` (chips) or a cloud type ``gen-N``.

  Raises:
    TopologyError: an unknown generation, a malformed shape, or a cloud size with no standard
      shape; the message lists accepted examples.
  """
  hint = f"Use a topology name that counts chips, e.g. {', '.join(EXAMPLES)}."
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", name.strip().lower())
  if m:
    gen, dims = m.group(1), tuple(int(x) for x in m.group(2).split("x"))
    if gen not in _CHIP_NAMES:
      raise TopologyError(
        f"unknown TPU topology {name!r}: generation {gen!r} is not one of "
        f"{_CHIP_NAMES} ('v5litepod' is a cloud name: v5litepod-256 or "
        f"v5e:16x16). {hint}"
      )
    g = _GENERATIONS[gen]
    if len(dims) != g.rank or min(dims) < 1:
      raise TopologyError(
        f"topology {name!r}: {gen} slices have {g.rank} axes of chips "
        f"(e.g. {'2x2x1' if g.rank == 3 else '2x2'}). {hint}"
      )
    return Topology(f"{g.libtpu}:{'x'.join(map(str, dims))}", g.chip_config, math.prod(dims), name)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name.strip().lower())
  if m and m.group(1) in _CLOUD_NAMES:
    g = _GENERATIONS[m.group(1)]
    count = int(m.group(2))
    chips = count // g.cores_per_chip
    try:
      dims = standard_shape(chips, g.rank)
    except ValueError as e:
      raise TopologyError(f"topology {name!r}: {e} {hint}") from None
    return Topology(f"{g.libtpu}:{'x'.join(map(str, dims))}", g.chip_config, chips, name)
  raise TopologyError(f"unknown TPU topology {name!r}. {hint}")


def topology_devices(name: str, num_slices: int = 1) -> tuple[Topology, list]:
  """The (non-addressable) devices of ``num_slices`` slices of topology ``name``.

  Raises:
    TopologyError: an unknown or rejected name (libtpu's message included), a bad
      ``num_slices``, or libtpu is not installed (``pip install "mod_jax[tpu]"``).
  """
  topo = parse_topology(name)
  if num_slices < 1:
    raise TopologyError(f"num_slices={num_slices} must be >= 1.")
  # Describing a topology uses no TPU: don't take libtpu's one-process-per-host lock
  # (/tmp/libtpu_lockfile), which another process on this host may hold.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topo.name,
      chip_config_name=topo.chip_config,
      chips_per_host_bounds=(2, 2, 1),
      num_slices=num_slices,
    )
  except Exception as e:  # noqa: BLE001 (libtpu missing or name rejected)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if not libtpu_available():
      raise TopologyError(
        f"compiling for TPU topology {name!r} needs libtpu: pip install "
        f"'jax[tpu]==0.10.2' (the mod_jax 'tpu' extra). ({msg})"
      ) from None
    raise TopologyError(
      f"libtpu rejected topology {topo.name!r} (from {name!r}, chip config "
      f"{topo.chip_config!r}): {msg}. Examples: {', '.join(EXAMPLES)}."
    ) from None
  return topo, list(desc.devices)


def libtpu_available() -> bool:
  """Whether libtpu (``jax[tpu]``) is importable, i.e. TPU topologies can be compiled for."""
  return importlib.util.find_spec("libtpu") is not None


# ----------------------------------------------------------------------------- memory limits
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(value: str, unit: str) -> float:
  return float(value) * _UNITS[unit]


def parse_oom(message: str) -> dict[str, Any] | None:
  """The compiler's out-of-memory message in numbers, or None if ``message`` is not one.

  ``RESOURCE_EXHAUSTED: ... memory required for HLO temporaries (242.80G) exceeds available HBM
  (95.74G)`` → ``{"summary": <that line>, "required_bytes": 242.8 GiB (what the message says was
  needed: temporaries, or the whole program), "hbm_bytes": 95.74 GiB}`` (either may be None).
  """
  if "RESOURCE_EXHAUSTED" not in message and "exceeds available HBM" not in message:
    return None
  line = next(
    (l.strip() for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l or "exceed" in l),
    message.strip().splitlines()[0],
  )
  hbm = re.search(r"available HBM \(" + _SIZE + r"\)", message)
  need = re.search(r"\(" + _SIZE + r"\)\s+exceeds?", message)
  return {
    "summary": line[:400],
    "required_bytes": _bytes(*need.groups()) if need else None,
    "hbm_bytes": _bytes(*hbm.groups()) if hbm else None,
  }


_HBM_CACHE: dict[str, tuple[float | None, str]] = {}


def hbm_bytes(device) -> tuple[float | None, str]:
  """(bytes of memory XLA may use on ``device``, where the number came from).

  An addressable accelerator: its ``memory_stats()["bytes_limit"]``. A TPU topology device: the
  limit in the compiler's own out-of-memory message for a deliberately oversized program (a
  fraction of a second), else :data:`HBM_BY_DEVICE_KIND`. CPU: the host's physical memory.
  """
  kind = device.device_kind
  if device.platform == "cpu":
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host memory"
  try:
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
      return float(stats["bytes_limit"]), "device memory_stats"
  except Exception:  # noqa: BLE001 (topology devices are not addressable)
    pass
  if kind not in _HBM_CACHE:
    limit, source = None, "unknown"
    mesh = Mesh(np.array([device]), ("x",))
    too_big = jax.ShapeDtypeStruct(
      (2**42,), jnp.int8, sharding=NamedSharding(mesh, PartitionSpec())
    )
    try:
      jax.jit(lambda x: x + 1).lower(too_big).compile()
    except Exception as e:  # noqa: BLE001
      oom = parse_oom(str(e))
      if oom and oom["hbm_bytes"]:
        limit, source = oom["hbm_bytes"], "compiler out-of-memory message"
    if limit is None and kind in HBM_BY_DEVICE_KIND:
      limit, source = HBM_BY_DEVICE_KIND[kind], "table (HBM_BY_DEVICE_KIND)"
    _HBM_CACHE[kind] = (limit, source)
  return _HBM_CACHE[kind]


# ----------------------------------------------------------------------------- compiling
def _compile(lowerable, *args, **kwargs) -> dict[str, Any]:
  """Lowers and compiles; returns :func:`flops.xla_analysis` fields + ``compile_s`` + ``error``.

  A compiler out-of-memory error is returned (``oom``), not raised; other errors propagate.
  """
  t0 = time.perf_counter()
  lowered = lowerable.lower(*args, **kwargs)
  lower_s = time.perf_counter() - t0
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax raises JaxRuntimeError (re-raised unless it is an OOM)
    oom = parse_oom(str(e))
    if oom is None:
      raise
    return {"compile_s": time.perf_counter() - t0, "lower_s": lower_s, "oom": oom}
  out = {"compile_s": time.perf_counter() - t0, "lower_s": lower_s}
  out.update(flops.xla_analysis(compiled))
  return out


def _with_sharding(abstract, shardings):
  """ShapeDtypeStructs carrying their sharding. ``shardings`` may hold a sharding where
  ``abstract`` has an empty node (optax's ``MaskedNode`` of frozen parameters), as jit's
  ``in_shardings`` prefix trees do."""
  empty = lambda x: not isinstance(x, jax.ShapeDtypeStruct) and not jax.tree.leaves(x)
  return jax.tree.map(
    lambda a, s: a if empty(a) else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    shardings,
    is_leaf=empty,
  )


def compile_train(config: ConfigDict, mesh: Mesh) -> dict[str, Any]:
  """Compiles the sharded train step of ``config`` on ``mesh`` (see module docstring)."""
  abs_state, graphdef, tx, state_shardings, _ = sharding.abstract_train_state(config, mesh)
  rules = sharding.rules_of(config)
  step = sharding.jit_train_step(config, graphdef, tx, abs_state.params, state_shardings)
  state = _with_sharding(abs_state, state_shardings)
  batch = flops.abstract_batch(config, lambda ndim: sharding.batch_sharding(mesh, rules, ndim))
  with jax.set_mesh(mesh):
    return _compile(step, state, batch)


def compile_stream(config: ConfigDict, mesh: Mesh) -> dict[str, Any]:
  """Compiles the streaming per-frame step (one interval token + one frame, one stream).

  KV caches hold ``data.max_frames`` frames and ``data.max_text`` text entries
  (:func:`mod_jax.infer.streaming.cache_sizes`); parameters are sharded as in training (no
  activation constraints: batch 1), caches and inputs replicated.
  """
  rules = sharding.rules_of(config)
  sizes = streaming.cache_sizes(
    RoutingPlan.from_config(config.model), config.data.max_frames, config.data.max_text
  )

  abs_model = nnx.eval_shape(lambda: build_model(config.model, rngs=config.seed))
  graphdef, abs_params = nnx.split(abs_model, nnx.Param)
  abs_cache = jax.eval_shape(lambda: streaming.empty_caches(abs_model, 1, sizes))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = _with_sharding(abs_params, sharding.param_shardings(abs_params, mesh, rules))
  cache = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abs_cache
  )
  s = config.model.vision.image_size
  sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  i32 = jnp.int32
  batch = {
    "text_tokens": sd((1, 1), i32),
    "text_positions": sd((1, 1), i32),
    "text_segment_ids": sd((1, 1), i32),
    "frames": sd((1, 1, s, s, 3), jnp.uint8),
    "frame_positions": sd((1, 1), i32),
    "frame_segment_ids": sd((1, 1), i32),
  }
  key = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh):
    # the engine's own step, as Session calls it
    return _compile(
      streaming._step,
      params,
      cache,
      None,  # no compression state
      batch,
      sd((), i32),
      sd((), i32),
      sd((1,), i32),
      jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
      graphdef=graphdef,
      sampler=streaming.Sampler(),
      vocab_size=int(config.model.vocab_size),
    )


def _figures(
  rep: dict[str, Any] | None, hbm: float | None, chips: int, step_flops: float | None = None
) -> dict[str, Any]:
  """JSON fields of one compiled step (None when it was skipped); ``step_flops``: the analytic
  FLOPs of a training step (None for the streaming step)."""
  if rep is None:
    return {}
  if "oom" in rep:
    return {
      "fits": False,
      "peak_bytes_per_chip": None,
      "required_bytes_per_chip": rep["oom"]["required_bytes"],
      "flops_per_step": step_flops,
      "xla_flops_per_chip": None,
      "compile_s": rep["compile_s"],
      "lower_s": rep["lower_s"],
      "error": rep["oom"]["summary"],
    }
  out = {
    f"{k.removesuffix('_bytes')}_bytes_per_chip": rep[k]
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
  }
  out.update(
    peak_bytes_per_chip=rep["peak_bytes"],
    fits=bool(hbm is None or rep["peak_bytes"] <= hbm),
    headroom=None if hbm is None else 1.0 - rep["peak_bytes"] / hbm,
    flops_per_step=step_flops,
    xla_flops_per_chip=rep["flops"],
    compile_s=rep["compile_s"],
    lower_s=rep["lower_s"],
    error=None,
  )
  return out


def run(
  config: ConfigDict,
  topology: str | None = None,
  *,
  num_slices: int = 1,
  dense: bool = True,
  stream: bool = True,
  hbm_override: float | None = None,
  progress=None,
) -> dict[str, Any]:
  """Compiles the configured train step, its dense counterpart and the streaming step.

  Args:
    config: a full config (validated here against the topology's device count).
    topology: a TPU topology name (:func:`parse_topology`); None = the local devices.
    num_slices: TPU slices (multi-slice: hybrid ICI × DCN mesh, ``mesh.dcn_shape``).
    dense, stream: also compile the dense counterpart / the streaming step.
    hbm_override: bytes per chip to check against instead of the chip's (for what-ifs, tests).
    progress: optional callable(str) told what is being compiled.

  Returns:
    The summary dict printed as ``mod-jax compile``'s JSON line: ``topology``, ``chip_config``,
    ``num_slices``, ``chips``, ``device_kind``, ``mesh`` {axis: size}, ``hbm_bytes``,
    ``hbm_source``; for the configured train step ``peak_bytes_per_chip``,
    ``argument_bytes_per_chip``, ``output_bytes_per_chip``, ``alias_bytes_per_chip``,
    ``temp_bytes_per_chip``, ``fits``, ``headroom`` (1 − peak / HBM), ``flops_per_step``,
    ``xla_flops_per_chip``, ``compile_s`` (trace + lower + compile), ``lower_s`` (trace + lower),
    ``error``; the same with a ``dense_`` prefix for the dense
    counterpart and a ``stream_`` prefix for the streaming step; ``memory_ratio`` and
    ``flops_ratio`` (MoD / dense); ``all_fit``. A step that does not fit has ``fits=False``,
    ``error`` (the compiler's message) and, if the compiler said, ``required_bytes_per_chip``;
    its byte and FLOP fields are None.

  Raises:
    ConfigError: the config does not suit the topology (mesh shape, batch divisibility).
    TopologyError: an unknown topology name, libtpu missing, num_slices > 1 without topology.
  """
  say = progress or (lambda _: None)
  config = copy.deepcopy(config)
  if topology is not None and "attention_platform" in config.model:
    config.model.attention_platform = "tpu"  # kernels for the target, not this host's backend
  if topology is None:
    if num_slices != 1:
      raise TopologyError("num_slices > 1 needs a TPU --topology.")
    topo, devices = None, jax.devices()
  else:
    topo, devices = topology_devices(topology, num_slices)
  validate(config, len(devices), num_slices)
  mesh = sharding.make_mesh(config, devices)
  hbm, hbm_source = hbm_bytes(devices[0])
  if hbm_override is not None:
    hbm, hbm_source = float(hbm_override), "override"
  chips = len(devices)
  out: dict[str, Any] = {
    "topology": topo.name if topo else f"local:{jax.default_backend()}",
    "topology_given": topo.given if topo else None,
    "chip_config": topo.chip_config if topo else None,
    "num_slices": num_slices,
    "chips": chips,
    "device_kind": devices[0].device_kind,
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "hbm_bytes": hbm,
    "hbm_source": hbm_source,
    "batch_size": int(config.train.batch_size),
  }
  say(f"train step ({config.model.mod.insertion!r} MoD) on {out['topology']}, mesh {out['mesh']}")
  mod = compile_train(config, mesh)
  mod_flops = flops.analytic_flops(config)["total"]
  out.update(_figures(mod, hbm, chips, mod_flops))
  if dense:
    say("train step of the dense counterpart")
    dense_cfg = flops.dense_counterpart(config)
    den = compile_train(dense_cfg, mesh)
    den_flops = flops.analytic_flops(dense_cfg)["total"]
    out.update({f"dense_{k}": v for k, v in _figures(den, hbm, chips, den_flops).items()})
    both = "oom" not in mod and "oom" not in den
    out["memory_ratio"] = mod["peak_bytes"] / den["peak_bytes"] if both else None
    out["flops_ratio"] = mod_flops / den_flops
  if stream:
    say("streaming per-frame step")
    out.update(
      {f"stream_{k}": v for k, v in _figures(compile_stream(config, mesh), hbm, chips).items()}
    )
    out["stream_cache_frames"], out["stream_cache_text"] = (
      int(config.data.max_frames),
      int(config.data.max_text),
    )
  out["all_fit"] = all(v for k, v in out.items() if k.endswith("fits"))
  return out


def steps_of(summary: dict[str, Any]) -> Sequence[tuple[str, str]]:
  """(label, key prefix) of the steps a :func:`run` summary holds."""
  return [
    (label, p)
    for label, p in (("MoD train", ""), ("dense train", "dense_"), ("stream step", "stream_"))
    if f"{p}fits" in summary
  ]
