"""Router training options of the one MoD mechanism (mod_jax/model/mod.py; docs/ablation.md
"Learned router"): the annealed gate, Gumbel exploration, the router on the input-normed hidden
(γ-MoD), and the auxiliary BCE's gradient on skipped tokens. Oracles: hand-computed gates and
BCE gradients, the dense model, the noise-free top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.config import ConfigError, validate
from mod_jax.model import mod
from mod_jax.model.video_llm import VideoLLM
from mod_jax.train.step import router_mix
from tests.helpers import frame_scores_router, ordered_row, synthetic_batch


def _sigmoid(s):
  return 1.0 / (1.0 + np.exp(-s))


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.0])
def test_annealed_gate_forward_value_and_gradient(mix):
  s = jnp.array([-2.0, 0.0, 1.5])
  sig = _sigmoid(np.asarray(s))
  g = mod.router_gate(s, "ste", jnp.float32(mix))
  np.testing.assert_allclose(g, mix * sig + 1.0 - mix, rtol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(mod.router_gate(v, "ste", jnp.float32(mix)) * v.size))(s)
  np.testing.assert_allclose(grad, s.size * sig * (1 - sig), rtol=1e-5)  # sigmoid' for any mix
  np.testing.assert_array_equal(mod.router_gate(s, "ste", 0.0), np.ones(3, np.float32))


def test_router_mix_schedule():
  assert [float(router_mix(t, 100)) for t in (0, 25, 100, 250)] == [1.0, 0.75, 0.0, 0.0]
  assert float(router_mix(7, 0)) == 0.0


def _r1_models(**mod_settings):
  dense = tiny.get_config("dense")
  c = tiny.get_config()
  c.model.mod.update(dict(insertion="all", keep_ratio=1.0, **mod_settings))
  validate(c)
  return VideoLLM(dense.model, rngs=nnx.Rngs(0)), VideoLLM(c.model, rngs=nnx.Rngs(0)), dense


def test_r1_with_the_recipe_at_the_end_of_the_anneal_equals_dense():
  """The documented invariant: with the annealed gate (and exploration, and the normed router),
  r = 1 at mix = 0 (the end of the anneal, evaluation, inference) gives the dense logits; at
  mix = 1 (the start of the anneal) it does not (the gate is sigmoid(s) < 1)."""
  dense, routed, c = _r1_models(
    router_anneal_steps=4, router_explore=1.0, router_input="normed", router_aux_loss_weight=0.01
  )
  batch = synthetic_batch(c, 2)
  rng = jax.random.key(1)
  t_d, f_d, _ = dense.hidden(batch)
  t_m, f_m, aux = routed.hidden(batch, rng=rng, router_mix=jnp.float32(0.0))
  assert set(aux) == {f"layer_{i}" for i in range(c.model.n_layers)}  # routing really ran
  np.testing.assert_allclose(t_m, t_d, atol=1e-5, rtol=0)
  np.testing.assert_allclose(f_m, f_d, atol=1e-5, rtol=0)
  t_1, _, _ = routed.hidden(batch, rng=rng, router_mix=jnp.float32(1.0))
  assert np.abs(np.asarray(t_1) - np.asarray(t_d)).max() > 1e-3


def _routed(scores, k, **kw):
  b, f, n = scores.shape
  t, d = 1, 2
  x = jnp.ones((b, t + f * n, d))
  pos = jnp.broadcast_to(jnp.arange(t + f * n, dtype=jnp.int32), (b, t + f * n))
  x_s, seq, layout = ordered_row(x, pos, jnp.ones_like(pos), t, n)
  return mod.routed_block(
    lambda xc, sc: 2.0 * xc,
    x_s,
    seq,
    layout,
    k=k,
    selection="learned",
    weighting="ste",
    router=frame_scores_router(scores, layout),
    **kw,
  )


def test_aux_loss_gives_gradient_to_skipped_tokens_scores():
  """Without the BCE, the N - k skipped tokens' scores get no gradient (ste); with it, each
  real token's score gets (sigmoid(s) - member) / count (BCE's derivative, hand-computed)."""
  scores = jnp.array([[[2.0, -1.0, 0.5, 0.0], [0.0, 3.0, -2.0, 1.0]]])
  member = np.array([[[1, 0, 0, 0], [0, 1, 0, 0]]], np.float32)

  def main_loss(s):
    y, _ = _routed(s, 1)
    return jnp.sum(y)

  g_main = np.asarray(jax.grad(main_loss)(scores))
  assert np.all(g_main[member == 0] == 0) and np.all(g_main[member == 1] != 0)

  def bce(s):
    _, aux = _routed(s, 1)
    return aux["router_bce_sum"] / aux["router_bce_count"]

  g_bce = np.asarray(jax.grad(bce)(scores))
  want = (_sigmoid(np.asarray(scores)) - member) / member.size
  np.testing.assert_allclose(g_bce, want, rtol=1e-5)
  assert np.all(g_bce[member == 0] > 0)  # skipped tokens are pushed towards "skip"


def test_exploration_only_while_mixing_and_aux_uses_the_clean_top_k():
  scores = jax.random.normal(jax.random.key(0), (4, 16, 10))
  clean = np.sort(np.argsort(-np.asarray(scores), axis=-1)[..., :2], axis=-1)
  rng = jax.random.key(5)
  _, a0 = _routed(scores, 2, rng=rng, mix=jnp.float32(0.0), explore=3.0)
  np.testing.assert_array_equal(a0["kept_index"], clean)  # mix = 0: plain top-k
  _, a1 = _routed(scores, 2, rng=rng, mix=jnp.float32(1.0), explore=3.0)
  explored = np.asarray(a1["kept_index"])
  differs = np.any(explored != clean, axis=-1).mean()
  assert 0.2 < differs < 1.0, differs  # some frames keep a token the router ranks low
  # The gumbel draw is the one Gumbel-top-k would make: recompute it independently.
  noisy = np.asarray(scores) + 3.0 * np.asarray(jax.random.gumbel(rng, scores.shape))
  np.testing.assert_array_equal(explored, np.sort(np.argsort(-noisy, -1)[..., :2], -1))
  # The auxiliary BCE's targets stay the noise-free top-k.
  np.testing.assert_allclose(a1["router_bce_sum"], a0["router_bce_sum"], rtol=1e-6)


def test_normed_router_scores_the_layer_input_norm():
  c = tiny.get_config()
  c.model.mod.router_input = "normed"
  model = VideoLLM(c.model, rngs=nnx.Rngs(0))
  dec = model.llm
  layer, router = dec.layer(1), dec.router(1)
  x = jax.random.normal(jax.random.key(2), (2, 7, c.model.d_model))
  fn = dec.router_fn(router, layer)
  np.testing.assert_allclose(fn(x), router(layer.input_norm(x)), rtol=1e-6)
  np.testing.assert_allclose(fn(4.0 * x), fn(x), rtol=1e-4, atol=1e-5)  # RMSNorm: scale-free
  c.model.mod.router_input = "hidden"
  hidden = VideoLLM(c.model, rngs=nnx.Rngs(0)).llm
  np.testing.assert_allclose(hidden.router_fn(router, layer)(x), router(x), rtol=1e-6)


@pytest.mark.parametrize(
  "settings, match",
  [
    ({"router_input": "cls"}, "router_input='cls'"),
    ({"router_anneal_steps": 10, "router_weighting": "sigmoid"}, "router_weighting='sigmoid'"),
    ({"router_explore": 1.0}, "router_explore=1.0 is annealed"),
    ({"router_anneal_steps": 10**6}, "would not finish"),
    ({"router_anneal_steps": -1}, "must be >= 0"),
  ],
)
def test_bad_router_training_settings_are_named(settings, match):
  c = tiny.get_config()
  c.model.mod.update(settings)
  with pytest.raises(ConfigError, match=match):
    validate(c)


def test_ablation_paired_table_reads_learned_rows_against_uniform_by_seed():
  """benchmarks/ablation.py's study reading, on hand-made records: ΔPPL % and Δ accuracy per
  seed, mean ± s.e., and "beats" only when both are better by two standard errors."""
  import importlib.util
  import pathlib

  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "ablation.py"
  spec = importlib.util.spec_from_file_location("ablation_bench", path)
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  rec = lambda row, seed, ppl, acc: dict(row=row, seed=seed, lm_ppl=ppl, stream_accuracy=acc)
  results = [
    rec("uniform", 0, 2.0, 0.80),
    rec("uniform", 1, 2.0, 0.80),
    rec("router_recipe", 0, 1.9, 0.82),  # -5 %, +0.02
    rec("router_recipe", 1, 1.8, 0.84),  # -10 %, +0.04
    rec("learned_r0.2_interleaved", 0, 1.9, 0.79),  # better PPL, worse accuracy
    rec("learned_r0.2_interleaved", 1, 1.8, 0.78),
  ]
  rows = ablation._rows(4, 300)
  _, paired = ablation.paired_table(results, rows)
  by = {(p["row"], p["vs"]): p for p in paired}
  assert set(by) == {("router_recipe", "uniform"), ("learned_r0.2_interleaved", "uniform")}
  p = by["router_recipe", "uniform"]
  np.testing.assert_allclose(p["dppl_pct"], [-5.0, -10.0], atol=1e-9)
  np.testing.assert_allclose([p["dppl_pct_mean"], p["dppl_pct_sem"]], [-7.5, 2.5], atol=1e-9)
  np.testing.assert_allclose([p["dacc_mean"], p["dacc_sem"]], [0.03, 0.01], atol=1e-9)
  assert p["beats"] is True  # -7.5 < -2·2.5 and 0.03 > 2·0.01
  assert by["learned_r0.2_interleaved", "uniform"]["beats"] is False
