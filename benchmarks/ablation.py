"""Quality ablation of the MoD design space on the procedural dataset (VideoLLM-MoD Tables 1-3).

Each row trains the demo model (``configs/demo.py``) from scratch with one routing setting, for a
fixed step budget and fixed seeds, through ``mod_jax.train.loop.train_and_evaluate``, and reports
held-out LM-PPL and streaming-decision accuracy with the training-step FLOPs ratio to dense
(analytic count, ``mod_jax.analysis.flops``; it agrees with XLA's count to < 0.5% on this model).

  python benchmarks/ablation.py --steps 300 --seeds 0,1,2,3,4 --workdir /tmp/mod_ablation

Rows (``--rows`` picks a subset): dense (Full computation); learned / random / uniform selection
at r = 0.2 interleaved; EarlyExit(E = n/2) and LayerSkip (k = 0 routing); insertion all /
all_deep / interleaved_deep at r = 0.2 (learned); r = 0.1 and 0.3 interleaved (learned); router
weighting g = sigmoid(s) and g = s instead of the straight-through default (learned r = 0.2);
``router_recipe``, the learned-router study's training recipe (auxiliary BCE 0.01, router on the
input-normed hidden, gate annealed from sigmoid(s) to 1 over the first half, Gumbel exploration).
``--setting frozen_tower`` runs the rows with the vision tower frozen (docs/ablation.md "Learned
router"); records keep their setting. Besides the table, learned rows are compared with uniform
and random paired by seed (``paired_table``).
Each record also keeps the router statistics of the last logged training step.
Finished rows are appended to ``{workdir}/results.jsonl`` and skipped when the script is run
again (so an interrupted ablation resumes). Prints a markdown table; the LAST stdout line is one
JSON object ``{"rows": [...], "settings": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo
from mod_jax.analysis import flops
from mod_jax.model.mod import baseline_routing


def _rows(n_layers: int, steps: int = 300) -> dict[str, tuple[str, dict]]:
  """name -> (paper table, ``model.mod`` overrides). ``steps``: the budget (the router recipe
  anneals its gate over the first half)."""
  recipe = {  # the learned-router study's recipe (docs/ablation.md "Learned router")
    "router_aux_loss_weight": 0.01,  # γ-MoD's coefficient per layer
    "router_input": "normed",
    "router_anneal_steps": steps // 2,
    "router_explore": 1.0,
  }
  return {
    "dense": ("1: Full computation", baseline_routing("full", n_layers)),
    "learned_r0.2_interleaved": ("1/3: VideoLLM-MoD (learned)", {}),
    "early_exit": (f"1: EarlyExit (E={n_layers // 2})", baseline_routing("early_exit", n_layers)),
    "layer_skip": ("1: LayerSkip", baseline_routing("layer_skip", n_layers)),
    "random": ("3: random selection", {"selection": "random"}),
    "uniform": ("3: uniform selection", {"selection": "uniform"}),
    "all": ("2: insertion all", {"insertion": "all"}),
    "all_deep": ("2: insertion all_deep", {"insertion": "all_deep"}),
    "interleaved_deep": ("2: insertion interleaved_deep", {"insertion": "interleaved_deep"}),
    "r0.1": ("r sweep: r = 0.1", {"keep_ratio": 0.1}),
    "r0.3": ("r sweep: r = 0.3", {"keep_ratio": 0.3}),
    "learned_sigmoid": ("-: weighting g = sigmoid(s)", {"router_weighting": "sigmoid"}),
    "learned_score": ("-: weighting g = s (as MoD)", {"router_weighting": "score"}),
    "router_recipe": ("-: router recipe (aux, normed, annealed gate, exploration)", recipe),
  }


# Settings: what changes besides ``model.mod`` (the same rows run under each; records keep it).
SETTINGS = {
  "demo": {},  # configs/demo.py as it is: the vision tower trains from scratch
  # The tower is frozen (at its random initialisation), as VideoLLM-online freezes SigLIP: it
  # cannot learn to move a frame's content into the tokens a fixed stride keeps.
  "frozen_tower": {"model.vision.trainable": False},
}


def make_config(overrides: dict, args, seed: int):
  """The demo config with the row's ``model.mod`` overrides, the setting and the budget."""
  c = demo.get_config()
  c.model.mod.update(overrides)
  for path, value in SETTINGS[args.setting].items():
    *parents, leaf = path.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = value
  c.seed = seed
  t = c.train
  t.steps = args.steps
  t.warmup_steps = min(t.warmup_steps, args.steps // 6)
  t.checkpoint_every = args.steps
  t.log_every = max(args.steps // 10, 1)
  t.eval_batches = 0  # the whole eval split
  p = c.data.procedural
  p.num_train_videos = args.train_videos
  p.num_eval_videos = args.eval_videos
  return c


def run_row(name: str, overrides: dict, args, seed: int) -> dict:
  from mod_jax.train.loop import train_and_evaluate

  config = make_config(overrides, args, seed)
  dense = flops.analytic_flops(flops.dense_counterpart(config))["total"]
  ratio = flops.analytic_flops(config)["total"] / dense
  workdir = os.path.join(args.workdir, f"{args.setting}_{name}_seed{seed}")
  shutil.rmtree(workdir, ignore_errors=True)
  start = time.perf_counter()
  out = train_and_evaluate(config, workdir, progress=False)
  seconds = time.perf_counter() - start
  shutil.rmtree(workdir, ignore_errors=True)
  ev = out["eval"]
  return {
    "row": name,
    "seed": seed,
    "flops_ratio": ratio,
    "train_eval_seconds": seconds,
    "final_train_loss": out["last_logged"]["loss"],
    **{k: v for k, v in out["last_logged"].items() if k.startswith("router/")},
    **{
      k: ev[k]
      for k in (
        "lm_ppl",
        "stream_accuracy",
        "speak_recall",
        "silent_accuracy",
        "lm_token_accuracy",
        "text_tokens",
        "frame_decisions",
      )
    },
  }


def _mean_sem(vals: list[float]) -> tuple[float, float]:
  """Mean and standard error of the mean (0 for a single value)."""
  sem = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
  return statistics.fmean(vals), sem


def table(results: list[dict], rows: dict) -> tuple[str, list[dict]]:
  """Markdown table (mean ± s.e.m. over seeds) and the aggregated rows.

  Besides the raw metrics, each row's LM-PPL is compared with dense and with learned r = 0.2
  interleaved seed by seed (same data order and initialisation seed): the paired relative
  difference ``ppl_row / ppl_ref - 1`` in percent, averaged over the seeds both rows have. Seed
  noise at this budget is large, so the paired difference is the number to read.
  """
  by_seed = {
    ref: {r["seed"]: r["lm_ppl"] for r in results if r["row"] == ref}
    for ref in ("dense", "learned_r0.2_interleaved")
  }
  lines = [
    "| row | paper table | FLOPs ratio | LM-PPL | ΔPPL vs dense | ΔPPL vs learned | "
    "stream acc. | speak recall | seeds |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  agg = []
  for name, (paper, _) in rows.items():
    rs = sorted((r for r in results if r["row"] == name), key=lambda r: r["seed"])
    if not rs:
      continue
    paired = lambda ref: [100 * (r["lm_ppl"] / ref[r["seed"]] - 1) for r in rs if r["seed"] in ref]  # noqa: B023 (used in-loop)
    columns = (
      ("lm_ppl", [r["lm_ppl"] for r in rs], "", 3, ""),
      ("dppl_dense", paired(by_seed["dense"]), "+", 1, "%"),
      ("dppl_learned", paired(by_seed["learned_r0.2_interleaved"]), "+", 1, "%"),
      ("stream_accuracy", [r["stream_accuracy"] for r in rs], "", 3, ""),
      ("speak_recall", [r["speak_recall"] for r in rs], "", 3, ""),
    )
    cells, out = [], {"row": name, "flops_ratio": rs[0]["flops_ratio"]}
    for key, vals, sign, digits, unit in columns:
      if not vals:
        cells.append("")
        continue
      mean, sem = _mean_sem(vals)
      out[key], out[key + "_sem"] = mean, sem
      cells.append(
        f"{mean:{sign}.{digits}f}{unit}" + (f" ± {sem:.{digits}f}" if len(vals) > 1 else "")
      )
    seeds = [r["seed"] for r in rs]
    lines.append(
      f"| {name} | {paper} | {rs[0]['flops_ratio']:.3f} | "
      + " | ".join(cells)
      + f" | {','.join(map(str, seeds))} |"
    )
    agg.append({**out, "seeds": seeds})
  return "\n".join(lines), agg


def paired_table(results: list[dict], rows: dict) -> tuple[str, list[dict]]:
  """The learned-router study's reading: each learned row against uniform and random, paired.

  For every seed both rows have: the relative LM-PPL difference ``100·(ppl_row / ppl_ref − 1)``
  (negative: the learned row is better) and the stream-decision accuracy difference
  ``acc_row − acc_ref`` (positive: better). Cells are mean ± standard error over seeds, with
  ``beats`` true when the row is better on BOTH metrics by at least two standard errors.
  """
  learned = [n for n in rows if n.startswith(("learned", "router_")) and n in rows]
  refs = [r for r in ("uniform", "random") if any(x["row"] == r for x in results)]
  by = {(r["row"], r["seed"]): r for r in results}
  lines = [
    "| learned row | vs | seeds | ΔPPL % per seed | ΔPPL % | Δ stream acc. per seed | "
    "Δ stream acc. | beats (≥ 2 s.e. on both) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  out = []
  for name in learned:
    for ref in refs:
      seeds = sorted(s for (n, s) in by if n == name and (ref, s) in by)
      if not seeds:
        continue
      dppl = [100 * (by[name, s]["lm_ppl"] / by[ref, s]["lm_ppl"] - 1) for s in seeds]
      dacc = [by[name, s]["stream_accuracy"] - by[ref, s]["stream_accuracy"] for s in seeds]
      (mp, sp), (ma, sa) = _mean_sem(dppl), _mean_sem(dacc)
      beats = len(seeds) > 1 and mp < -2 * sp and ma > 2 * sa
      lines.append(
        f"| {name} | {ref} | {','.join(map(str, seeds))} | "
        + ", ".join(f"{v:+.1f}" for v in dppl)
        + f" | {mp:+.1f} ± {sp:.1f} | "
        + ", ".join(f"{v:+.3f}" for v in dacc)
        + f" | {ma:+.3f} ± {sa:.3f} | {'yes' if beats else 'no'} |"
      )
      out.append(
        {
          "row": name,
          "vs": ref,
          "seeds": seeds,
          "dppl_pct": dppl,
          "dppl_pct_mean": mp,
          "dppl_pct_sem": sp,
          "dacc": dacc,
          "dacc_mean": ma,
          "dacc_sem": sa,
          "beats": beats,
        }
      )
  return "\n".join(lines), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds")
  parser.add_argument("--rows", default="", help="comma-separated subset of rows (default all)")
  parser.add_argument("--train_videos", type=int, default=480)
  parser.add_argument("--eval_videos", type=int, default=96)
  parser.add_argument("--workdir", default="/tmp/mod_ablation")
  parser.add_argument("--setting", default="demo", choices=sorted(SETTINGS))
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  rows = _rows(demo.get_config().model.n_layers, args.steps)
  chosen = [r for r in args.rows.split(",") if r] or list(rows)
  unknown = [r for r in chosen if r not in rows]
  if unknown:
    parser.error(f"unknown rows {unknown}; choose from {list(rows)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  os.makedirs(args.workdir, exist_ok=True)
  log_path = os.path.join(args.workdir, "results.jsonl")
  key = lambda r: (r["row"], r["seed"], r.get("steps"), r.get("videos"), r.get("setting", "demo"))
  done = []
  if os.path.exists(log_path):
    with open(log_path) as f:
      done = [json.loads(line) for line in f if line.strip()]
  settings = {
    "steps": args.steps,
    "videos": [args.train_videos, args.eval_videos],
    "setting": args.setting,
  }
  for seed in seeds:
    for name in chosen:
      if any(key(r) == (name, seed, *settings.values()) for r in done):
        continue
      print(f"[ablation] {name} seed {seed} ...", file=sys.stderr, flush=True)
      res = {**run_row(name, rows[name][1], args, seed), **settings}
      print(f"[ablation] {json.dumps(res)}", file=sys.stderr, flush=True)
      done.append(res)
      with open(log_path, "a") as f:
        f.write(json.dumps(res) + "\n")
  results = [
    r
    for r in done
    if r["seed"] in seeds  # all rows: dense / learned are references
    and r.get("steps") == args.steps
    and r.get("videos") == settings["videos"]
    and r.get("setting", "demo") == args.setting
  ]
  text, agg = table(results, {k: rows[k] for k in chosen})
  print(text)
  paired_text, paired = paired_table(results, {k: rows[k] for k in chosen})
  if paired:
    print()
    print(paired_text)
  print(
    json.dumps(
      {
        "rows": agg,
        "paired": paired,
        "settings": {**settings, "seeds": seeds, "config": "configs/demo.py"},
      }
    )
  )


if __name__ == "__main__":
  main()
