"""VideoLLM-MoD, γ-MoD, DyCoke and FastV on one model, one dataset, one budget (docs/compare.md).

Per seed, four models are trained from scratch on the procedural data (``configs/demo.py``, the
same step budget, data order and initialisation seed): dense, VideoLLM-MoD (learned, r = 0.2,
interleaved) and γ-MoD (``configs/demo.py:gamma``: shared router, masked routing, top-C over the
row on the interleaved layers, C matched to MoD's compact length); ``gamma_mod_arank`` trains the
same γ-MoD on the layers ``mod-jax arank`` recommends on the first seed's trained dense model
(the n/2 lowest-ARank layers: as many routed layers and the same C, so the same training FLOPs;
:func:`arank`). The training-free methods are
applied to the trained checkpoints: FastV (K = 2, R = 0.5) and DyCoke (K = 0.7, P = 0.7, L = 3)
on dense, and MoD + DyCoke TTM (K = 0.7; P = 0, since KV pruning needs dense layers L−1..n−1
and the 4-layer MoD stack has none). γ-MoD is evaluated with its inference threshold (causal)
and, to measure the train/inference mismatch, with the training rule (top-C over the row).

Every method is evaluated with ``stream_evaluate`` (``mod-jax eval``: LM-PPL, TimeDiff, Fluency,
LM-Correctness, stream-decision accuracy) on the held-out split.

  python benchmarks/compare_methods.py --steps 300 --seeds 0,1,2 --workdir /tmp/mod_compare

Analytic columns (from the methods' definitions, no measurement): training FLOPs ratio
(``mod_jax.analysis.flops``; γ-MoD: matched to MoD by construction), decoder token-layers of a
prefill relative to dense (linear terms; attention's quadratic term ignored), KV entries per frame
per layer in this 4-layer model, and the KV bytes of a 1-hour 2 fps stream at the 8B config
(32 layers, 8 KV heads × 128, bf16) with the method's per-layer pattern scaled to 32 layers.

Finished (method, seed) records are appended to ``{workdir}/results.jsonl`` and skipped when the
script runs again (a model whose training finished, ``{workdir}/{model}_seed{seed}/compare_train.json``,
is not trained again); ``--report FILE`` re-prints the table from such a file without training. The
LAST stdout line is one JSON object ``{"methods": {name: {...}}, "settings": {...}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo

N_FRAME = 10  # tokens per frame in the demo and the 8B config
ARANK_SAMPLES = 16  # eval windows ARank is averaged over (gamma_mod_arank)

# name -> (trained model, --compress spec, paper's claim)
METHODS = {
  "dense": ("dense", None, "-"),
  "videollm_mod": ("mod", None, "VideoLLM-MoD: 0.6x training FLOPs, quality = full computation"),
  "gamma_mod": ("gamma", None, "γ-MoD: -31% training time, +53% throughput, -1.5% accuracy"),
  "gamma_mod_topC": ("gamma", "topC", "(training rule at inference: the mismatch)"),
  "gamma_mod_arank": ("gamma_arank", None, "γ-MoD on the layers ARank chooses"),
  "fastv": ("dense", "fastv:K=2,R=0.5", "FastV: -45% FLOPs, no loss (LLaVA-1.5-13B)"),
  "dycoke": ("dense", "dycoke:K=0.7,P=0.7,L=3", "DyCoke: 1.54x faster, 34->24 GB, no loss"),
  "mod_dycoke": ("mod", "dycoke:K=0.7,P=0,L=3", "(combination; not in either paper)"),
}
METRICS = ("lm_ppl", "time_diff", "fluency", "lm_correctness", "stream_decision_accuracy")


def make_config(model: str, args, seed: int):
  c = demo.get_config(
    {"dense": "dense", "mod": "", "gamma": "gamma", "gamma_arank": "gamma"}[model]
  )
  c.seed = seed
  t = c.train
  t.steps = args.steps
  t.warmup_steps = min(t.warmup_steps, args.steps // 6)
  t.checkpoint_every = args.steps
  t.log_every = max(args.steps // 10, 1)
  t.eval_batches = 0
  p = c.data.procedural
  p.num_train_videos = args.train_videos
  p.num_eval_videos = args.eval_videos
  if model == "gamma_arank":
    c.model.mod.insertion = arank(args)["recommended"]["lowest"]
  return c


def arank(args) -> dict:
  """``mod-jax arank``'s report on the trained dense model of the first seed (``arank.json`` in
  its workdir, computed on first use over ``ARANK_SAMPLES`` eval windows): the ARank of every
  layer and the insertion list it recommends, the n/2 lowest-ARank layers — as many routed
  layers as the interleaved list, so with the same capacity C γ-MoD's training FLOPs stay
  matched to VideoLLM-MoD's."""
  from mod_jax.compress.arank_main import run_arank

  seed = args.arank_seed
  workdir = os.path.join(args.workdir, f"dense_seed{seed}")
  path = os.path.join(workdir, "arank.json")
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
    if report["samples"] == ARANK_SAMPLES:
      return report
  if not os.path.exists(os.path.join(workdir, "compare_train.json")):
    train("dense", args, seed)
  return run_arank(make_config("dense", args, seed), workdir, ARANK_SAMPLES, progress=False)


