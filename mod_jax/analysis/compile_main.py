"""``mod-jax compile --config X [--topology NAME] [--num_slices S] [--json]``: does it fit?

Compiles ahead of time the real train step (and its dense counterpart, and the streaming
per-frame step) for a TPU topology on a CPU-only machine (needs the ``tpu`` extra, libtpu), or
for the local devices without ``--topology``, and prints per chip the argument / output /
temporary / peak bytes against the chip's HBM, FLOPs per step and compile seconds
(:mod:`mod_jax.analysis.compile`). The last stdout line is one JSON object; ``--json`` prints
only that line.

  mod-jax compile --config configs/tiny.py --topology v5p:2x2x1
  mod-jax compile --config configs/videollm_mod_llama3_8b.py --topology v5:4x4x4 --json
  mod-jax compile --config configs/demo.py --topology v5e:16x16 --num_slices 2 \\
      --config.train.batch_size=512

Exit status: 0 when every compiled step fits, 1 when one does not (its ``fits`` is false and
``error`` holds the compiler's message), 2 for a config or topology that cannot be used.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from mod_jax import flags as mj_flags

TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "TPU topology counting chips, e.g. v5:4x4x4 (v5p-128), v5e:16x16, "
  "v5p:2x2x1, or a cloud type v5p-128 / v5litepod-256. Default: the local devices.",
)
NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (multi-slice over DCN).")
JSON = flags.DEFINE_bool("json", False, "Print only the JSON line.")
SKIP_DENSE = flags.DEFINE_bool("skip_dense", False, "Do not compile the dense counterpart.")
SKIP_STREAM = flags.DEFINE_bool("skip_stream", False, "Do not compile the streaming step.")
HBM_GIB = flags.DEFINE_float(
  "hbm_gib", None, "Check against this many GiB per chip instead of the chip's HBM (what-if)."
)

_UNITS = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def _size(x) -> str:
  if x is None:
    return "-"
  scale, unit = next(u for u in _UNITS if abs(x) >= u[0] or u[0] == 1)
  return f"{x / scale:.2f} {unit}"


def render(s: dict) -> str:
  """Human-readable table of a :func:`mod_jax.analysis.compile.run` summary."""
  from mod_jax.analysis.compile import steps_of

  given = f" (from {s['topology_given']})" if s.get("topology_given") else ""
  lines = [
    f"{s['topology']}{given}: {s['num_slices']} slice(s), {s['chips']} x "
    f"{s['device_kind']}, mesh {s['mesh']}, global batch {s['batch_size']}; "
    f"HBM {_size(s['hbm_bytes'])} per chip ({s['hbm_source']})",
    "",
    f"{'per chip':14s}{'arguments':>12s}{'outputs':>12s}{'aliased':>12s}{'temporary':>12s}"
    f"{'peak':>12s}{'of HBM':>8s}{'fits':>6s}{'TFLOP/step':>12s}{'compile s':>11s}",
  ]
  for label, p in steps_of(s):
    peak = s[f"{p}peak_bytes_per_chip"]
    frac = f"{peak / s['hbm_bytes']:8.0%}" if peak is not None and s["hbm_bytes"] else f"{'-':>8s}"
    fl = s[f"{p}flops_per_step"]
    lines.append(
      f"{label:14s}"
      + "".join(
        f"{_size(s.get(f'{p}{k}_bytes_per_chip')):>12s}"
        for k in ("argument", "output", "alias", "temp", "peak")
      )
      + f"{frac}{'yes' if s[f'{p}fits'] else 'NO':>6s}"
      + (f"{fl / 1e12:12.4g}" if fl is not None else f"{'-':>12s}")
      + f"{s[f'{p}compile_s']:11.1f}"
    )
    if s.get(f"{p}error"):
      lines.append(f"  {label} does not fit: {s[f'{p}error']}")
  if s.get("memory_ratio") is not None:
    lines += ["", f"MoD / dense: peak memory {s['memory_ratio']:.3f}, FLOPs {s['flops_ratio']:.3f}"]
  return "\n".join(lines)


def main(argv):
  config = mj_flags.config_from(argv, "compile", "configs/tiny.py")
  import jax

  if TOPOLOGY.value and not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # libtpu only describes the topology
  from mod_jax.analysis import compile as aot
  from mod_jax.config import ConfigError

  say = None if JSON.value else (lambda m: print(f"compiling {m} ...", file=sys.stderr, flush=True))
  try:
    summary = aot.run(
      config,
      TOPOLOGY.value,
      num_slices=NUM_SLICES.value,
      dense=not SKIP_DENSE.value,
      stream=not SKIP_STREAM.value,
      hbm_override=None if HBM_GIB.value is None else HBM_GIB.value * 2**30,
      progress=say,
    )
  except (ConfigError, aot.TopologyError) as e:
    print(f"mod-jax compile: {e}", file=sys.stderr)
    sys.exit(2)
  if not JSON.value:
    print(render(summary))
  print(json.dumps(summary))
  sys.exit(0 if summary["all_fit"] else 1)
