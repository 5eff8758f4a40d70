"""FastV and DyCoke on a tiny trained-shape model: zero rates are the dense model exactly, the
pruned layers see the static compact length, streaming (explicit KV caches) equals the full pass,
and DyCoke's dynamic KV pruning hides, keeps and brings back cache entries."""

import copy
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.compress import apply, dycoke
from mod_jax.infer import evaluate, streaming
from mod_jax.model.llm import DecoderLayer
from mod_jax.model.video_llm import VideoLLM
from tests.test_infer_streaming import WINDOW, _layout, _stream, continuation_oracle, run_stream

ATOL = 1e-4


@functools.cache
def _dense(scan_layers=True):
  cfg = tiny.get_config("dense")
  cfg.model.scan_layers = scan_layers
  model = VideoLLM(cfg.model, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  return cfg, graphdef, params


@functools.partial(jax.jit, static_argnums=2)
def _full(params, batch, graphdef):
  return nnx.merge(graphdef, params)(batch)


def _batch(cfg, frames=6, seed=0):
  return _layout(_stream(cfg, seed=seed, frames=frames), cfg.model.tokens_per_frame)


@pytest.mark.parametrize("spec", ["fastv:K=2,R=0", "dycoke:K=0,P=0,L=2"])
def test_zero_rates_give_exactly_the_dense_logits(spec):
  """Bit for bit against the dense model run layer by layer (compressed models run unscanned;
  the scanned stack is a different XLA program and differs by ~1e-6)."""
  cfg, graphdef, params = _dense(scan_layers=False)
  batch = _batch(cfg)
  dense = jax.device_get(_full(params, batch, graphdef)[:2])
  gd = apply.attach(graphdef, params, apply.parse(spec), cfg.model)
  text, frame, aux = jax.device_get(_full(params, batch, gd))
  np.testing.assert_array_equal(text, dense[0])
  np.testing.assert_array_equal(frame, dense[1])
  assert not aux  # nothing pruned, no routed layer


def test_fastv_prunes_after_layer_k_and_changes_the_output(monkeypatch):
  cfg, graphdef, params = _dense()
  batch = _batch(cfg)
  seen = []
  model = nnx.merge(
    apply.attach(graphdef, params, apply.parse("fastv:K=2,R=0.5"), cfg.model), params
  )
  call = DecoderLayer.__call__

  def spy(self, x, *a, **kw):  # the sequence length each layer sees, layers called in order
    seen.append(x.shape[1])
    return call(self, x, *a, **kw)

  monkeypatch.setattr(DecoderLayer, "__call__", spy)
  text, frame, _ = jax.jit(lambda b: model(b))(batch)  # shapes are recorded while tracing
  monkeypatch.setattr(DecoderLayer, "__call__", call)
  t, f, n = batch["text_tokens"].shape[1], batch["frames"].shape[1], cfg.model.tokens_per_frame
  assert list(enumerate(seen)) == [(0, t + f * n), (1, t + f * n), (2, t + f * 5), (3, t + f * 5)]
  dense = _full(params, batch, graphdef)
  assert np.abs(np.asarray(frame) - np.asarray(dense[1])).max() > 1e-3


def test_ttm_keeps_the_pooled_token_and_prunes_the_grid():
  """In the model TTM ranks only the p·p grid tokens of a frame: the MAP-pooled token 0 has no
  spatial position (DyCoke compares "the same spatial position") and is kept in every frame,
  also when it is the token most similar to its reference frame; pruned frames keep 3 of 10."""
  cfg, graphdef, params = _dense()
  model = nnx.merge(graphdef, params)
  batch = _batch(cfg, frames=8)
  x, _, layout = model.embed_row(batch)
  slots = np.asarray(layout.frame_tokens())  # [b, f, n] stream slot of each vision token
  x = x.at[0, slots[0, :, 0]].set(1.0)  # token 0 identical in every frame: cosine 1
  keep = np.asarray(apply.ttm_keep(x, layout, 0.7))[0][slots[0]]  # [f, n]
  assert keep[:, 0].all() and keep[:, -1].all()  # pooled token and decision slot
  np.testing.assert_array_equal(keep.sum(1), [10, 3, 3, 3, 10, 3, 3, 3])


def test_parse_and_check_errors():
  assert str(apply.parse("fastv:K=3,R=0.25")) == "fastv:K=3,R=0.25"
  assert apply.parse("dycoke") == apply.Compression("dycoke", 0.7, p=0.7, l=3)
  assert apply.parse("none") is None
  for bad, match in [
    ("fastvv:K=2", "unknown method"),
    ("fastv:K=1.5", "integer"),
    ("fastv:R=2", "R="),
    ("dycoke:K=0.5,Q=1", "bad setting"),
    ("dycoke:P=x", "not a number"),
  ]:
    with pytest.raises(ValueError, match=match):
      apply.parse(bad)
  mod_cfg = tiny.get_config("").model  # interleaved MoD: layers 1, 3 routed
  with pytest.raises(ValueError, match="already route"):
    apply.check(apply.parse("fastv:K=2,R=0.5"), mod_cfg)
  with pytest.raises(ValueError, match="dense layers"):
    apply.check(apply.parse("dycoke:K=0.7,P=0.7,L=2"), mod_cfg)
  apply.check(apply.parse("dycoke:K=0.7,P=0,L=2"), mod_cfg)  # TTM alone runs on MoD models
  mod_cfg.mod.routing = "sequence"
  with pytest.raises(ValueError, match="sequence-routed"):
    apply.check(apply.parse("dycoke:K=0.7,P=0,L=2"), mod_cfg)


def test_arank_maps_are_the_layers_attention_and_recommendation():
  """``mod-jax arank``'s maps reproduce the layer's own attention output (probs · V through the
  output projection = the attention kernel's result); the recommendation takes the n/2 lowest."""
  from mod_jax.compress import arank_main
  from mod_jax.model import rows
  from mod_jax.model.attention import rope_tables

  cfg, graphdef, params = _dense()
  model = nnx.merge(graphdef, params)
  layer = model.llm.layer(1)
  l, d = 12, cfg.model.d_model
  x = jax.random.normal(jax.random.key(0), (1, l, d))
  pos = np.arange(l, dtype=np.int32)[None]
  seg = np.array([[1] * 8 + [2] * 4], np.int32)  # two packed samples
  seq = rows.TokenInfo(pos, seg, rope_tables(pos, layer.attn.inv_freq))
  probs = arank_main.attention_maps(layer, x, seq)  # [1, heads, l, l]
  _, _, v = layer.attn.qkv(layer.input_norm(x), seq.positions, None, seq.rope)
  heads, kh = probs.shape[1], v.shape[2]
  v_rep = np.repeat(np.asarray(v), heads // kh, axis=2)  # [1, l, heads, hd]
  o = np.einsum("bnqs,bsnh->bqnh", np.asarray(probs), v_rep)
  want = layer.attn(
    layer.input_norm(x), seq.positions, seq.segment_ids, rope=seq.rope, ordered=True
  )
  np.testing.assert_allclose(np.asarray(layer.attn.out(o)), np.asarray(want), atol=1e-5)
  assert np.asarray(probs)[0, :, 8, :8].max() == 0  # no attention across samples
  assert arank_main.recommend([5.0, 1.0, 3.0, 1.0]) == {"lowest": [1, 3], "reference": []}
  assert arank_main.recommend([9.0] * 8)["reference"] == [3, 4, 5, 6]


@pytest.mark.slow
def test_run_arank_on_a_trained_workdir(tmp_path):
  """``mod-jax arank`` end to end on a ``mod-jax train`` workdir: per-sample ARank of every layer
  within [1, tokens − 1] (row 0 of a causal map with its diagonal zeroed is empty), the means and
  the recommendation follow from them, and the report is written beside the checkpoint."""
  import json

  from mod_jax.compress import arank_main
  from mod_jax.train.loop import train_and_evaluate

  c = tiny.get_config("dense")
  c.mesh.shape = (2, 2, 2)  # 4 batch shards for the batch of 4 (tests have 8 CPU devices)
  c.data.dir = str(tmp_path / "data")
  c.train.steps = c.train.checkpoint_every = 1
  c.train.warmup_steps = 0
  c.train.eval_batches = 0
  wd = str(tmp_path / "run")
  train_and_evaluate(c, wd, progress=False)
  report = arank_main.run_arank(c, wd, samples=2, progress=False)
  values = np.asarray(report["per_sample"])
  assert values.shape == (2, c.model.n_layers) and report["samples"] == 2
  for row, tokens in zip(values, report["tokens"]):
    assert ((row >= 1) & (row <= tokens - 1)).all()
  np.testing.assert_allclose(report["arank"], values.mean(0))
  assert report["recommended"] == arank_main.recommend(list(values.mean(0)))
  with open(tmp_path / "run" / "arank.json") as fh:
    assert json.load(fh)["arank"] == report["arank"]


def _restack(session, per_layer):
  """Per-layer caches in the session's stacked layout (layer i is row r of stack s)."""
  stacks: dict = {}
  for i, (s, r) in enumerate(session.slots):
    stacks.setdefault(s, {})[r] = per_layer[i]
  return tuple(
    jax.tree.map(lambda *a: np.stack(a), *(rows[r] for r in sorted(rows)))
    for _, rows in sorted(stacks.items())
  )


def _session(cfg, gd, params, **kw):
  return streaming.Session(gd, params, cfg.model, **{**WINDOW, **kw})


@pytest.mark.parametrize("spec", ["dycoke:K=0.7,P=0,L=2", "fastv:K=2,R=0.5"])
def test_streaming_equals_teacher_forced(spec):
  """Frame by frame through the streaming engine (TTM windows carried in the stream state,
  FastV scores from the layer's KV cache) gives the full pass's logits."""
  cfg, graphdef, params = _dense()
  comp = apply.parse(spec)
  gd = apply.attach(graphdef, params, comp, cfg.model)
  events = _stream(cfg, frames=6)
  batch = _layout(events, cfg.model.tokens_per_frame)
  text_full, frame_full, _ = jax.device_get(_full(params, batch, gd))
  session = _session(cfg, gd, params)
  frame_inc, text_inc = run_stream(session, events)
  np.testing.assert_allclose(frame_inc, frame_full[0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(text_inc, text_full[0], atol=ATOL, rtol=0)
  np.testing.assert_array_equal(  # the same stream decisions
    frame_inc.argmax(-1), frame_full[0].argmax(-1)
  )
  live = [int((np.asarray(c.segment_ids) != 0).sum()) for c in session.layer_caches()]
  t, n = batch["text_tokens"].shape[1], cfg.model.tokens_per_frame
  if comp.method == "dycoke":  # TTM really pruned: 6 frames keep 10 + 3 + 3 + 3 + 10 + 3
    assert live == [t + dycoke.causal_keep_counts(0.7, n, 6, **apply.TTM_KEEP)] * 4 == [t + 32] * 4
  else:  # FastV: layers >= K cache 5 of each frame's 10 tokens
    assert live == [t + 6 * n] * 2 + [t + 6 * 5] * 2


@pytest.mark.parametrize(
  "spec", [pytest.param("fastv:K=2,R=0", marks=pytest.mark.slow), "dycoke:K=0,P=0,L=2"]
)
def test_zero_rates_stream_exactly_as_dense(spec):
  """R = 0 / K = 0, P = 0: the compressed streaming engine gives the dense engine's logits bit for
  bit (both run the same cached layers; nothing is pruned or hidden)."""
  cfg, graphdef, params = _dense(scan_layers=False)
  events = _stream(cfg, frames=6)
  dense = run_stream(_session(cfg, graphdef, params), events)
  gd = apply.attach(graphdef, params, apply.parse(spec), cfg.model)
  got = run_stream(_session(cfg, gd, params), events)
  for a, b in zip(got, dense):
    np.testing.assert_array_equal(a, b)


def test_dycoke_tiny_p_streams_as_ttm():
  """P -> 0 with KV pruning switched on (the selection runs and keeps every image entry) gives
  the TTM-only logits (up to the float32 rounding of a differently compiled step: the mask gains
  an all-True visibility term)."""
  cfg, graphdef, params = _dense()
  events = _stream(cfg, frames=6)
  ttm = apply.parse("dycoke:K=0.7,P=0,L=2")
  base = run_stream(_session(cfg, apply.attach(graphdef, params, ttm, cfg.model), params), events)
  on = apply.Compression("dycoke", 0.7, p=1e-12, l=2)  # floor(n·(1 − 1e-12)) = n: all selected
  session = _session(cfg, apply.attach(graphdef, params, on, cfg.model), params)
  got = run_stream(session, events)
  for a, b in zip(got, base):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  st = session.state
  assert int(np.asarray(st.selected).sum()) == int(np.asarray(st.is_vision).sum()) > 0


@pytest.mark.slow  # ~28 s on the shared 2-core CPU (three compiled steps)
def test_dycoke_kv_pruning_step_is_a_masked_view_of_the_kept_cache():
  """P = 0.7: a frame step attends, in layers >= L, to the selected floor(0.3·n_img) earlier image
  entries plus its own entries — exactly a plain TTM step on a copy of the cache whose other
  earlier image entries are emptied in those layers only — and the cache keeps every entry
  (slot for slot the TTM-only run's)."""
  cfg, graphdef, params = _dense()
  events = _stream(cfg, frames=6)
  comp = apply.parse("dycoke:K=0.7,P=0.7,L=2")
  session = _session(cfg, apply.attach(graphdef, params, comp, cfg.model), params)
  ttm = apply.attach(graphdef, params, apply.parse("dycoke:K=0.7,P=0,L=2"), cfg.model)
  frames = [e for e in events if e[0] == "frame"]
  session.feed(events[0][1])
  session.pin()
  for e in frames[:2]:
    session.feed(e[1], e[2][None])
  caches, state = jax.device_get((session.layer_caches(), session.state))
  saved = (copy.deepcopy(session.ledger), session.position, session.pinned_end)
  out = session.feed(frames[2][1], frames[2][2][None])
  after = jax.device_get(session.state)
  assert int(state.is_vision.sum()) == 10 + 3  # frame 0 whole, frame 1 TTM-pruned to 3
  assert int(after.is_vision.sum()) == 10 + 3 + 3
  assert int(after.selected.sum()) == int(np.floor(16 * 0.3 + 1e-6)) == 4
  earlier = np.asarray(caches[1].segment_ids) != 0
  hidden = after.is_vision & ~after.selected & earlier
  assert hidden.sum() > 0

  def plain_step(hide):
    other = _session(cfg, ttm, params)
    per_layer = [
      c._replace(segment_ids=np.where(hide, 0, c.segment_ids)) if i >= comp.l else c
      for i, c in enumerate(caches)
    ]
    other.caches = jax.device_put(_restack(other, per_layer))
    other.state = other.state._replace(
      window=jax.device_put(state.window), frames_seen=jax.device_put(state.frames_seen)
    )
    other.ledger, other.position, other.pinned_end = copy.deepcopy(saved)
    return other.feed(frames[2][1], frames[2][2][None])

  want = plain_step(hidden)
  np.testing.assert_allclose(out["frame_logits"], want["frame_logits"], atol=ATOL, rtol=0)
  unpruned = plain_step(np.zeros_like(hidden))
  assert np.abs(unpruned["frame_logits"] - out["frame_logits"]).max() > 1e-5  # hiding mattered
  # The full cache is kept: the same live slots as the TTM-only run's after all the events.
  run_stream(session, events[events.index(frames[2]) + 1 :])
  ttm_session = _session(cfg, ttm, params)
  run_stream(ttm_session, events)
  for a, b in zip(session.caches, ttm_session.caches):
    np.testing.assert_array_equal(np.asarray(a.segment_ids), np.asarray(b.segment_ids))
    np.testing.assert_array_equal(np.asarray(a.positions), np.asarray(b.positions))
  assert int(np.asarray(session.state.reselections)[0]) >= 1


def test_pruned_entries_come_back_after_reselection():
  """Hand-built attention over 6 image slots, P = 2/3 (keep 2): a shift of attention (cosine <
  0.9) re-selects, hiding the old pair; a shift back brings it back; a small change (cosine >=
  0.9) keeps the selection."""
  state = apply.StreamState(
    window=np.zeros((1, 1, 1, 1), np.float32),
    frames_seen=np.zeros((1,), np.int32),
    is_vision=np.zeros((1, 6), bool),
    selected=np.zeros((1, 6), bool),
    ref=np.zeros((1, 6), np.float32),
    has_ref=np.zeros((1,), bool),
    reselections=np.zeros((1,), np.int32),
  )
  img, none = np.ones((1, 6), bool), np.zeros((1, 6), bool)
  steps = [
    ([0.40, 0.30, 0.10, 0.10, 0.05, 0.05], [1, 1, 0, 0, 0, 0], 1),  # first step: select
    ([0.35, 0.30, 0.15, 0.10, 0.05, 0.05], [1, 1, 0, 0, 0, 0], 1),  # cos 0.99: keep
    ([0.05, 0.05, 0.10, 0.10, 0.40, 0.30], [0, 0, 0, 0, 1, 1], 2),  # cos 0.28: re-select
    ([0.40, 0.30, 0.10, 0.10, 0.05, 0.05], [1, 1, 0, 0, 0, 0], 3),  # back again
  ]
  for probs, want, count in steps:
    visible, state = apply.reselect(state, np.array([probs], np.float32), img, none, 2 / 3)
    np.testing.assert_array_equal(np.asarray(visible)[0], np.array(want, bool))
    assert int(state.reselections[0]) == count
  # A step's own image entries are visible, and join the selection until the next re-selection.
  img, cur = np.array([[1, 1, 1, 1, 1, 1, 1]], bool), np.array([[0, 0, 0, 0, 0, 0, 1]], bool)
  state = state._replace(
    **{
      k: np.pad(np.asarray(getattr(state, k)), ((0, 0), (0, 1)))
      for k in ("is_vision", "selected", "ref")
    }
  )
  probs = np.array([steps[-1][0] + [0.0]], np.float32)
  visible, state = apply.reselect(state, probs, img, cur, 2 / 3)
  np.testing.assert_array_equal(np.asarray(visible)[0], [1, 1, 0, 0, 0, 0, 1])
  visible, state = apply.reselect(state, probs, img, np.zeros_like(cur), 2 / 3)
  np.testing.assert_array_equal(np.asarray(visible)[0], [1, 1, 0, 0, 0, 0, 1])
  assert int(state.reselections[0]) == 3


@pytest.mark.parametrize("spec", ["dycoke:K=0.7,P=0,L=2", "fastv:K=2,R=0.5"])
def test_eval_late_continuation_equals_full_pass(spec):
  """``mod-jax eval --compress``'s late continuation: the sample up to frame 2 as one padded
  chunk (its later frames are padding: TTM counts only the real ones), then frames 3..5 one by
  one, gives the frame-end distributions of the compressed full pass over the continued stream."""
  cfg, graphdef, params = _dense()
  n = cfg.model.tokens_per_frame
  gd = apply.attach(graphdef, params, apply.parse(spec), cfg.model)
  batch = _layout(_stream(cfg, seed=1, frames=6), n)
  cut, m = 3, 3
  probs = evaluate.continue_after(_session(cfg, gd, params), batch, cut - 1, m, interval_id=7)
  oracle = continuation_oracle(batch, cut, m, n, interval_id=7)
  _, frame_oracle, _ = jax.device_get(_full(params, oracle, gd))
  np.testing.assert_allclose(probs, jax.nn.softmax(frame_oracle[0, cut:]), atol=1e-5, rtol=0)
