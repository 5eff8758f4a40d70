"""``mod-jax flops``: the analytic training-step FLOPs agree with XLA's count (the oracle), per
step and per decoder layer, and the command prints the report."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.analysis import flops
from mod_jax.model.llm import DecoderLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_report():
  return flops.analyze(tiny.get_config())


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mod", "dense"])
def test_analytic_step_flops_match_xla_within_5_percent(tiny_report, model):
  rep = tiny_report[model]
  assert rep["xla"]["flops"] > 0
  assert abs(rep["xla_over_analytic"] - 1.0) < 0.05, rep["xla_over_analytic"]


def test_ratios_and_memory(tiny_report):
  r = tiny_report["ratios"]
  assert r["flops_xla"] < 0.85  # half the layers drop 80% of vision tokens
  assert abs(r["flops_analytic"] - r["flops_xla"]) < 0.02
  assert r["peak_memory"] < 1.0 and r["temp_memory"] < 1.0
  mod_layers = tiny_report["mod"]["analytic"]["per_layer"]
  c = tiny.get_config()
  assert [x["keep"] for x in mod_layers] == [None, 2, None, 2]
  assert [x["compact_len"] for x in mod_layers] == [
    c.data.max_text + c.data.max_frames * k for k in (10, 2, 10, 2)
  ]


@pytest.mark.parametrize("k", [10, 2])
def test_per_layer_count_matches_xla(k):
  """One decoder layer, forward + backward (weights and input), on the compact length of a layer
  keeping k of 10 tokens per frame; XLA's count within 5% of the layer's analytic count."""
  c = tiny.get_config("dense" if k == 10 else "")
  c.model.mod.insertion = "all"
  c.model.mod.keep_ratio = k / 10
  c.model.mod.selection = "uniform"  # no router term: the layer alone
  counts = flops.analytic_flops(c)["per_layer"][0]
  layer = DecoderLayer(c.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  b, length = c.train.batch_size, counts.compact_len
  x = jax.ShapeDtypeStruct((b, length, c.model.d_model), jnp.float32)
  pos = jax.ShapeDtypeStruct((b, length), jnp.int32)

  def loss(p, x, pos):
    return jnp.sum(nnx.merge(graphdef, p)(x, pos, jnp.ones_like(pos)) ** 2)

  xla = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, pos).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  analytic = counts.text + counts.vision
  assert abs(xla["flops"] / analytic - 1.0) < 0.05, (xla["flops"], analytic)


def test_frozen_vision_tower_counts_forward_only():
  c = tiny.get_config()
  c.model.vision.trainable = False
  a = flops.analytic_flops(c)
  trainable = flops.analytic_flops(tiny.get_config())
  assert a["by_class"]["vision_tower"] < 0.5 * trainable["by_class"]["vision_tower"]
  xla = flops.xla_step_analysis(c)
  assert abs(xla["flops"] / a["total"] - 1.0) < 0.05


def test_command_prints_json():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "mod_jax.cli",
      "flops",
      "--config",
      "configs/tiny.py",
      "--json",
      "--analytic_only",
      "--config.model.mod.keep_ratio=0.1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["config"]["keep_per_layer"] == [None, 1, None, 1]
  assert 0 < report["ratios"]["flops_analytic"] < 1
  assert set(report["mod"]["analytic"]["by_class"]) >= {
    "decoder_text",
    "decoder_vision",
    "vision_tower",
    "lm_head",
    "router",
  }
  assert np.isclose(
    sum(report["mod"]["analytic"]["by_class"].values()), report["mod"]["analytic"]["total"]
  )


def test_command_needs_config():
  out = subprocess.run(
    [sys.executable, "-m", "mod_jax.cli", "flops"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0 and "needs --config" in out.stderr
