"""``mod-jax arank --config X --workdir CKPT [--samples N]``: ARank per decoder layer (γ-MoD).

γ-MoD (arXiv 2410.13859, §3.1) converts the layers whose attention maps have the lowest rank
(ARank, :func:`mod_jax.compress.arank.attention_rank`) into MoD layers. This command runs the
model of ``CKPT`` on the first ``N`` windows of ``--config``'s eval split (one sample per row,
padding stripped), takes every decoder layer's attention probabilities of the whole row (its
input through the layer's own norm, q/k projections, RoPE and causal same-sample mask) and
averages ARank over the samples. It prints a table, writes ``{workdir}/arank.png`` (ARank per
layer) and ``{workdir}/arank.json``, and recommends an insertion list: the ``n/2`` layers of
lowest ARank (the budget of ``interleaved``), beside the released code's fixed choice, all
layers but the first three and the last. The last stdout line is the JSON.

In a MoD layer of a MoD checkpoint the map is taken over the full row, not the routed compact
sequence (ARank is meant to choose where to put MoD layers, i.e. on a dense model).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from mod_jax import flags as mj_flags
from mod_jax.compress.arank import attention_rank
from mod_jax.model.attention import attention_mask, rope_tables

SAMPLES = flags.DEFINE_integer("samples", 8, "Calibration windows of the eval split.")


def attention_maps(layer, x_bld, seq) -> jax.Array:
  """Per-head attention probabilities of ``layer`` on input ``x_bld`` [b, l, d], float32
  [b, heads, l, l] (causal by position, same segment; padding rows are uniform)."""
  q, k, _ = layer.attn.qkv(layer.input_norm(x_bld), seq.positions, None, seq.rope)
  b, l, heads, hd = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, l, kh, heads // kh, hd).astype(jnp.float32)
  logits = jnp.einsum("bqkgh,bskh->bkgqs", qg, k.astype(jnp.float32)) / np.sqrt(hd)
  mask = attention_mask(seq.positions, seq.segment_ids, seq.positions, seq.segment_ids)
  logits = jnp.where(mask[:, None, None], logits, -1e30)
  return jax.nn.softmax(logits, axis=-1).reshape(b, heads, l, l)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def layer_maps(params, batch, *, graphdef):
  """(maps float32 [n_layers, b, heads, l, l], segment ids int32 [b, l]) of a batch, in stream
  order (real slots first). Each layer's input is the previous layer's output (routed as the
  checkpoint's plan says)."""
  model = nnx.merge(graphdef, params)
  model.eval()
  dec = model.llm
  x, seq, layout = model.embed_row(batch)
  seq = seq._replace(rope=rope_tables(seq.positions, dec.inv_freq))
  if layout.frame_start.shape[1] == 0:
    layout = None
  maps = []
  for i in range(dec.n_layers):
    layer = dec.layer(i)
    maps.append(attention_maps(layer, x, seq))
    x, _ = dec._apply(i, dec.plan.keep[i], layer, dec.router(i), x, seq, layout, None, None, True)
  return jnp.stack(maps), seq.segment_ids


def recommend(aranks, n_mod: int | None = None) -> dict:
  """Insertion lists from mean ARank per layer: ``lowest`` (the ``n_mod`` = n/2 lowest, in
  layer order; ties: the deeper layer) and ``reference`` (all but the first three and the
  last, the released γ-MoD code's choice)."""
  n = len(aranks)
  n_mod = n // 2 if n_mod is None else n_mod
  order = sorted(range(n), key=lambda i: (aranks[i], -i))
  return {"lowest": sorted(order[:n_mod]), "reference": list(range(3, n - 1))}


def run_arank(config, workdir: str, samples: int = 8, progress: bool = True) -> dict:
  """ARank of every layer of ``workdir``'s model on ``samples`` eval windows of ``config``.

  Returns the report dict (also written to ``{workdir}/arank.json``; plot ``arank.png``):
  ``arank`` / ``arank_std`` per layer (mean / std over samples), ``per_sample`` [samples][layers],
  ``tokens`` (each sample's real tokens: its ARank is at most tokens − 1), ``recommended``.

  Raises:
    FileNotFoundError: no checkpoint in ``workdir``. ValueError: ``samples`` < 1.
  """
  import tqdm

  from mod_jax.convert import pretrained
  from mod_jax.data import pipeline
  from mod_jax.infer.evaluate import _padded

  if samples < 1:
    raise ValueError(f"--samples={samples} must be >= 1.")
  _, graphdef, params, step = pretrained.restore_params(workdir)
  tokenizer = pipeline.load_tokenizer(config)
  index = pipeline.load_split(config, "eval", tokenizer)
  d = config.data
  per_sample, lengths = [], []
  for i in tqdm.tqdm(range(min(samples, len(index.windows))), disable=not progress):
    batch = _padded(index.example(i), int(d.max_text), int(d.max_frames), tokenizer.pad_id)
    batch.pop("text_targets")
    maps, seg = jax.device_get(layer_maps(params, batch, graphdef=graphdef))
    real = int((seg[0] != 0).sum())  # stream order: the sample's slots come first
    lengths.append(real)
    per_sample.append([attention_rank(maps[j, 0, :, :real, :real]) for j in range(len(maps))])
  values = np.asarray(per_sample)  # [samples, layers]
  mean = values.mean(0)
  report = {
    "workdir": workdir,
    "step": step,
    "samples": len(per_sample),
    "arank": [float(v) for v in mean],
    "arank_std": [float(v) for v in values.std(0)],
    "per_sample": values.tolist(),  # [samples][layers]
    "tokens": lengths,  # each sample's real tokens (ARank <= tokens − 1: row 0 is all zero)
    "recommended": recommend(list(mean)),
  }
  report["plot"] = _plot(mean, values.std(0), os.path.join(workdir, "arank.png"))
  with open(os.path.join(workdir, "arank.json"), "w") as fh:
    json.dump(report, fh, indent=2)
  return report


def _plot(mean, std, path: str) -> str | None:
  """ARank per layer as a PNG (needs matplotlib, the ``plot`` extra); None without it."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("arank: matplotlib not installed (pip install -e '.[plot]'): no plot.", file=sys.stderr)
    return None
  fig, ax = plt.subplots(figsize=(6, 3.2))
  layers = np.arange(len(mean))
  ax.bar(layers, mean, yerr=std, color="tab:blue", capsize=3)
  ax.set_xlabel("decoder layer")
  ax.set_ylabel("ARank (mean over heads, samples)")
  ax.set_title("γ-MoD ARank: low = redundant attention")
  ax.set_xticks(layers)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def render(report: dict) -> str:
  lines = [f"ARank over {report['samples']} samples (step {report['step']}):", "layer  ARank   std"]
  for i, (v, s) in enumerate(zip(report["arank"], report["arank_std"])):
    lines.append(f"{i:5d}  {v:6.2f}  {s:5.2f}")
  r = report["recommended"]
  lines.append(f"recommended MoD layers (lowest ARank): {r['lowest']}")
  lines.append(f"reference choice (all but first three and last): {r['reference']}")
  return "\n".join(lines)


def main(argv):
  config = mj_flags.config_from(argv, "arank", "configs/demo.py:dense")
  absl_logging.set_verbosity(absl_logging.ERROR)
  if not mj_flags.WORKDIR.value:
    raise app.UsageError("mod-jax arank needs --workdir (a directory written by mod-jax train).")
  try:
    report = run_arank(config, mj_flags.WORKDIR.value, SAMPLES.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"mod-jax arank: error: {e}")
  print(render(report))
  print(json.dumps(report))