def analytic(method: str, n_layers: int = 4) -> dict:
  """Token-layer and KV columns of a method from its definition (see module docstring)."""
  model, spec, _ = METHODS[method]
  from mod_jax.compress import apply, dycoke, fastv

  comp = apply.parse(spec) if spec and spec != "topC" else None

  def per_layer(n):  # vision entries per frame in each of n layers
    if model == "mod":
      k = math.ceil(0.2 * N_FRAME - 1e-9)
      v = [N_FRAME if i % 2 == 0 else k for i in range(n)]
    else:
      v = [N_FRAME] * n
    if comp is not None and comp.method == "fastv":
      v = [x if i < comp.k else fastv.kept_count(N_FRAME, comp.r) for i, x in enumerate(v)]
    if comp is not None and comp.method == "dycoke":
      ttm = dycoke.causal_keep_counts(comp.k, N_FRAME, 4, **apply.TTM_KEEP) / 4
      v = [min(x, ttm) for x in v]
    return v

  demo_v = per_layer(n_layers)
  big_v = per_layer(32)
  bytes_per_entry = 2 * 8 * 128 * 2  # K and V, 8 KV heads x 128, bf16
  frames = 3600 * 2
  return {
    "vision_token_layers": sum(demo_v) / (N_FRAME * n_layers),
    "kv_entries_per_frame": sum(demo_v) / n_layers + 1,  # + the interval token
    "kv_gib_1h_8b": frames * (sum(big_v) + 32) * bytes_per_entry / 2**30,
  }


def train(model: str, args, seed: int) -> dict:
  from mod_jax.analysis import flops
  from mod_jax.train.loop import train_and_evaluate

  config = make_config(model, args, seed)
  workdir = os.path.join(args.workdir, f"{model}_seed{seed}")
  summary = os.path.join(workdir, "compare_train.json")
  if os.path.exists(summary):  # trained by an earlier, interrupted run of this script
    with open(summary) as f:
      done = json.load(f)
    if done["steps"] == args.steps:
      return done
  start = time.perf_counter()
  out = train_and_evaluate(config, workdir, progress=False)
  if out["last_logged"] is None:
    raise RuntimeError(
      f"{workdir} holds a finished checkpoint without {summary}; delete the directory to retrain."
    )
  dense = flops.analytic_flops(flops.dense_counterpart(config))["total"]
  ratio = flops.analytic_flops(config)["total"] / dense
  if model.startswith("gamma"):  # the analytic count does not model sequence routing: = MoD
    mod_cfg = make_config("mod", args, seed)
    ratio = flops.analytic_flops(mod_cfg)["total"] / dense
  done = {
    "workdir": workdir,
    "steps": args.steps,
    "train_seconds": time.perf_counter() - start,
    "train_flops_ratio": ratio,
    "router": {k: v for k, v in out["last_logged"].items() if k.startswith("router")},
  }
  with open(summary, "w") as f:
    json.dump(done, f)
  return done


def evaluate(method: str, trained: dict, args, seed: int) -> dict:
  from flax import nnx

  from mod_jax.compress import apply
  from mod_jax.convert import pretrained
  from mod_jax.data import pipeline
  from mod_jax.infer.evaluate import stream_evaluate

  model, spec, _ = METHODS[method]
  config, graphdef, params, _ = pretrained.restore_params(trained["workdir"])
  compression = None
  if spec == "topC":  # γ-MoD with its training rule at inference (not causal)
    m = nnx.merge(graphdef, params)
    m.llm.plan = dataclasses.replace(m.llm.plan, threshold=None)
    graphdef = nnx.split(m, nnx.Param)[0]
  elif spec:
    compression = apply.parse(spec)
  tokenizer = pipeline.load_tokenizer(config)
  ev = stream_evaluate(config, graphdef, params, tokenizer, progress=False, compression=compression)
  return {k: ev[k] for k in METRICS} | {"eval_seconds": ev["seconds"]}


