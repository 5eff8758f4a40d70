"""The training loop: config → data → sharded model → jitted step → checkpoints → evaluation.

Run it with ``mod-jax train --config configs/demo.py --workdir DIR`` (``DIR`` may be ``gs://...``).
Resumes from the latest checkpoint in ``{workdir}/checkpoints`` (trainable parameters, optimizer
and data-iterator state, on the frozen base the config names; ``mod_jax/train/checkpoint.py``).
Outputs in ``workdir``: ``config.json``, ``tokenizer.json``, ``checkpoints/``, ``tensorboard/``
event files, ``metrics.jsonl`` (the logged train metrics), ``eval.json`` (held-out metrics) and,
with ``profile_steps``, a ``jax.profiler`` trace in ``profile/``.

Every process runs this function (multi-host: ``mod_jax/train/distributed.py``); each reads only
its share of the data (``pipeline.make_dataset``); process 0 writes the logs.

Logged at every ``train.log_every`` steps (TensorBoard ``train/*``): the losses, ``grad_norm``,
``update_norm``, ``learning_rate``, ``step_time`` (seconds per step, compile excluded: the step
is compiled ahead of the first one), ``tokens_per_second`` (slots of the global batch),
``model_flops_per_second`` (analytic step FLOPs, ``mod_jax/analysis/flops.py``), ``mfu`` (those
over the devices' peak bf16 FLOP/s, when the device kind is known) and ``goodput`` (time spent in
train steps / time since the run started, so compile, restore, checkpoint and evaluation time
count against it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import tqdm
from etils import epath

from mod_jax.config import ConfigError, validate, validate_for_training
from mod_jax.convert import pretrained
from mod_jax.data import pipeline
from mod_jax.train import checkpoint, distributed, sharding
from mod_jax.train.state import learning_rate_schedule, trainable_labels
from mod_jax.train.step import eval_step

log = logging.getLogger("mod_jax")

# Peak dense bf16 FLOP/s per chip (vendor data sheets), matched against ``device_kind``.
_PEAK_FLOPS = (
  ("TPU v6", 918e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
)


def peak_flops(device) -> float | None:
  """Peak bf16 FLOP/s of one ``device`` (None for kinds not in the table, e.g. CPU)."""
  kind = getattr(device, "device_kind", "")
  return next((v for k, v in _PEAK_FLOPS if k.lower() in kind.lower()), None)


def _scalars(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def make_eval_step(config, graphdef, tokenizer):
  """The jitted :func:`eval_step` of ``config`` (build it once: each build compiles again)."""
  return jax.jit(
    lambda params, batch: eval_step(
      params,
      batch,
      graphdef=graphdef,
      base_rng=jax.random.key(config.seed + 1),
      interval_id=tokenizer.interval_id,
    )
  )


def evaluate(
  config,
  params,
  graphdef,
  mesh,
  tokenizer,
  *,
  max_batches: int | None = None,
  eval_fn=None,
  index=None,
):
  """Held-out metrics over the eval split (teacher-forced, one pass; ``max_batches`` at most;
  ``index``: the run's ``pipeline.DataIndex``, so the split is indexed once).

  Each process reads its share of the split (windows ``[process_index::process_count]``, padded
  to the same number of batches); the batches are global arrays, so every sum is over the whole
  split, once.

  Returns a dict: ``eval_loss`` (the training loss on held-out rows), ``lm_ppl`` = exp(mean CE of
  assistant text tokens), ``lm_loss``, ``stream_loss``, ``stream_accuracy`` (argmax at frame-end
  slots equals the target), ``speak_recall`` (same, on frames where the target is to speak),
  ``silent_accuracy``, ``lm_token_accuracy``, and the counts.

  Raises:
    RuntimeError: the eval split produced no batch.
  """
  rules = sharding.rules_of(config)
  fn = eval_fn or make_eval_step(config, graphdef, tokenizer)
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


def _first_nonfinite(pending: list) -> tuple[int, str, float] | None:
  """(step, name, value) of the first non-finite metric among ``pending`` (step, {name: device
  scalar}) pairs, in step order."""
  values = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, values):
    for name, v in m.items():
      if not math.isfinite(float(v)):
        return step, name, float(v)
  return None


def train_and_evaluate(
  config,
  workdir: str,
  *,
  progress: bool = True,
  stop_after: int | None = None,
  profile_steps: int = 0,
) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if a checkpoint exists); returns a summary dict.

  Args:
    config: full config; workdir: local path or ``gs://`` URL.
    progress: show a tqdm bar (process 0).
    stop_after: end the run (with a checkpoint, without the final eval) once that many steps are
      done, as a preemption would; a later call resumes to ``train.steps``.
    profile_steps: trace that many steps (after the first) with ``jax.profiler`` into
      ``{workdir}/profile``.

  Returns:
    ``{"state", "graphdef", ...}``: with ``"stopped_at": step`` (and ``"preempted": True`` after
    a SIGTERM) when the run ended early, else the summary written to ``eval.json``.

  Raises:
    ConfigError: the config is impossible on this machine (checked before anything is built).
    FloatingPointError: the loss or the update norm became non-finite; names the step. No
      checkpoint is written from that step on (the last one saved is from before it).
  """
  t_start = time.perf_counter()
  # ------------------------------------------------------------------ Setup
  validate(config, jax.device_count())
  validate_for_training(config)
  if config.model.init_from or config.model.vision.init_from:
    pretrained.check_init_from(config)  # checkpoint vs config, before anything is built
  wd = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
  wd.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config)
  rules = sharding.rules_of(config)
  log.debug("mesh %s over %d devices", dict(mesh.shape), jax.device_count())

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
    saved.data.tokenizer = str(wd / "tokenizer.json")
    (wd / "tokenizer.json").write_text(tokenizer.tokenizer.to_str())
    (wd / "config.json").write_text(saved.to_json_best_effort(indent=2))
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

  # ------------------------------------------------------------------ Model, base and resume
  state, graphdef, tx, state_shardings = sharding.create_train_state(config, mesh)
  labels = trainable_labels(state.params, config.model)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_train = sum(
    x.size
    for x, lab in zip(jax.tree.leaves(state.params), jax.tree.leaves(labels))
    if lab == "train"
  )
  log.debug("model: %.2fM parameters, %.2fM trainable", n_params / 1e6, n_train / 1e6)
  if config.model.init_from or config.model.vision.init_from:  # the frozen base, in place
    for line in pretrained.init_from_pretrained(config, state.params):
      log.debug(line)
  base = checkpoint.base_reference(config)
  mngr = checkpoint.manager(workdir, config.train)
  state, restored = checkpoint.restore_latest(mngr, state, labels, train_iter, base)
  start = int(jax.device_get(state.step))
  if restored is not None:
    log.info("resumed from the checkpoint at step %d", restored)

  # ------------------------------------------------------------------ Compile (not timed as a step)
  t = config.train
  end = t.steps if stop_after is None else min(stop_after, t.steps)
  step_fn = sharding.jit_train_step(config, graphdef, tx, state.params, state_shardings)
  eval_fn = make_eval_step(config, graphdef, tokenizer)
  first_batch = sharding.host_to_global(next(train_iter), mesh, rules) if start < end else None
  compile_s = 0.0
  preemption = distributed.Preemption()  # a SIGTERM from here on stops at a step and saves
  if first_batch is not None:
    t0 = time.perf_counter()
    try:
      with jax.set_mesh(mesh):
        step_fn = step_fn.lower(state, first_batch).compile()
        eval_fn = eval_fn.lower(state.params, first_batch).compile()  # same batch shapes
    except BaseException:
      preemption.close()
      raise
    compile_s = time.perf_counter() - t0
    log.debug("train and eval steps compiled in %.1f s", compile_s)
  # Processes enter the first collective together: gloo (CPU) gives up after 30 s of waiting.
  distributed.barrier("mod_jax/compiled")

  # ------------------------------------------------------------------ Train
  from mod_jax.analysis.flops import analytic_flops

  step_flops = float(analytic_flops(config)["total"])
  peak = peak_flops(jax.devices()[0])
  schedule = learning_rate_schedule(t)
  seq_len = config.data.max_text + config.data.max_frames * config.model.tokens_per_frame
  writer = None
  metrics_lines: list[str] = []
  if is_main:
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(wd / "tensorboard"))
    writer.add_text("data/stats", json.dumps(data.stats()), start)
    if (wd / "metrics.jsonl").exists():
      metrics_lines = (wd / "metrics.jsonl").read_text().splitlines()
  history: list[dict] = []
  evals: list[dict] = []
  bar = tqdm.tqdm(
    total=t.steps,
    initial=start,
    disable=not (progress and is_main),
    desc="train",
    dynamic_ncols=True,
  )
  pending: list = []  # (step, {loss, update_norm} on device) not yet checked for finiteness
  last_saved = restored
  productive = 0.0  # seconds in train steps (goodput's numerator)
  last_time, last_step, overhead = time.perf_counter(), start, 0.0
  eval_every = int(t.get("eval_every", 0) or 0)
  max_eval_batches = t.eval_batches if t.eval_batches > 0 else None

  def run_eval(params):
    return evaluate(
      config,
      params,
      graphdef,
      mesh,
      tokenizer,
      eval_fn=eval_fn,
      index=data,
      max_batches=max_eval_batches,
    )

  profiling = False
  preempted = False

  def check_finite():
    bad = _first_nonfinite(pending)
    pending.clear()
    if bad is not None:
      raise FloatingPointError(
        f"the training {bad[1]} is {bad[2]} at step {bad[0]}; nothing was saved from that step "
        f"on (last checkpoint: {last_saved}). Lower train.learning_rate or raise "
        f"train.warmup_steps, then resume from the last checkpoint or start a new --workdir."
      )

  try:
    with jax.set_mesh(mesh):
      for step in range(start, end):
        if profile_steps and step == start + 1:
          jax.profiler.start_trace(str(wd / "profile"))
          profiling = True
        batch = (
          first_batch if step == start else sharding.host_to_global(next(train_iter), mesh, rules)
        )
        state, metrics = step_fn(state, batch)
        done = step + 1
        pending.append((done, {k: metrics[k] for k in ("loss", "update_norm")}))
        if profiling and done == start + 1 + profile_steps:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
          log.info("profile of steps %d-%d written to %s", start + 2, done, wd / "profile")
        if done % t.log_every == 0 or done == t.steps or step == start:
          check_finite()
          m = _scalars(metrics)
          now = time.perf_counter()
          dt = (now - last_time - overhead) / (done - last_step)
          productive += dt * (done - last_step)
          m.update(
            learning_rate=float(schedule(done - 1)),
            step_time=dt,
            tokens_per_second=t.batch_size * seq_len / dt,
            model_flops_per_second=step_flops / dt,
            goodput=productive / (now - t_start),
          )
          if peak is not None:
            m["mfu"] = step_flops / dt / (peak * jax.device_count())
          last_time, last_step, overhead = now, done, 0.0
          history.append({"step": done, **m})
          if writer is not None:
            for k, v in m.items():
              writer.add_scalar(f"train/{k}", v, done)
            metrics_lines.append(json.dumps(history[-1]))
            (wd / "metrics.jsonl").write_text("\n".join(metrics_lines) + "\n")
          bar.set_postfix(
            loss=f"{m['loss']:.3f}", lm=f"{m['lm_loss']:.3f}", stream=f"{m['stream_loss']:.3f}"
          )
        bar.update(1)
        preempted = preemption.reached(done)
        if preempted or done % t.checkpoint_every == 0 or done == end:
          t0 = time.perf_counter()
          check_finite()
          checkpoint.save(mngr, done, state, labels, train_iter, base)
          last_saved = done
          overhead += time.perf_counter() - t0
          if preempted:
            break
          log.info("checkpoint saved at step %d", done)
        if eval_every and done % eval_every == 0 and done < t.steps:
          t0 = time.perf_counter()
          results = run_eval(state.params)
          evals.append({"step": done, **results})
          if writer is not None:
            for k, v in results.items():
              writer.add_scalar(f"eval/{k}", v, done)
          log.info(
            "eval at step %d: lm_ppl %.3f, stream_accuracy %.3f, speak_recall %.3f",
            done,
            results["lm_ppl"],
            results["stream_accuracy"],
            results["speak_recall"],
          )
          overhead += time.perf_counter() - t0
  finally:
    bar.close()
    if profiling:
      jax.profiler.stop_trace()
    preemption.close()
    t0 = time.perf_counter()
    mngr.wait_until_finished()  # an async save in flight completes (it was checked finite)
    mngr.close()
    if preempted:
      log.info(
        "preempted: checkpoint at step %d written in %.1f s", last_saved, time.perf_counter() - t0
      )
  if writer is not None:
    writer.add_scalar("train/compile_seconds", compile_s, start)
    writer.flush()
  if preempted or end < t.steps:
    if writer is not None:
      writer.close()
    return {"state": state, "graphdef": graphdef, "stopped_at": last_saved, "preempted": preempted}

  # ------------------------------------------------------------------ Evaluate
  results = run_eval(state.params)
  summary = {
    "steps": t.steps,
    "resumed_from": restored,
    "compile_seconds": compile_s,
    "data": data.stats(),
    "first_logged": history[0] if history else None,
    "last_logged": history[-1] if history else None,
    "evals": evals,
    "eval": results,
  }
  if writer is not None:
    for k, v in results.items():
      writer.add_scalar(f"eval/{k}", v, t.steps)
    writer.close()
    (wd / "eval.json").write_text(json.dumps(summary, indent=2))
  return {"state": state, "graphdef": graphdef, **summary}
