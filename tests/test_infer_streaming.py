"""Streaming engine against independent oracles: the full forward pass (fp32, <= 1e-4), the
training stream renderer (mod_jax.data.stream), and hand-computed sampling distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.data import stream as stream_lib
from mod_jax.data.tokenizer import build_word_tokenizer
from mod_jax.infer import evaluate, streaming
from mod_jax.model.attention import KVCache
from mod_jax.model.mod import RoutingPlan
from mod_jax.model.video_llm import VideoLLM

ATOL = 1e-4


@functools.cache
def _model(variant, n_layers=None):
  cfg = tiny.get_config(variant)
  if n_layers is not None:
    cfg.model.n_layers = n_layers
    cfg.model.mod.insertion = "all"
  model = VideoLLM(cfg.model, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(model, nnx.Param)
  return cfg, graphdef, params


WINDOW = dict(max_frames=16, max_text=48)  # one cache shape, so the tests share compiled steps


def _stream(cfg, seed=0, frames=5):
  """A LIVE-like stream: prompt, frames with interval tokens, a response, more frames."""
  rng = np.random.default_rng(seed)
  v, s = cfg.model.vocab_size, cfg.model.vision.image_size
  word = lambda: int(rng.integers(1, v))
  image = lambda: rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
  events = [("prompt", [word() for _ in range(5)])]
  for i in range(frames):
    events.append(("frame", [word()], image()))
    if i == 2:
      events.append(("response", [word() for _ in range(4)]))
  return events


def _layout(events, n):
  """The slot layout of the whole stream (text slots | frame slots) with stream positions."""
  tt, tp, fr, fp, pos = [], [], [], [], 0
  for e in events:
    for tok in e[1]:
      tt.append(tok)
      tp.append(pos)
      pos += 1
    if e[0] == "frame":
      fr.append(e[2])
      fp.append(pos)
      pos += n
  return {
    "text_tokens": np.array([tt], np.int32),
    "text_positions": np.array([tp], np.int32),
    "text_segment_ids": np.ones((1, len(tt)), np.int32),
    "frames": np.stack(fr)[None],
    "frame_positions": np.array([fp], np.int32),
    "frame_segment_ids": np.ones((1, len(fr)), np.int32),
  }


_full = jax.jit(
  lambda params, batch, graphdef: nnx.merge(graphdef, params)(batch)[:2], static_argnums=2
)


@pytest.mark.parametrize("variant", ["", "dense"])
def test_incremental_logits_equal_full_pass(variant):
  """Frame by frame, then token by token, the engine's logits are the full forward pass's: the
  proof that per-frame routing is causal. A MoD layer caches exactly T + F·k entries."""
  cfg, graphdef, params = _model(variant)
  n = cfg.model.tokens_per_frame
  events = _stream(cfg)
  batch = _layout(events, n)
  text_full, frame_full = jax.device_get(_full(params, batch, graphdef))
  t, f = batch["text_tokens"].shape[1], batch["frames"].shape[1]
  plan = RoutingPlan.from_config(cfg.model)
  session = streaming.Session(graphdef, params, cfg.model, **WINDOW)
  frame_inc, text_inc = run_stream(session, events)
  np.testing.assert_allclose(text_inc, text_full[0], atol=ATOL, rtol=0)
  np.testing.assert_allclose(frame_inc, frame_full[0], atol=ATOL, rtol=0)

  live = [int((np.asarray(c.segment_ids) != 0).sum()) for c in session.layer_caches()]
  k = plan.keep
  assert live == [t + f * (n if k[i] is None else k[i]) for i in range(cfg.model.n_layers)]
  if variant == "":
    assert sorted(set(live)) == [t + f * 2, t + f * n]  # k = ceil(0.2·10) = 2


def test_prefix_chunk_then_frames_equals_full_pass():
  """``mod-jax eval``'s late continuation: the sample up to frame j fed as one padded slot-layout
  chunk, then frames j+1.. one by one after interval tokens, gives the frame-end distributions of
  the full pass over that continued stream (MoD model)."""
  cfg, graphdef, params = _model("")
  n = cfg.model.tokens_per_frame
  events = _stream(cfg, seed=1, frames=6)
  batch = _layout(events, n)
  cut, m = 3, 3  # keep frames 0..2 (and the text before), feed frames 3..5
  probs = evaluate.continue_after(
    streaming.Session(graphdef, params, cfg.model, **WINDOW),
    batch,
    cut - 1,
    m,
    interval_id=7,
  )
  oracle = continuation_oracle(batch, cut, m, n, interval_id=7)
  _, frame_oracle = jax.device_get(_full(params, oracle, graphdef))
  np.testing.assert_allclose(probs, jax.nn.softmax(frame_oracle[0, cut:]), atol=1e-5, rtol=0)


def run_stream(session, events):
  """Feeds ``events`` as the LIVE engine does (prompt pinned, [opening + frame] chunks, response
  tokens one by one); returns (frame-end logits [F, V], text logits [T, V]) in stream order."""
  text, frame = [], []
  for e in events:
    if e[0] == "prompt":
      out = session.feed(e[1])
      session.pin()
    elif e[0] == "frame":
      out = session.feed(e[1], e[2][None])
      frame.append(out["frame_logits"][0, 0])
    else:
      for tok in e[1]:
        text.append(session.feed([tok])["text_logits"][0, 0])
      continue
    text.extend(out["text_logits"][0])
  return np.stack(frame), np.stack(text)


def continuation_oracle(batch, cut: int, m: int, n: int, *, interval_id: int) -> dict:
  """The batch whose full pass ``evaluate.continue_after(..., cut - 1, m, interval_id=...)`` must
  reproduce: row 0's stream up to frame ``cut - 1``'s last vision slot, then (interval token,
  frame) × m with frames ``cut..cut + m - 1`` of ``batch``."""
  p_end = int(batch["frame_positions"][0, cut - 1]) + n - 1
  keep = batch["text_positions"][0] <= p_end
  tt, tp = list(batch["text_tokens"][0][keep]), list(batch["text_positions"][0][keep])
  fp, pos = list(batch["frame_positions"][0][:cut]), p_end + 1
  for _ in range(m):
    tt.append(interval_id)
    tp.append(pos)
    fp.append(pos + 1)
    pos += 1 + n
  oracle = {
    "text_tokens": np.array([tt], np.int32),
    "text_positions": np.array([tp], np.int32),
    "text_segment_ids": np.ones((1, len(tt)), np.int32),
    "frames": batch["frames"],
    "frame_positions": np.array([fp], np.int32),
    "frame_segment_ids": np.ones((1, cut + m), np.int32),
  }
  return oracle


@pytest.mark.parametrize("rebase", [True, False])
def test_slide_keeps_prompt_and_equals_full_pass_over_kept_stream(rebase):
  """With on_full='slide' the window drops the oldest frames; the logits then equal the full pass
  over [system prompt + the frames still held]: right after the prompt when positions are
  re-based (a training row's layout), at their original positions otherwise. One (MoD) layer, so
  cached keys/values do not carry context from evicted frames, and the full pass is the oracle."""
  cfg, graphdef, params = _model("", n_layers=1)
  n = cfg.model.tokens_per_frame
  prompt_len, hold = 5, 3
  session = streaming.Session(
    graphdef,
    params,
    cfg.model,
    on_full="slide",
    rebase=rebase,
    max_frames=hold,
    max_text=prompt_len + hold,
  )
  events = _stream(cfg, seed=2, frames=7)
  frames = [e for e in events if e[0] == "frame"]
  session.feed(events[0][1])
  session.pin()
  for e in frames:
    out = session.feed(e[1], e[2][None])
  assert session.ledger.evicted_events == len(frames) - hold
  kept = frames[-hold:]
  first = len(frames) - hold if not rebase else 0  # the first kept frame's place after the prompt
  tt, tp, fp = list(events[0][1]), list(range(prompt_len)), []
  for j, e in enumerate(kept):
    p = prompt_len + (first + j) * (1 + n)
    tt.append(e[1][0])
    tp.append(p)
    fp.append(p + 1)
  oracle = {
    "text_tokens": np.array([tt], np.int32),
    "text_positions": np.array([tp], np.int32),
    "text_segment_ids": np.ones((1, len(tt)), np.int32),
    "frames": np.stack([e[2] for e in kept])[None],
    "frame_positions": np.array([fp]),
    "frame_segment_ids": np.ones((1, hold), np.int32),
  }
  _, frame_oracle = jax.device_get(_full(params, oracle, graphdef))
  np.testing.assert_allclose(out["frame_logits"][0, 0], frame_oracle[0, -1], atol=ATOL, rtol=0)
  cache = session.layer_caches()[0]
  pos0, seg0 = np.asarray(cache.positions), np.asarray(cache.segment_ids)
  np.testing.assert_array_equal(pos0[0, :prompt_len], np.arange(prompt_len))  # prompt pinned
  assert (seg0[0, :prompt_len] == 1).all()
  # Re-based, no RoPE position exceeds the window's span (the trained range).
  assert session.max_position == (fp[-1] + n - 1)
  if rebase:
    assert session.max_position <= session.trained_max_position < session.position - 1


def test_rebased_window_equals_unrebased_cache_while_it_fits():
  """A stream that fits the window gives the same logits with and without re-basing (nothing is
  evicted, so the offset is 0 and keys rotated at read time are the keys rotated at write time;
  ``test_incremental_logits_equal_full_pass`` checks both against the full pass)."""
  cfg, graphdef, params = _model("")
  events = _stream(cfg, seed=3, frames=5)
  outs = {}
  for rebase in (True, False):
    session = streaming.Session(
      graphdef, params, cfg.model, rebase=rebase, on_full="slide", **WINDOW
    )
    logits = []
    for e in events:
      out = session.feed(e[1], e[2][None] if e[0] == "frame" else None)
      logits.append(out["frame_logits"][0, 0] if e[0] == "frame" else out["text_logits"][0, -1])
    outs[rebase] = np.stack(logits)
    assert session.rope_offset == 0 and session.ledger.evicted_events == 0
  np.testing.assert_array_equal(outs[True], outs[False])


def test_padded_text_buckets_equal_unpadded_chunks():
  """Text padded to bucket lengths (padding takes no cache slot) gives the logits of the same
  chunks unpadded, with the same live cache entries; text longer than the largest bucket is split."""
  cfg, graphdef, params = _model("")
  rng = np.random.default_rng(4)
  s, v = cfg.model.vision.image_size, cfg.model.vocab_size
  chunks = [
    (list(rng.integers(1, v, 5)), None),
    ([3], rng.integers(0, 256, (1, s, s, 3), np.uint8)),
  ]
  chunks += [
    (list(rng.integers(1, v, 7)), None),
    ([3], rng.integers(0, 256, (1, s, s, 3), np.uint8)),
  ]
  chunks += [(list(rng.integers(1, v, 11)), None), ([2], None)]
  outs, live = {}, {}
  for name, buckets in (("padded", (1, 4, 8)), ("exact", tuple(range(1, 12)))):
    session = streaming.Session(
      graphdef, params, cfg.model, text_buckets=buckets, max_frames=4, max_text=40
    )
    outs[name] = [session.feed(ids, fr) for ids, fr in chunks]
    live[name] = [np.asarray(c.segment_ids) for c in session.caches]
    assert session.position == 5 + 11 + 7 + 11 + 11 + 1
  for a, b in zip(outs["padded"], outs["exact"]):
    assert a["text_logits"].shape == b["text_logits"].shape
    np.testing.assert_allclose(a["text_logits"], b["text_logits"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(a["frame_logits"], b["frame_logits"], atol=ATOL, rtol=0)
    assert a["next_token"] == b["next_token"]
  for a, b in zip(live["padded"], live["exact"]):
    np.testing.assert_array_equal(a != 0, b != 0)  # same slots used: padding took none


def test_encode_ahead_feeds_the_same_stream_as_pixels():
  """Pipelined (the vision tower on frame t+1 in a worker thread, features fed to the decoder)
  gives the logits of feeding the pixels, frame by frame."""
  cfg, graphdef, params = _model("")
  rng = np.random.default_rng(5)
  s = cfg.model.vision.image_size
  frames = [(i / 2, rng.integers(0, 256, (s, s, 3), np.uint8)) for i in range(4)]
  outs = {}
  for pipelined in (False, True):
    session = streaming.Session(graphdef, params, cfg.model, **WINDOW)
    session.feed([1, 2, 3])
    session.pin()
    items = (
      streaming.encode_ahead(session, iter(frames))
      if pipelined
      else ((t, f, None) for t, f in frames)
    )
    got = []
    for _, frame, features in items:
      if features is None:
        got.append(session.feed([3], frame[None])["frame_logits"])
      else:
        got.append(session.feed([3], features=features)["frame_logits"])
    outs[pipelined] = np.concatenate(got, axis=1)
  assert outs[True].shape == (1, 4, cfg.model.vocab_size)
  np.testing.assert_allclose(outs[True], outs[False], atol=ATOL, rtol=0)


def test_engine_compiles_nothing_after_warmup(tmp_path):
  """After warm-up, a stream with 5 queries of different lengths (one longer than the largest
  bucket) and responses compiles nothing; a new chunk shape would (the counter is live)."""
  cfg, graphdef, params = _model("")
  params = jax.device_put(params, jax.devices()[0])  # committed, as restored checkpoints are
  words = ["narrate", "what", "happens", "a", "red", "circle", "where", "is", "it", "?"]
  tok = build_word_tokenizer(words, tmp_path / "tokenizer.json")
  engine = streaming.StreamEngine.create(
    graphdef,
    params,
    cfg,
    tok,
    max_frames=6,
    max_text=40,
    threshold=1.0,
    max_new_tokens=2,
    text_buckets=(1, 4, 16),
    system_prompt="narrate what happens",
  )
  engine.warmup()
  counter = streaming.CompileCounter()
  for i, length in enumerate((1, 3, 6, 12, 20)):
    engine.add_query(i * 0.5, " ".join(words[j % len(words)] for j in range(length)))
  s = cfg.model.vision.image_size
  turns = []
  for i in range(12):
    turns += engine.push_frame(np.full((s, s, 3), 20 * i, np.uint8))
  assert sum(t.role == "user" for t in turns) == 5 and engine.responses == 12
  assert engine.evicted_chunks > 0
  assert counter.count == 0
  assert engine.session.max_position <= engine.session.trained_max_position
  engine.session.feed([3, 3], np.zeros((2, s, s, 3), np.uint8))  # a shape never warmed up
  assert counter.count > 0


def test_stop_policy_raises_clear_error_and_writes_nothing():
  cfg, graphdef, params = _model("", n_layers=1)
  session = streaming.Session(graphdef, params, cfg.model, on_full="stop", max_frames=2, max_text=4)
  s = cfg.model.vision.image_size
  session.feed([1, 2])
  session.pin()
  frame = np.zeros((1, s, s, 3), np.uint8)
  session.feed([3], frame)
  session.feed([3], frame)
  used = list(session.ledger.used)
  with pytest.raises(
    streaming.CacheFull,
    match=r"KV cache full: the frame 2 needs 1 more text entries; the window holds 4 of 4 .*"
    r"on_full='stop'.*on_full='slide'",
  ):
    session.feed([3], frame, what="frame 2")
  assert session.ledger.used == used and session.position == 2 + 2 * 11
  assert used == [4, 2]  # prompt + 2 interval tokens, 2 frames
  # prompt + 2 x (interval + k = 2 kept vision tokens) live entries in the (MoD) layer's cache
  assert int((np.asarray(session.layer_caches()[0].segment_ids) != 0).sum()) == 2 + 2 * (1 + 2)


def test_ledger_refuses_an_event_larger_than_the_cache():
  ledger = streaming.CacheLedger([10, 4], on_full="slide")
  ledger.reserve([2, 2], 0)
  ledger.pin()
  ledger.reserve([3, 1], 2)
  assert ledger.reserve([6, 2], 5) == 5 and ledger.evicted_events == 1  # oldest chunk dropped
  with pytest.raises(streaming.CacheFull, match="layer 1"):
    ledger.reserve([1, 3], 11)


def test_frames_for_budget_counts_interval_and_kept_tokens():
  cfg = tiny.get_config()
  plan = RoutingPlan.from_config(cfg.model)  # layers 1, 3 keep k = 2 of N = 10
  entry = streaming.bytes_per_entry(cfg.model)
  assert entry == 2 * 2 * 16 * 4 + 8
  budget = entry * (11 + 3 + 11 + 3) * 100  # exactly 100 frames of MoD cache
  assert streaming.frames_for_budget(cfg.model, plan, budget) == 100
  dense = RoutingPlan.from_config(tiny.get_config("dense").model)
  assert streaming.frames_for_budget(cfg.model, dense, budget) == 28 * 100 // 44


# ------------------------------------------------------------------------------ protocol
class _ScriptedSession:
  """Records every fed token (frames as N <v>); speaks at scripted frames, emits scripted words."""

  def __init__(self, tok, n, speak_at, response):
    self.tok, self.n, self.speak_at, self.response = tok, n, set(speak_at), list(response)
    self.fed, self.frame = [], 0
    self.ledger = streaming.CacheLedger([10**6], "stop")

  def reset(self):
    self.fed, self.frame, self._queue = [], 0, []

  def pin(self):
    pass

  def feed(self, text_ids, frames=None, what=""):
    self.fed += list(text_ids)
    v = 16
    probs = np.zeros((1, 1, v))
    if frames is not None:
      self.fed += [self.tok.vision_id] * self.n
      speak = self.frame in self.speak_at
      probs[0, 0, self.tok.interval_id] = 0.5 if speak else 0.9
      probs[0, 0, self.tok.stream_close_ids[0]] = 1 - probs[0, 0, self.tok.interval_id]
      self.frame += 1
      self._queue = list(self.response) + [self.tok.eos_id] if speak else []
    nxt = self._queue.pop(0) if (frames is None and self._queue) else 0
    return {"frame_probs": probs, "next_token": np.array([nxt])}


def test_engine_feeds_exactly_the_training_stream_format(tmp_path):
  words = ["a", "red", "circle", "appears", "where", "is", "the", "square", "?", "narrate", "."]
  tok = build_word_tokenizer(words, tmp_path / "tokenizer.json")
  n, fps, num_frames = 3, 2.0, 7
  response = tok.encode("a red circle appears")
  speak_at = [1, 4, 6]
  queries = [
    (0.0, "where is the square ?"),
    (1.4, "where is the circle ?"),
    (2.5, "is the square red ?"),
  ]  # before frames 0, 3 and 5 (after a response)
  session = _ScriptedSession(tok, n, speak_at, response)
  engine = streaming.StreamEngine(session, tok, fps=fps, system_prompt="narrate .", threshold=0.725)
  for t, q in queries:
    engine.add_query(t, q)
  turns = []
  for _i in range(num_frames):
    turns += engine.push_frame(np.zeros((4, 4, 3), np.uint8))
  assert [(t.role, t.frame) for t in turns] == [
    ("user", -1),
    ("assistant", 1),
    ("user", 2),
    ("assistant", 4),
    ("user", 4),
    ("assistant", 6),
  ]
  assert turns[1].text == "a red circle appears" and turns[1].p_interval == 0.5

  windows, _ = stream_lib.render_stream(
    tok,
    num_frames=num_frames,
    narrations=[(i / fps, "a red circle appears") for i in speak_at],
    queries=queries,
    fps=fps,
    system_prompt="narrate .",
    tokens_per_frame=n,
    max_frames=100,
    max_text=1000,
  )
  (w,) = windows
  rendered = np.zeros(
    int(max(w.text_positions.max(), w.frame_positions.max() + n - 1)) + 1, np.int64
  )
  rendered[w.text_positions] = w.text_tokens
  for p in w.frame_positions:
    rendered[p : p + n] = tok.vision_id
  # The engine feeds <eos> only with the next frame; the stream ended after the last response.
  assert session.fed + [tok.eos_id] == rendered.tolist()


def test_engine_truncates_long_responses_and_closes_them(tmp_path):
  tok = build_word_tokenizer(["a", "b"], tmp_path / "tokenizer.json")
  session = _ScriptedSession(tok, 2, [0], tok.encode("a b a b a b"))
  engine = streaming.StreamEngine(session, tok, fps=2.0, system_prompt="", max_new_tokens=3)
  (turn,) = engine.push_frame(np.zeros((4, 4, 3), np.uint8))
  assert turn.truncated and turn.token_ids == tok.encode("a b a")
  engine.push_frame(np.zeros((4, 4, 3), np.uint8), respond=False)
  closing = [tok.eos_id] + list(tok.newline_ids) + list(tok.stream_open_ids)
  assert session.fed[-(len(closing) + 2) : -2] == closing and engine.truncated_responses == 1


# ------------------------------------------------------------------------------ sampling
def test_sampling_greedy_temperature_and_top_p():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4, 0.0]]) + 1e-30)
  key = jax.random.key(0)
  greedy = streaming.sample_token(logits, key, temperature=0.0, top_p=1.0, vocab_size=5)
  assert int(greedy[0]) == 3
  # vocab_size hides ids the tokenizer does not have.
  assert int(streaming.sample_token(logits, key, temperature=0.0, top_p=1.0, vocab_size=3)[0]) == 2

  def draw(keys, top_p):
    return np.asarray(
      jax.jit(
        jax.vmap(
          lambda k: streaming.sample_token(logits, k, temperature=1.0, top_p=top_p, vocab_size=5)[0]
        )
      )(keys)
    )

  keys = jax.random.split(key, 4000)
  full = np.bincount(draw(keys, 1.0), minlength=5) / 4000
  np.testing.assert_allclose(full, [0.1, 0.2, 0.3, 0.4, 0.0], atol=0.03)
  # top_p = 0.5: the smallest set reaching 0.5 is {0.4, 0.3}, renormalised to 4/7, 3/7.
  nucleus = np.bincount(draw(keys, 0.5), minlength=5) / 4000
  np.testing.assert_allclose(nucleus, [0, 0, 3 / 7, 4 / 7, 0], atol=0.03)
  sharp = jax.jit(
    jax.vmap(
      lambda k: streaming.sample_token(logits, k, temperature=0.05, top_p=1.0, vocab_size=5)[0]
    )
  )(keys[:200])
  assert (np.asarray(sharp) == 3).mean() > 0.99  # low temperature -> argmax


def test_row_write_equals_writing_that_layer_alone():
  """``KVCache.write(row=r)`` on a stack's cache changes row r exactly as writing that layer's
  own cache does (ring wrap, padding dropped, overwrite counted) and leaves the other rows."""
  rng = np.random.default_rng(0)
  layers, b, size, kv, h = 3, 2, 5, 2, 4
  stack = jax.tree.map(
    lambda a: jnp.stack([a] * layers), KVCache.empty(b, size, kv, h, jnp.float32)
  )
  for step in range(3):  # 3 x 3 real entries into 5 slots: the ring wraps and overwrites
    k, v = (jnp.asarray(rng.normal(size=(b, 4, kv, h)), jnp.float32) for _ in range(2))
    pos = jnp.asarray(np.arange(4 * step, 4 * step + 4)[None].repeat(b, 0), jnp.int32)
    seg = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1]], jnp.int32)  # one padding slot per row
    r = step % 2
    want = [stack.row(i) for i in range(layers)]
    want[r] = want[r].write(k, v, pos, seg)
    stack = stack.write(k, v, pos, seg, row=jnp.int32(r))
    for i in range(layers):
      for got, exp in zip(stack.row(i), want[i]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(exp))
  assert int(stack.overwritten[0]) > 0 and int(stack.overwritten[2]) == 0


def test_streaming_step_writes_stacked_caches_in_place():
  """The compiled per-frame step (``streaming._step`` as ``mod-jax compile`` builds it, donated
  stacked caches) updates its caches in place: every cache byte aliases an output, and its
  temporaries exceed those of one dense decoder layer stepping over the same tokens on its own
  donated cache (the per-layer layout, which XLA writes in place) by less than that layer's K
  and V: the copy that slicing a layer's row out of its stack, writing it and setting it back
  costs. Wide heads and a long window make that row the largest buffer besides the caches."""
  from mod_jax.analysis import compile as aot
  from mod_jax.model.factory import build_model
  from mod_jax.train import sharding

  cfg = tiny.get_config()  # interleaved: 2 stacks of 2 layers, scanned
  m = cfg.model
  m.n_heads, m.n_kv_heads, m.head_dim = 2, 1, 128
  cfg.data.max_frames, cfg.data.max_text = 64, 256
  cfg.train.batch_size = 1
  sizes = streaming.cache_sizes(RoutingPlan.from_config(m), 64, 256)
  step = aot.compile_stream(cfg, sharding.make_mesh(cfg, jax.devices()[:1]))

  model = build_model(m, rngs=0)
  caches = jax.eval_shape(lambda: streaming.empty_caches(model, 1, sizes))
  assert step["alias_bytes"] == sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(caches))

  # the oracle: dense layer 0 alone, on a donated cache of the largest size, 1 + N tokens
  graphdef, state = nnx.split(model.llm.layer(0))
  one = KVCache.empty(1, max(sizes), m.n_kv_heads, m.head_dim, jnp.dtype(m.dtype))
  t = 1 + m.tokens_per_frame
  ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
  layer = (
    jax.jit(lambda st, c, x, p, s: nnx.merge(graphdef, st).cached(x, p, s, c), donate_argnums=1)
    .lower(state, one, jax.ShapeDtypeStruct((1, t, m.d_model), jnp.dtype(m.dtype)), ids, ids)
    .compile()
    .memory_analysis()
  )
  row_kv = one.k.nbytes + one.v.nbytes
  assert step["temp_bytes"] < layer.temp_size_in_bytes + row_kv, (
    step["temp_bytes"],
    layer.temp_size_in_bytes,
    row_kv,
  )