def stream_fps(method: str, trained: dict, frames) -> float:
  """Frames per second of the streaming engine on ``frames`` (after compilation)."""
  from mod_jax.compress import apply
  from mod_jax.convert import pretrained
  from mod_jax.data import pipeline
  from mod_jax.infer import streaming

  model, spec, _ = METHODS[method]
  if spec == "topC":
    return float("nan")  # top-C over a row cannot stream
  config, graphdef, params, _ = pretrained.restore_params(trained["workdir"])
  tokenizer = pipeline.load_tokenizer(config)
  engine = streaming.StreamEngine.create(
    graphdef,
    params,
    config,
    tokenizer,
    max_frames=len(frames) + 8,
    max_text=2048,
    compression=apply.parse(spec) if spec else None,
  )
  engine.warmup()
  for f in frames[:8]:  # compile every path a stream takes (responses, TTM window offsets)
    engine.push_frame(f)
  engine.reset()
  start = time.perf_counter()
  for f in frames:
    engine.push_frame(f)
  return len(frames) / (time.perf_counter() - start)


def _mean_sem(vals):
  sem = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
  return statistics.fmean(vals), sem


def per_run(records: list[dict]) -> str:
  """Markdown table of every (method, seed) record, seeds in order, methods as ``METHODS``."""
  lines = [
    "| method | seed | LM-PPL | TimeDiff s | Fluency | LM-Correct. | stream acc. | train s | "
    "stream fps |",
    "|" + "---|" * 9,
  ]
  order = {name: i for i, name in enumerate(METHODS)}
  for r in sorted(records, key=lambda r: (r["seed"], order.get(r["method"], len(order)))):
    fps = r.get("fps")
    lines.append(
      f"| {r['method']} | {r['seed']} | {r['lm_ppl']:.4f} | {r['time_diff']:.3f} | "
      f"{r['fluency']:.4f} | {r['lm_correctness']:.4f} | {r['stream_decision_accuracy']:.4f} | "
      f"{r['train_seconds']:.0f} | {'' if fps is None or fps != fps else f'{fps:.1f}'} |"
    )
  return "\n".join(lines)


