"""The training loop: config → data → sharded model → jitted step → checkpoints → final eval.

Run it with ``mod-jax train --config configs/demo.py --workdir DIR``. Resumes from the latest
checkpoint in ``{workdir}/checkpoints`` (model, optimizer and data-iterator state).
Outputs in ``workdir``: ``config.json``, ``tokenizer.json``, ``checkpoints/``, ``tensorboard/``
event files, ``metrics.jsonl`` (the logged train metrics) and ``eval.json`` (held-out metrics).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time

import jax
import tqdm

from mod_jax.config import ConfigError, validate, validate_for_training
from mod_jax.convert import pretrained
from mod_jax.data import pipeline
from mod_jax.train import checkpoint, sharding
from mod_jax.train.step import eval_step

log = logging.getLogger("mod_jax")


def _scalars(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(config, params, graphdef, mesh, tokenizer, *, max_batches=None, index=None):
  """Held-out metrics over the eval split (teacher-forced, one pass; ``max_batches`` at most;
  ``index``: the run's ``pipeline.DataIndex``, so the split is indexed once).

  Returns a dict: ``eval_loss`` (the training loss on held-out rows), ``lm_ppl`` = exp(mean CE of
  assistant text tokens), ``lm_loss``, ``stream_loss``, ``stream_accuracy`` (argmax at frame-end
  slots equals the target), ``speak_recall`` (same, on frames where the target is to speak),
  ``silent_accuracy``, ``lm_token_accuracy``, and the counts.
  """
  rules = sharding.rules_of(config)
  fn = jax.jit(
    functools.partial(
      eval_step,
      graphdef=graphdef,
      base_rng=jax.random.key(config.seed + 1),
      interval_id=tokenizer.interval_id,
    )
  )
  sums = None
  ds = pipeline.make_dataset(
    config,
    "eval",
    tokenizer,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    index=index,
  )
  with jax.set_mesh(mesh):
    for i, batch in enumerate(ds):
      if max_batches is not None and i >= max_batches:
        break
      out = _scalars(fn(params, sharding.host_to_global(batch, mesh, rules)))
      sums = out if sums is None else {k: sums[k] + out[k] for k in sums}
  if not sums:
    raise RuntimeError("the eval split produced no batches; check data.procedural / data.dir.")
  w = config.train.stream_loss_weight
  nt, nf = max(sums["text_count"], 1.0), max(sums["frame_count"], 1.0)
  silent = max(sums["frame_count"] - sums["speak_count"], 1.0)
  return {
    "eval_loss": (sums["text_ce_sum"] + w * sums["frame_ce_sum"]) / max(nt + nf, 1.0),
    "lm_loss": sums["text_ce_sum"] / nt,
    "lm_ppl": math.exp(sums["text_ce_sum"] / nt),
    "stream_loss": sums["frame_ce_sum"] / nf,
    "stream_accuracy": sums["frame_correct"] / nf,
    "speak_recall": sums["speak_correct"] / max(sums["speak_count"], 1.0),
    "silent_accuracy": (sums["frame_correct"] - sums["speak_correct"]) / silent,
    "lm_token_accuracy": sums["text_correct"] / nt,
    "text_tokens": sums["text_count"],
    "frame_decisions": sums["frame_count"],
  }


def train_and_evaluate(
  config, workdir: str, *, progress: bool = True, stop_after: int | None = None
) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if a checkpoint exists); returns a summary dict.

  ``stop_after`` ends the run (with a checkpoint, without the final eval) once that many steps
  are done, as a preemption would; a later call resumes to ``train.steps``.

  Raises:
    ConfigError: the config is impossible on this machine (checked before anything is built).
  """
  # ------------------------------------------------------------------ Setup
  validate(config, jax.device_count())
  validate_for_training(config)
  if config.model.init_from or config.model.vision.init_from:
    pretrained.check_init_from(config)  # checkpoint vs config, before anything is built
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config)
  rules = sharding.rules_of(config)
  log.info("mesh %s over %d devices", dict(mesh.shape), jax.device_count())

  # ------------------------------------------------------------------ Data
  pipeline.prepare_data(config)
  tokenizer = pipeline.load_tokenizer(config)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(
      f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
      f"{config.model.vocab_size}; raise --config.model.vocab_size."
    )
  if is_main:  # the run's config, pointing at a copy of its tokenizer (for stream / convert)
    saved = config.copy_and_resolve_references()
    saved.data.tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
    tokenizer.tokenizer.save(saved.data.tokenizer)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(saved.to_json_best_effort(indent=2))
  data = pipeline.DataIndex(config, tokenizer, jax.process_index(), jax.process_count())
  train_ds = pipeline.make_dataset(
    config,
    "train",
    tokenizer,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    index=data,
  )
  train_iter = iter(train_ds)

  # ------------------------------------------------------------------ Model and optimizer
  state, graphdef, tx, state_shardings = sharding.create_train_state(config, mesh)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  log.info("model: %.2fM parameters", n_params / 1e6)

  # ------------------------------------------------------------------ Resume
  mngr = checkpoint.manager(workdir, config.train)
  state, restored = checkpoint.restore_latest(mngr, state, train_iter)
  start = int(jax.device_get(state.step))
  if restored is not None:
    log.info("resumed from checkpoint at step %d", restored)
  elif config.model.init_from or config.model.vision.init_from:  # pretrained weights, in place
    for line in pretrained.init_from_pretrained(config, state.params):
      log.info(line)

  step_fn = sharding.jit_train_step(config, graphdef, tx, state.params, state_shardings)

  # ------------------------------------------------------------------ Train
  t = config.train
  writer = None
  if is_main:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    writer.add_text("data/stats", json.dumps(data.stats()), start)
  seq_len = config.data.max_text + config.data.max_frames * config.model.tokens_per_frame
  history = []
  bar = tqdm.tqdm(
    total=t.steps,
    initial=start,
    disable=not (progress and is_main),
    desc="train",
    dynamic_ncols=True,
  )
  last_time, last_step = time.perf_counter(), start
  with jax.set_mesh(mesh):
    end = t.steps if stop_after is None else min(stop_after, t.steps)
    for step in range(start, end):
      batch = sharding.host_to_global(next(train_iter), mesh, rules)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if done % t.log_every == 0 or done == t.steps or step == start:
        m = _scalars(metrics)
        now = time.perf_counter()
        m["tokens_per_second"] = (done - last_step) * t.batch_size * seq_len / (now - last_time)
        last_time, last_step = now, done
        history.append({"step": done, **m})
        if writer is not None:
          for k, v in m.items():
            writer.add_scalar(f"train/{k}", v, done)
          with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(history[-1]) + "\n")
        bar.set_postfix(
          loss=f"{m['loss']:.3f}", lm=f"{m['lm_loss']:.3f}", stream=f"{m['stream_loss']:.3f}"
        )
      if done % t.checkpoint_every == 0 or done == end:
        checkpoint.save(mngr, done, state, train_iter)
      bar.update(1)
  bar.close()
  if end < t.steps:
    return {"state": state, "graphdef": graphdef, "stopped_at": end}

  # ------------------------------------------------------------------ Evaluate
  results = evaluate(
    config,
    state.params,
    graphdef,
    mesh,
    tokenizer,
    max_batches=t.eval_batches if t.eval_batches > 0 else None,
    index=data,
  )
  summary = {
    "steps": t.steps,
    "resumed_from": restored,
    "data": data.stats(),
    "first_logged": history[0] if history else None,
    "last_logged": history[-1] if history else None,
    "eval": results,
  }
  if writer is not None:
    for k, v in results.items():
      writer.add_scalar(f"eval/{k}", v, t.steps)
    writer.close()
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return {"state": state, "graphdef": graphdef, **summary}
