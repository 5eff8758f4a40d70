"""``mod-jax eval --workdir CKPT [--threshold 0] [--compress SPEC] [--output FILE]``: the four
streaming metrics.

LM-PPL, TimeDiff (seconds), Fluency and LM-Correctness (docs/design.md §3, videollm-online
``stream_evaluate``) of the trained model in ``CKPT`` on the held-out split of its training
config. Prints the metrics as JSON (last stdout line) and writes them to ``--output``
(default ``{workdir}/stream_eval.json``).

``mod-jax eval --workdir CKPT --benchmark coin_step|coin_next|coin_task|coin_procedure|
coin_taskprocedure``: the COIN benchmark's accuracy instead (:mod:`mod_jax.infer.coin_benchmark`)
on a ``coin_stream`` build (``--benchmark_dir``, default the config's ``data.tfds_dir``);
written to ``{workdir}/{benchmark}.json`` by default.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app
from absl import logging as absl_logging

from mod_jax import flags as mj_flags
from mod_jax.infer import flags as f


def run_eval(
  workdir: str,
  *,
  threshold: float = 0.0,
  output: str | None = None,
  max_samples: int | None = None,
  step: int | None = None,
  progress: bool = True,
  compress: str | None = None,
) -> dict:
  """Evaluates the model of ``workdir``; writes and returns the metrics dict.

  ``compress``: a ``--compress`` spec (``mod_jax.compress.apply.parse``). Raises ValueError for
  a bad spec or one the model cannot run."""
  from mod_jax.compress import apply
  from mod_jax.convert import pretrained
  from mod_jax.data import pipeline
  from mod_jax.infer.evaluate import stream_evaluate

  compression = apply.parse(compress)
  config, graphdef, params, ckpt_step = pretrained.restore_params(workdir, step)
  tokenizer = pipeline.load_tokenizer(config)
  result = stream_evaluate(
    config,
    graphdef,
    params,
    tokenizer,
    threshold=threshold,
    max_samples=max_samples,
    progress=progress,
    compression=compression,
  )
  result = {"workdir": workdir, "step": ckpt_step, "compress": str(compression or "none"), **result}
  output = output or os.path.join(workdir, "stream_eval.json")
  with open(output, "w") as fh:
    json.dump(result, fh, indent=2)
  return result


def run_benchmark_eval(
  workdir: str,
  benchmark: str,
  *,
  tfds_dir: str = "",
  split: str = "test",
  output: str | None = None,
  max_samples: int | None = None,
  max_new_tokens: int = 512,
  step: int | None = None,
  progress: bool = True,
) -> dict:
  """COIN benchmark accuracy of the model of ``workdir``; writes and returns the result dict."""
  from mod_jax.convert import pretrained
  from mod_jax.data import pipeline
  from mod_jax.infer import coin_benchmark

  config, graphdef, params, ckpt_step = pretrained.restore_params(workdir, step)
  tokenizer = pipeline.load_tokenizer(config)
  answer = coin_benchmark.engine_answer_fn(
    config, graphdef, params, tokenizer, max_new_tokens=max_new_tokens
  )
  result = coin_benchmark.run_benchmark(
    config,
    benchmark,
    answer,
    split=split,
    tfds_dir=tfds_dir,
    max_samples=max_samples,
    progress=progress,
  )
  result = {"workdir": workdir, "step": ckpt_step, **result}
  with open(output or os.path.join(workdir, f"{benchmark}.json"), "w") as fh:
    json.dump(result, fh, indent=2)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's read-only checkpoint notices
  if not mj_flags.WORKDIR.value:
    raise app.UsageError("mod-jax eval needs --workdir (a directory written by mod-jax train).")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  threshold = 0.0 if f.THRESHOLD.value is None else f.THRESHOLD.value
  if f.BENCHMARK.value:
    from mod_jax.config import ConfigError

    try:
      result = run_benchmark_eval(
        mj_flags.WORKDIR.value,
        f.BENCHMARK.value,
        tfds_dir=f.BENCHMARK_DIR.value,
        split=f.BENCHMARK_SPLIT.value,
        output=f.OUTPUT.value,
        max_samples=f.MAX_SAMPLES.value,
        max_new_tokens=512 if f.MAX_NEW_TOKENS.present == 0 else f.MAX_NEW_TOKENS.value,
        step=f.STEP.value,
      )
    except (FileNotFoundError, ValueError, ConfigError) as e:
      sys.exit(f"mod-jax eval: error: {e}")
    print(json.dumps(result))
    return
  try:
    result = run_eval(
      mj_flags.WORKDIR.value,
      threshold=threshold,
      output=f.OUTPUT.value,
      max_samples=f.MAX_SAMPLES.value,
      step=f.STEP.value,
      compress=f.COMPRESS.value,
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"mod-jax eval: error: {e}")
  print(json.dumps(result))