def table(records: list[dict]) -> tuple[str, dict]:
  """Markdown table (mean ± s.e. over seeds, paired differences vs dense) and the JSON rows."""
  dense = {r["seed"]: r for r in records if r["method"] == "dense"}
  head = (
    "| method | train FLOPs | vision token-layers | KV entries/frame | KV GiB 1 h @8B | stream fps "
    "ratio | LM-PPL | ΔPPL vs dense | TimeDiff s | Fluency | LM-Correct. | stream acc. | "
    "Δacc vs dense | seeds |"
  )
  lines = [head, "|" + "---|" * 14]
  out = {}
  for name in METHODS:
    rs = sorted((r for r in records if r["method"] == name), key=lambda r: r["seed"])
    if not rs:
      continue
    a = analytic(name)
    row = {**a, "train_flops_ratio": rs[0]["train_flops_ratio"], "seeds": [r["seed"] for r in rs]}
    cells = []
    for key in METRICS:
      m, s = _mean_sem([r[key] for r in rs])
      row[key], row[key + "_sem"] = m, s
    for key, tag in (("lm_ppl", "dppl"), ("stream_decision_accuracy", "dacc")):
      d = [r[key] - dense[r["seed"]][key] for r in rs if r["seed"] in dense]
      if d:
        row[tag], row[tag + "_sem"] = _mean_sem(d)
    fps = [r["fps"] / dense[r["seed"]]["fps"] for r in rs if r.get("fps") and r["seed"] in dense]
    fps = [f for f in fps if f == f]
    row["fps_ratio"] = statistics.fmean(fps) if fps else None
    fmt = lambda k, d=3, row=row: f"{row[k]:.{d}f} ± {row[k + '_sem']:.{d}f}" if k in row else ""
    cells = [
      f"{row['train_flops_ratio']:.3f}",
      *(
        ["data-dep."] * 3
        if name.startswith("gamma")
        else [
          f"{a['vision_token_layers']:.3f}",
          f"{a['kv_entries_per_frame']:.2f}",
          f"{a['kv_gib_1h_8b']:.1f}",
        ]
      ),
      "" if row["fps_ratio"] is None else f"{row['fps_ratio']:.2f}",
      fmt("lm_ppl"),
      fmt("dppl"),
      fmt("time_diff", 2),
      fmt("fluency"),
      fmt("lm_correctness"),
      fmt("stream_decision_accuracy"),
      fmt("dacc"),
      ",".join(map(str, row["seeds"])),
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out[name] = row
  return "\n".join(lines), out


def plot(rows: dict, path: str) -> None:
  """LM-PPL and stream-decision accuracy against the prefill's vision token-layers (PNG; needs
  the ``plot`` extra). γ-MoD is placed at MoD's value: its capacity is matched to MoD's compact
  length in training (at inference the threshold decides, data-dependent)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, key, label in (
    (axes[0], "lm_ppl", "held-out LM-PPL (lower is better)"),
    (axes[1], "stream_decision_accuracy", "stream-decision accuracy"),
  ):
    for name, r in rows.items():
      x = r["vision_token_layers"]
      if name.startswith("gamma"):
        x = analytic("videollm_mod")["vision_token_layers"]
      ax.errorbar(x, r[key], yerr=r[key + "_sem"], fmt="o", capsize=3)
      ax.annotate(name, (x, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("vision token-layers of a prefill / dense")
    ax.set_ylabel(label)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--methods", default="", help="comma-separated subset (default all)")
  parser.add_argument("--train_videos", type=int, default=480)
  parser.add_argument("--eval_videos", type=int, default=96)
  parser.add_argument("--workdir", default="/tmp/mod_compare")
  parser.add_argument("--report", default="", help="re-print the table of a results.jsonl")
  parser.add_argument("--plot", default="", help="write the quality-vs-compute plot (PNG) here")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  if args.report:
    with open(args.report) as f:
      records = [json.loads(line) for line in f if line.strip()]
    text, rows = table(records)
    if args.plot:
      plot(rows, args.plot)
    print(text + "\n\nPer run:\n\n" + per_run(records))
    print(json.dumps({"methods": rows, "settings": {"report": args.report}}))
    return
  methods = [m for m in args.methods.split(",") if m] or list(METHODS)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  args.arank_seed = seeds[0]
  os.makedirs(args.workdir, exist_ok=True)
  log_path = os.path.join(args.workdir, "results.jsonl")
  settings = {"steps": args.steps, "videos": [args.train_videos, args.eval_videos]}
  done = []
  if os.path.exists(log_path):
    with open(log_path) as f:
      done = [json.loads(line) for line in f if line.strip()]
  is_done = lambda m, s: any(
    (r["method"], r["seed"], r["steps"], r["videos"]) == (m, s, args.steps, settings["videos"])
    for r in done
  )
  for seed in seeds:
    trained: dict[str, dict] = {}
    frames = None
    for name in methods:
      if is_done(name, seed):
        continue
      model = METHODS[name][0]
      if model not in trained:
        print(f"[compare] train {model} seed {seed}", file=sys.stderr, flush=True)
        trained[model] = train(model, args, seed)
      print(f"[compare] eval {name} seed {seed}", file=sys.stderr, flush=True)
      rec = {"method": name, "seed": seed, **settings, **evaluate(name, trained[model], args, seed)}
      rec.update(train_flops_ratio=trained[model]["train_flops_ratio"])
      rec.update(router=trained[model]["router"], train_seconds=trained[model]["train_seconds"])
      if model == "gamma_arank":
        rep = arank(args)
        rec.update(arank={k: rep[k] for k in ("arank", "arank_std", "samples", "recommended")})
        rec["arank"]["seed"] = args.arank_seed
      if seed == seeds[0]:
        if frames is None:
          frames = _stream_frames(make_config("dense", args, seed))
        rec["fps"] = stream_fps(name, trained[model], frames)
      done.append(rec)
      with open(log_path, "a") as f:
        f.write(json.dumps(rec) + "\n")
  records = [r for r in done if r["seed"] in seeds and r["steps"] == args.steps]
  text, rows = table(records)
  if args.plot:
    plot(rows, args.plot)
  print(text + "\n\nPer run:\n\n" + per_run(records))
  print(json.dumps({"methods": rows, "settings": {**settings, "seeds": seeds}}))


def _stream_frames(config, count: int = 48):
  """Frames of the first eval clip (the streaming speed input), uint8 [count, S, S, 3]."""
  from mod_jax.data import pipeline
  from mod_jax.data.sources import folder

  tokenizer = pipeline.load_tokenizer(config)
  index = pipeline.load_split(config, "eval", tokenizer)
  rec = index.records[index.windows[0][0]]
  frames = folder.load_frames(rec.path, float(config.data.fps), int(config.model.vision.image_size))
  reps = -(-count // len(frames))
  import numpy as np

  return np.concatenate([frames] * reps)[:count]


if __name__ == "__main__":
  main()
