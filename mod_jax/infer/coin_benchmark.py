"""The COIN offline benchmarks: step, next, task, procedure, procedure+goal accuracy.

Definitions: videollm-online ``data/coin/benchmarks.py``. Each sample (built by
:mod:`mod_jax.data.tfds.coin_stream`) is a question before the first frame, the frames of one
step segment (task: of the annotated procedure), and the expected answer. The model sees
``<bos>{system}\\nUser: {question}\\n[`` + the frames (the LIVE stream with silent frame ends),
then ``]\\nAssistant:`` and decodes greedily until ``<eos>`` (``evaluator='generate_after_embed'``,
``do_sample=False``, ``max_new_tokens=512``). The decoded text is mapped to the nearest category
by Levenshtein distance (``fuzzy_match``: an exact match has distance 0; ties go to the first
category), categories being every distinct step answer (task: task answer) of COIN.json:

* ``coin_step`` / ``coin_next`` / ``coin_task``: accuracy = mean over samples of
  [nearest category == the answer's category];
* ``coin_procedure`` / ``coin_taskprocedure``: the prediction is split at newlines, each line
  mapped to its nearest step; accuracy = (lines equal to the expected step at the same place,
  summed over samples) / (expected steps, summed over samples) — extra lines count nothing,
  missing lines count as wrong.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm

BENCHMARKS = {
  "coin_step": "step",
  "coin_next": "next",
  "coin_task": "task",
  "coin_procedure": "procedure",
  "coin_taskprocedure": "taskprocedure",
}


def fuzzy_match(text: str, choices: Sequence[str]) -> int:
  """Index of the choice nearest to ``text`` in Levenshtein distance (first on ties)."""
  import Levenshtein

  scores = [Levenshtein.distance(text, c) for c in choices]
  return int(np.argmin(scores))


def accuracy(kind: str, predictions: Sequence[str], answers: Sequence[Sequence[int]], choices):
  """Benchmark accuracy (module docstring) of decoded ``predictions`` against category indices.

  Args:
    kind: ``step``, ``next``, ``task``, ``procedure`` or ``taskprocedure``.
    predictions: decoded answer per sample.
    answers: expected category indices per sample (one; several for the procedures).
    choices: the category strings (steps, or tasks for ``task``).

  Returns:
    float in [0, 1].

  Raises:
    ValueError: unknown kind, or predictions and answers of different lengths / empty.
  """
  if len(predictions) != len(answers) or not answers:
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} samples.")
  if kind in ("step", "next", "task"):
    hits = [fuzzy_match(p, choices) == a[0] for p, a in zip(predictions, answers)]
    return float(np.mean(hits))
  if kind in ("procedure", "taskprocedure"):
    correct = 0
    for p, a in zip(predictions, answers):
      lines = [fuzzy_match(line, choices) for line in p.split("\n")]
      correct += sum(1 for x, y in zip(lines, a) if x == y)
    return correct / sum(len(a) for a in answers)
  raise ValueError(f"benchmark kind {kind!r}; choose one of {sorted(set(BENCHMARKS.values()))}.")


def load_samples(config, benchmark: str, split: str = "test", tfds_dir: str = ""):
  """The benchmark's samples from the built ``coin_stream`` dataset.

  The dataset is ``coin_stream`` in ``tfds_dir`` (default: the config's ``data.tfds_dir``) built
  at the config's fps and image size.

  Returns:
    ``(records, reader, choices)``: :class:`mod_jax.data.tfds.source.TfdsRecord` list, a frames
    reader and the category strings.

  Raises:
    ValueError: unknown benchmark. ConfigError: no such build / split.
  """
  from mod_jax.config import ConfigError
  from mod_jax.data.tfds import source

  if benchmark not in BENCHMARKS:
    raise ValueError(f"--benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}.")
  kind = BENCHMARKS[benchmark]
  c = config.copy_and_resolve_references()
  with c.unlocked():
    name = c.data.get("tfds_name", "")
    c.data.tfds_name = name if name.startswith("coin_stream/") else "coin_stream"
    c.data.tfds_dir = tfds_dir or c.data.get("tfds_dir", "")
    c.data.input = "frames"
  path = source.dataset_dir(c)
  with open(os.path.join(path, "metadata.json")) as f:
    meta = json.load(f)
  name = f"{kind}_{split}"
  if name not in meta.get("index", {}):
    raise ConfigError(f"{path}: no split {name!r} (built: {sorted(meta.get('index', {}))}).")
  records = [
    source.TfdsRecord(
      i, e[0], int(e[1]), tuple(map(tuple, e[2])), tuple(map(tuple, e[3])), tuple(e[4])
    )
    for i, e in enumerate(meta["index"][name])
  ]
  choices = meta["categories"]["tasks" if kind == "task" else "steps"]
  return records, source.TfdsReader(path, name, "frames"), choices


def engine_answer_fn(config, graphdef, params, tokenizer, *, max_new_tokens: int = 512):
  """``(question, frames uint8 [T, S, S, 3]) -> decoded answer`` with the LIVE engine: the
  question enters before the first frame, frames are fed silent, then the answer is decoded
  greedily after the last one."""
  from mod_jax.infer import streaming

  cache: dict[int, Any] = {}

  def answer(question: str, frames: np.ndarray) -> str:
    n = len(frames)
    if n not in cache:  # one engine (cache size) per frame count seen
      cache.clear()
      cache[n] = streaming.StreamEngine.create(
        graphdef,
        params,
        config,
        tokenizer,
        max_frames=n,
        max_text=n + len(tokenizer.encode(question)) + max_new_tokens + 16,
        on_full="stop",
        max_new_tokens=max_new_tokens,
        threshold=0.0,
      )
    engine = cache[n]
    engine.reset()
    engine.add_query(0.0, question)
    for frame in frames:
      engine.push_frame(frame, respond=False)
    return engine.respond_now().text

  return answer


def run_benchmark(
  config,
  benchmark: str,
  answer_fn: Callable[[str, np.ndarray], str],
  *,
  split: str = "test",
  tfds_dir: str = "",
  max_samples: int | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Accuracy of ``answer_fn`` on a COIN benchmark.

  Returns:
    ``{"benchmark", "accuracy", "samples", "split", "seconds", "predictions" (first 20)}``.
  """
  records, reader, choices = load_samples(config, benchmark, split, tfds_dir)
  records = records[:max_samples] if max_samples else records
  start = time.perf_counter()
  predictions = []
  for r in tqdm.tqdm(records, desc=benchmark, disable=not progress):
    frames = reader(r.ref, 0, r.num_frames)
    predictions.append(answer_fn(r.queries[0][1], frames))
  acc = accuracy(BENCHMARKS[benchmark], predictions, [r.answers for r in records], choices)
  return {
    "benchmark": benchmark,
    "accuracy": acc,
    "samples": len(records),
    "split": split,
    "seconds": time.perf_counter() - start,
    "predictions": predictions[:20],
  }
