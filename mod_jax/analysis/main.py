"""``mod-jax flops --config X [--json]``: FLOPs and memory of a training step, MoD vs dense.

For the configured model and its dense counterpart (``model.mod.insertion="none"``): the analytic
FLOPs of one training step per token class and per decoder layer (formula in
:mod:`mod_jax.analysis.flops`), XLA's count (``compiled.cost_analysis()``) and the compiled step's
memory (``compiled.memory_analysis()``), for the global batch ``train.batch_size`` on one device.

  mod-jax flops --config configs/bench_paper.py
  mod-jax flops --config configs/demo.py --config.model.mod.keep_ratio=0.3 --json
"""

from __future__ import annotations

import json

from absl import flags

from mod_jax import flags as mj_flags

JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of tables.")
ANALYTIC_ONLY = flags.DEFINE_bool(
  "analytic_only",
  False,
  "Skip XLA compilation (analytic count only; for configs too large to compile on this machine).",
)

_CLASSES = (
  "vision_tower",
  "connector",
  "decoder_text",
  "decoder_vision",
  "router",
  "routing",
  "lm_head",
  "optimizer",
)


def _unit(largest: float, units) -> tuple[float, str]:
  """The largest unit (scale, name) in which ``largest`` is >= 1 (else the smallest)."""
  for scale, name in units:
    if largest >= scale:
      return scale, name
  return units[-1]


_FLOP_UNITS = ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"))
_BYTE_UNITS = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def render(report: dict) -> str:
  """Human-readable tables of an :func:`mod_jax.analysis.flops.analyze` report."""
  c, mod, den, r = report["config"], report["mod"], report["dense"], report["ratios"]
  has_xla = "xla" in mod
  fs, fu = _unit(den["analytic"]["total"], _FLOP_UNITS)
  _g = lambda x: f"{x / fs:12.3f}"
  lines = [
    f"batch {c['batch_size']} rows x (text {c['max_text']} + frames {c['max_frames']} x "
    f"{c['tokens_per_frame']} tokens); {c['n_layers']} layers, d_model {c['d_model']}; "
    f"insertion {c['insertion']!r}, keep_ratio {c['keep_ratio']}, selection "
    f"{c['selection']!r}; device {c['device']}",
    "",
    f"Training-step FLOPs ({fu}, analytic){'MoD':>14s}{'dense':>12s}{'MoD/dense':>12s}",
  ]
  ratio = lambda a, b: f"{a / b:12.3f}" if b else f"{'-':>12s}"
  for k in _CLASSES:
    a, b = mod["analytic"]["by_class"][k], den["analytic"]["by_class"][k]
    lines.append(f"  {k:34s}{_g(a)}{_g(b)}{ratio(a, b)}")
  for k in ("products", "elementwise", "total"):
    a, b = mod["analytic"][k], den["analytic"][k]
    lines.append(f"  {'= ' + k if k == 'total' else k:34s}{_g(a)}{_g(b)}{ratio(a, b)}")
  if has_xla:
    a, b = mod["xla"]["flops"], den["xla"]["flops"]
    lines += [
      f"  {'XLA cost_analysis flops':34s}{_g(a)}{_g(b)}{ratio(a, b)}",
      f"  {'XLA / analytic':34s}{mod['xla_over_analytic']:12.3f}{den['xla_over_analytic']:12.3f}",
      "",
    ]
    bs, bu = _unit(den["xla"]["peak_bytes"], _BYTE_UNITS)
    _mib = lambda x: f"{x / bs:12.1f}"
    lines.append(
      f"Compiled step memory ({bu}, one device){'MoD':>13s}{'dense':>12s}{'MoD/dense':>12s}"
    )
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes"):
      a, b = mod["xla"][k], den["xla"][k]
      lines.append(f"  {k:34s}{_mib(a)}{_mib(b)}{ratio(a, b)}")
  lines += [
    "",
    f"Per decoder layer ({fu}; k kept of N per frame, - = dense; compact = tokens/row)",
    f"  {'layer':>5s} {'k':>3s} {'compact':>8s} {'MoD text':>10s} {'MoD vision':>11s} "
    f"{'router+routing':>15s} {'dense total':>12s}",
  ]
  for lm, ld in zip(mod["analytic"]["per_layer"], den["analytic"]["per_layer"]):
    k = "-" if lm["keep"] is None else str(lm["keep"])
    lines.append(
      f"  {lm['layer']:5d} {k:>3s} {lm['compact_len']:8d} {lm['text'] / fs:10.3f} "
      f"{lm['vision'] / fs:11.3f} {(lm['router'] + lm['routing']) / fs:15.4f} "
      f"{(ld['text'] + ld['vision']) / fs:12.3f}"
    )
  lines += ["", "Ratios MoD/dense: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items())]
  return "\n".join(lines)


def main(argv):
  config = mj_flags.config_from(argv, "flops", "configs/bench_paper.py")
  from mod_jax.analysis import flops
  from mod_jax.config import validate

  validate(config)
  report = flops.analyze(config, with_xla=not ANALYTIC_ONLY.value)
  print(json.dumps(report) if JSON.value else render(report))
