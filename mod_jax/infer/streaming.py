"""Streaming inference (LIVE) with a static-shape KV cache that keeps only kept vision tokens.

VideoLLM-online (Chen et al. 2024, §3.3; reference ``demo/inference.py``) watches a video frame by
frame: each frame is fed as [interval token + the frame's N vision tokens] with the KV cache; when
P(interval token) at the frame's last vision token falls below a threshold (0.725) the model
speaks: ``]\\n Assistant:`` is fed and a response is decoded until ``<eos>``, keeping the cache.
VideoLLM-MoD (Wu et al. 2024, §3.2) routes the top-k vision tokens of each frame through a MoD
layer; the others skip it, so that layer never computes their keys/values and its cache holds
``T + F·k`` entries instead of ``T + F·N`` (T text entries, F frames). Because top-k is taken within
a frame and a frame arrives whole, feeding the stream chunk by chunk gives the logits of the full
forward pass (``tests/test_infer_streaming.py`` checks it, fp32, ≤ 1e-4).

Layers (one mechanism, three users — ``mod-jax stream``, ``mod-jax eval``, the benchmarks)::

  cache_sizes / frames_for_budget     static per-layer slot counts (dense: T + F·N, MoD: T + F·k)
  CacheLedger                         host bookkeeping: what the window holds, eviction policy
  Session                             jitted step: write a chunk [text | frames] into the caches
                                      (``mod_jax.model.attention.KVCache``, passed in and
                                      returned by ``VideoLLM.stream_step``) and return its logits
  StreamEngine                        the LIVE protocol: prompt, frames, decisions, decoding,
                                      user queries, the long-stream policy

Long-stream policy (``docs/streaming.md``): the cache holds a WINDOW of at most ``max_frames``
frames and ``max_text`` text entries (the system prompt included), by default the training
config's ``data.max_frames`` / ``data.max_text``, so the model never attends to more than a
training row held. The system prompt is pinned. Under ``on_full="slide"`` the oldest chunks —
whole frames, queries or response tokens, the same ones in every layer — are evicted when the
window would overflow; ``"stop"`` raises :class:`CacheFull` instead (nothing is written). With
``rebase`` (the default) RoPE positions are re-based at every step: keys are cached unrotated and
rotated at read time at ``position - offset``, ``offset`` being the gap between the pinned prompt's
end and the oldest live entry, so the window sits right after the prompt, as in a training row,
and no position exceeds ``max_text + max_frames·N - 1``. Without it, positions keep growing with
the stream (what the model saw in training is left after a few windows). A write can never land on
a live entry silently: each cache counts such writes and :class:`Session` raises.

Each layer's cache is sized for the window (``cache_sizes``: ``max_text + max_frames·n_i``), so
neither layer type evicts while the other has room: eviction is decided by the window alone.

No stalls: text is fed in chunks padded to a few bucket lengths (``text_buckets``; padding takes
no cache slot), so after :meth:`StreamEngine.warmup` a session compiles nothing whatever the
queries (``tests/test_infer_streaming.py`` counts compiles).

Memory: a frame adds 1 + n_i entries to layer i (its interval token, and n_i = N vision tokens
in a dense layer, k in a MoD layer). With MoD on every other layer the frames that fit in one
KV budget grow by 2(N + 1) / (N + k + 2) = 22/14 = 1.57× (N = 10, k = 2); counting vision entries
only, as the paper's "1.7× longer video" does, N / ((N + k) / 2) = 1.67× (``benchmarks/
streaming.py`` measures both).

Shape letters: b batch (streams in lockstep, 1 for ``mod-jax stream``), t text tokens of a chunk,
f frames of a chunk, v vocabulary.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mod_jax.data.tokenizer import StreamTokenizer
from mod_jax.infer.metrics import speak_decision
from mod_jax.model.attention import KVCache
from mod_jax.model.video_llm import VideoLLM

ON_FULL = ("stop", "slide")
DEFAULT_THRESHOLD = 0.725  # P(interval) below which the LIVE demo speaks


class CacheFull(RuntimeError):
  """The next chunk does not fit in the KV cache under the ``stop`` policy (nothing written)."""


# ------------------------------------------------------------------------------------- compiles
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _on_event(name: str, _seconds: float, **_kw) -> None:
  if name == _COMPILE_EVENT:
    _compiles[0] += 1


class CompileCounter:
  """Counts XLA compilations in this process from its creation (``jax.monitoring`` events).

  ``CompileCounter().count`` is the number of backend compiles since the counter was made, of any
  jitted function (the streaming step, eager ops on new shapes, ...).
  """

  _registered = False

  def __init__(self):
    if not CompileCounter._registered:
      jax.monitoring.register_event_duration_secs_listener(_on_event)
      CompileCounter._registered = True
    self.start = _compiles[0]

  @property
  def count(self) -> int:
    return _compiles[0] - self.start


# ------------------------------------------------------------------------------------- sizing
def vision_entries_per_frame(plan) -> tuple[int, ...]:
  """Vision entries a frame adds to each layer's cache: N (dense layer) or k (MoD layer)."""
  n = plan.tokens_per_frame
  return tuple(n if k is None else int(k) for k in plan.keep)


def cache_sizes(plan, max_frames: int, max_text: int) -> tuple[int, ...]:
  """Slots per layer for ``max_frames`` frames and ``max_text`` text entries.

  ``max_text`` counts every text token in the cache: the system prompt, one interval (or stream
  open) token per frame, queries and responses. Layer ``i`` gets ``max_text + max_frames·n_i``
  with n_i = N (dense) or k (MoD layer). Raises ValueError for negative counts or no slot.
  """
  if max_frames < 0 or max_text < 0 or max_frames + max_text == 0:
    raise ValueError(
      f"max_frames={max_frames} and max_text={max_text} must be >= 0 and not both 0."
    )
  return tuple(max_text + max_frames * n for n in vision_entries_per_frame(plan))


def bytes_per_entry(model_cfg) -> int:
  """Bytes one cache entry takes in one layer: K and V (kv_heads·head_dim each, compute dtype)
  plus its int32 position and segment id."""
  itemsize = jnp.dtype(model_cfg.dtype).itemsize
  return 2 * model_cfg.n_kv_heads * model_cfg.head_dim * itemsize + 2 * 4


def cache_bytes(model_cfg, plan, max_frames: int, max_text: int) -> int:
  """Bytes of the KV caches of all layers for one stream (:func:`cache_sizes` × entry bytes)."""
  return sum(cache_sizes(plan, max_frames, max_text)) * bytes_per_entry(model_cfg)


def frames_for_budget(
  model_cfg, plan, budget_bytes: int, text_per_frame: int = 1, fixed_text: int = 0
) -> int:
  """Frames a stream can hold in ``budget_bytes`` of KV cache (all layers, one stream).

  Each frame brings ``text_per_frame`` text entries (its interval token) and n_i vision entries
  per layer; ``fixed_text`` text entries (system prompt, responses) are set aside first.
  """
  per_frame = sum(text_per_frame + n for n in vision_entries_per_frame(plan))
  entries = budget_bytes // bytes_per_entry(model_cfg) - fixed_text * len(plan.keep)
  return max(0, int(entries // per_frame))


# ------------------------------------------------------------------------------------- ledger
class CacheLedger:
  """Host-side account of what the stream's window holds; applies the cache-full policy.

  The window is a vector of limits, e.g. ``(max_text, max_frames)`` (:class:`Session`) or one
  slot count per layer. Entries are written in chunks (a prompt, [interval + frame], a query, a
  response token); each chunk is one *event* with a count per limit and the stream position of its
  first token. Events after :meth:`pin` form a FIFO that mirrors the caches' rings, so evicting the
  oldest events frees exactly the slots the next writes go to.
  """

  def __init__(self, limits: Sequence[int], on_full: str = "stop", names: Sequence[str] = ()):
    if on_full not in ON_FULL:
      raise ValueError(f"on_full={on_full!r}; choose one of {ON_FULL}.")
    self.limits = tuple(int(s) for s in limits)
    self.names = tuple(names) or tuple(f"layer {i}" for i in range(len(self.limits)))
    self.on_full = on_full
    self.used = [0] * len(self.limits)
    self.pinned = [0] * len(self.limits)
    self.events: collections.deque = collections.deque()  # (first_position, counts)
    self.evicted_events = 0

  def reserve(self, counts: Sequence[int], first_position: int, what: str = "chunk") -> int:
    """Makes room for an event; returns the eviction boundary (evict positions below it), which
    is also the first position of the oldest live unpinned entry.

    Raises:
      CacheFull: under ``stop`` when it does not fit, or under ``slide`` when it does not fit
        even with every unpinned event evicted. Nothing is changed then.
    """
    counts = [int(c) for c in counts]
    drop = 0
    used = list(self.used)
    while any(u + c > s for u, c, s in zip(used, counts, self.limits)):
      if self.on_full == "stop" or drop == len(self.events):
        i = next(i for i, (u, c, s) in enumerate(zip(used, counts, self.limits)) if u + c > s)
        raise CacheFull(
          f"KV cache full: the {what} needs {counts[i]} more {self.names[i]}; the window "
          f"holds {self.used[i]} of {self.limits[i]} (pinned {self.pinned[i]}); "
          f"policy on_full={self.on_full!r}. Give a larger window (max_frames / max_text) or "
          f"use on_full='slide' to drop the oldest frames."
        )
      used = [u - c for u, c in zip(used, self.events[drop][1])]
      drop += 1
    for _ in range(drop):
      self.events.popleft()
    self.evicted_events += drop
    self.used = [u + c for u, c in zip(used, counts)]
    self.events.append((int(first_position), counts))
    return self.events[0][0]

  def pin(self) -> None:
    """Everything reserved so far (the system prompt) stays for good.

    Raises:
      CacheFull: the window would be left without room for a frame's entries.
    """
    if any(u >= s for u, s in zip(self.used, self.limits)):
      raise CacheFull(
        f"the pinned prefix fills the window ({self.used} of {self.limits} "
        f"{', '.join(self.names)}); give a larger window."
      )
    self.pinned = list(self.used)
    self.events.clear()


# ------------------------------------------------------------------------------------- session
def empty_caches(model: VideoLLM, batch: int, sizes: Sequence[int]) -> tuple[KVCache, ...]:
  """Empty :class:`KVCache` s for the decoder's layers, ``sizes[i]`` slots for layer i, stacked
  as the layers are: one KVCache per stack s (``Decoder.stacks``) with a leading axis over its
  layers ``members[s]``, so the streaming step scans over the stack's parameters and caches
  together. Layer i's cache: ``Decoder.layer_cache(caches, i)``.

  Raises:
    ValueError: ``len(sizes)`` is not the number of layers, or the layers of one stack were
      given different sizes.
  """
  dec = model.llm
  if len(sizes) != dec.n_layers:
    raise ValueError(f"{len(sizes)} cache sizes for {dec.n_layers} layers.")
  attn = dec.stacks[0].attn  # k [layers, d, kv_heads, head_dim]: every layer's shape
  kv_heads, head_dim = attn.k.shape[-2:]
  out = []
  for m in dec.members:
    size = {int(sizes[i]) for i in m}
    if len(size) != 1:
      raise ValueError(f"layers {m} share a stack but were given cache sizes {sorted(size)}.")
    one = KVCache.empty(batch, size.pop(), kv_heads, head_dim, attn.dtype)
    rows = (len(m),)
    out.append(jax.tree.map(lambda a, rows=rows: jnp.broadcast_to(a, rows + a.shape), one))
  return tuple(out)


def sample_token(
  logits_bv: jax.Array, rng: jax.Array, *, temperature: float, top_p: float, vocab_size: int
) -> jax.Array:
  """Next token int32 [b] from logits [b, V]: greedy (temperature 0) or temperature + top-p.

  Only ids < ``vocab_size`` (the tokenizer's) can be drawn. Top-p keeps the smallest set of most
  likely tokens whose probability reaches ``top_p`` (at least one token).
  """
  logits = logits_bv[:, :vocab_size].astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p = jnp.sort(probs, axis=-1)[:, ::-1]
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass of strictly likelier ones
    kept = before < top_p
    cutoff = jnp.min(jnp.where(kept, sorted_p, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(probs >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Decoding settings: temperature 0 is greedy; top_p in (0, 1] applies when sampling."""

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
      raise ValueError(
        f"temperature={self.temperature} must be >= 0 and top_p={self.top_p} in (0, 1]."
      )


DEFAULT_TEXT_BUCKETS = (1, 4, 16, 64)


class Session:
  """A model, its KV caches and the jitted step that feeds it one chunk at a time.

  A chunk is the model's slot layout (``VideoLLM.stream_step``): t text slots and f frames with
  explicit stream positions. The step evicts what the ledger dropped, writes the chunk's real
  entries (text + kept vision tokens per layer; padding takes no slot) into the caches, and returns
  the logits at the text slots and frame ends, the next token sampled after the last real text
  slot, and P(interval) at the frame ends. Each (t, f) shape compiles once; :meth:`feed` pads text
  to ``text_buckets``, so a stream needs one shape per bucket and one per frame chunk.

  A model with a training-free method attached (``mod_jax.compress.apply.attach``: FastV,
  DyCoke) also carries its per-stream :attr:`state` (``apply.StreamState``: DyCoke's TTM window
  and KV selection) through the step beside the caches, and resets it with them.
  """

  def __init__(
    self,
    graphdef,
    params,
    model_cfg,
    *,
    batch: int = 1,
    max_frames: int,
    max_text: int,
    on_full: str = "stop",
    rebase: bool = True,
    text_buckets: Sequence[int] = DEFAULT_TEXT_BUCKETS,
    sampler: Sampler = Sampler(),
    vocab_size: int | None = None,
    seed: int = 0,
  ):
    """Builds caches for a window of ``max_frames`` frames and ``max_text`` text entries.

    Args:
      graphdef, params: ``nnx.split(model, nnx.Param)`` of a :class:`VideoLLM`.
      model_cfg: its ``config.model``.
      batch: streams fed in lockstep.
      max_frames, max_text: the window (module docstring); ``max_text`` counts every text entry
        in the cache, the pinned prompt and one interval token per frame included. Layer i gets
        :func:`cache_sizes` slots.
      on_full: ``stop`` or ``slide`` (module docstring).
      rebase: re-base RoPE positions to the window (module docstring); False keeps absolute ones.
      text_buckets: lengths text chunks are padded to (ascending; longer text is split).
      sampler: decoding settings of the sampled next token.
      vocab_size: ids that may be sampled (the tokenizer's size); default the model's vocabulary.
      seed: PRNG seed for sampling and ``random`` selection.

    Raises:
      ValueError: bad window or buckets.
    """
    buckets = tuple(int(x) for x in text_buckets)
    if not buckets or buckets[0] < 1 or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"text_buckets={text_buckets!r} must be ascending lengths >= 1.")
    model = nnx.merge(graphdef, params)
    self.plan = model.llm.plan
    self.slots = model.llm.slots  # layer i's cache is row r of caches[s]
    self.sizes = cache_sizes(self.plan, max_frames, max_text)
    self._empty = jax.eval_shape(lambda: empty_caches(model, batch, self.sizes))
    self.compression = model.llm.compress  # FastV / DyCoke (mod_jax.compress.apply.attach)
    self._empty_state = None
    if self.compression is not None:
      from mod_jax.compress import apply

      self._empty_state = jax.eval_shape(lambda: apply.empty_state(model, batch, self.sizes))
    self._graphdef, self._params = graphdef, params
    self.model_cfg = model_cfg
    self.batch = batch
    self.window = (int(max_text), int(max_frames))
    self.on_full = on_full
    self.rebase = bool(rebase)
    self.text_buckets = buckets
    self.tokens_per_frame = model_cfg.tokens_per_frame
    self.image_size = model_cfg.vision.image_size
    self._rng = jax.random.key(seed)
    self._calls = 0
    self._static = dict(
      graphdef=graphdef, sampler=sampler, vocab_size=int(vocab_size or model_cfg.vocab_size)
    )
    self.reset()

  @property
  def trained_max_position(self) -> int:
    """The largest position a window can reach: ``max_text + max_frames·N - 1``."""
    return self.window[0] + self.window[1] * self.tokens_per_frame - 1

  def layer_caches(self) -> tuple[KVCache, ...]:
    """Each layer's :class:`KVCache` (row r of its stack's, ``Decoder.slot``), layer order."""
    return tuple(self.caches[s].row(r) for s, r in self.slots)

  def _zero_caches(self):
    # Committed to the device, as the step's outputs are: a jit's cache key tells committed from
    # uncommitted arguments, so fresh caches must look like returned ones (no recompilation).
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self._empty)
    return jax.device_put(zeros, jax.devices()[0])

  def _zero_state(self):
    """A new stream's compression state (``mod_jax.compress.apply.StreamState``) or None."""
    if self._empty_state is None:
      return None
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), self._empty_state)
    return jax.device_put(zeros, jax.devices()[0])

  def reset(self) -> None:
    """Empties the caches (and a compression's state) and the ledger; the next chunk starts at
    position 0."""
    self.caches = self._zero_caches()
    self.state = self._zero_state()
    self.ledger = CacheLedger(self.window, self.on_full, ("text entries", "frames"))
    self.position = 0
    self.pinned_end = 0  # first position after the pinned prefix
    self.rope_offset = 0
    self.max_position = -1  # largest RoPE position fed so far (after re-basing)

  def pin(self) -> None:
    """Keeps everything fed so far (the system prompt) through any eviction."""
    self.ledger.pin()
    self.caches = _pin(self.caches)
    self.pinned_end = self.position

  def feed_layout(
    self,
    text_tokens_bt,
    text_positions_bt,
    text_segment_ids_bt,
    frames_bfhwc,
    frame_positions_bf,
    frame_segment_ids_bf,
    *,
    next_position: int,
    what: str = "chunk",
    features_bfnd=None,
  ):
    """Feeds one chunk in the slot layout (explicit positions; segment id 0 = padding slot).

    Args:
      text_tokens_bt, text_positions_bt, text_segment_ids_bt: int32 ``[b, t]``.
      frames_bfhwc: uint8 ``[b, f, S, S, 3]``; frame_positions_bf, frame_segment_ids_bf: int32
        ``[b, f]`` (frame i's vision tokens sit at positions p_i .. p_i + N - 1).
      next_position: the stream position that follows this chunk.
      what: named in a :class:`CacheFull` message.
      features_bfnd: the frames' vision-tower output ``[b, f, N, d_vision]`` (:meth:`encode`),
        used instead of ``frames_bfhwc`` (which may then be None).

    Returns:
      dict of numpy arrays: ``text_logits`` f32 ``[b, t, V]``, ``frame_logits`` f32 ``[b, f, V]``,
      ``frame_probs`` f32 ``[b, f, V]`` (softmax at the frame ends), ``next_token`` int32 ``[b]``
      (sampled after the last real text slot; meaningless without one), ``overwritten`` (0).

    Raises:
      CacheFull: the chunk does not fit under the policy (nothing is written).
      RuntimeError: a write landed on a live cache entry (a bookkeeping error; never silent).
    """
    text_real = np.asarray(text_segment_ids_bt) != 0
    frame_real = np.asarray(frame_segment_ids_bf) != 0
    positions = np.concatenate(
      [np.asarray(text_positions_bt)[text_real], np.asarray(frame_positions_bf)[frame_real]]
    )
    first = int(positions.min()) if positions.size else self.position
    counts = (int(text_real.sum(1).max(initial=0)), int(frame_real.sum(1).max(initial=0)))
    window = self.ledger.reserve(counts, first, what)
    offset = max(0, window - self.pinned_end) if self.rebase else 0
    t = text_real.shape[1]
    last = np.where(text_real, np.arange(t), 0).max(axis=1, initial=0)  # last real text slot
    batch = {
      "text_tokens": jnp.asarray(text_tokens_bt, jnp.int32),
      "text_positions": jnp.asarray(text_positions_bt, jnp.int32),
      "text_segment_ids": jnp.asarray(text_segment_ids_bt, jnp.int32),
      "frame_positions": jnp.asarray(frame_positions_bf, jnp.int32),
      "frame_segment_ids": jnp.asarray(frame_segment_ids_bf, jnp.int32),
    }
    if features_bfnd is not None:
      batch["features"] = features_bfnd
    else:
      batch["frames"] = jnp.asarray(frames_bfhwc, jnp.uint8)
    rng = jax.random.fold_in(self._rng, self._calls)
    self._calls += 1
    out, self.caches, self.state = _step(
      self._params,
      self.caches,
      self.state,
      batch,
      jnp.int32(window),
      jnp.int32(offset),
      jnp.asarray(last, jnp.int32),
      rng,
      **self._static,
    )
    out = jax.device_get(out)
    if out["overwritten"]:
      raise RuntimeError(
        f"KV cache bookkeeping error: {int(out['overwritten'])} live entries "
        f"were overwritten while feeding a {what} at position {first}."
      )
    self.rope_offset = offset
    self.max_position = max(self.max_position, int(next_position) - 1 - offset)
    self.position = int(next_position)
    return out

  def bucket(self, num_text: int) -> int:
    """The padded length of a text chunk of ``num_text`` tokens (<= the largest bucket)."""
    return next(b for b in self.text_buckets if b >= num_text)

  def encode(self, frames_fhwc: np.ndarray) -> jax.Array:
    """The vision tower on frames, uint8 ``[f, S, S, 3]`` or ``[b, f, S, S, 3]`` -> features
    ``[b, f, N, d_vision]`` for :meth:`feed` (dispatched asynchronously: a worker thread can encode
    frame t+1 while the decoder handles frame t, :func:`encode_ahead`)."""
    frames = self._frames(frames_fhwc)
    return _encode(self._params, jnp.asarray(frames), graphdef=self._graphdef)

  def _frames(self, frames_fhwc) -> np.ndarray:
    b, s = self.batch, self.image_size
    frames = np.asarray(frames_fhwc)
    if frames.ndim == 4:
      frames = np.broadcast_to(frames[None], (b, *frames.shape))
    if frames.shape[0] != b or frames.shape[2:] != (s, s, 3) or frames.dtype != np.uint8:
      raise ValueError(
        f"frames must be uint8 [f, {s}, {s}, 3] (or [{b}, f, ...]); got "
        f"{frames.dtype} {frames.shape}. Decode with mod_jax.data.video at "
        f"size={s}."
      )
    return frames

  def feed(
    self,
    text_ids: Sequence[int],
    frames_fhwc: np.ndarray | None = None,
    *,
    what: str = "chunk",
    features=None,
  ):
    """Feeds text tokens and then frames at the next stream positions (all streams alike).

    The text is padded to a bucket length (:attr:`text_buckets`); text longer than the largest
    bucket goes in as several chunks (each its own event), the frames with the last one.

    Args:
      text_ids: t token ids (t may be 0 when there are frames).
      frames_fhwc: uint8 ``[f, S, S, 3]`` or ``[b, f, S, S, 3]``; None for a text-only chunk.
      features: the frames already encoded (:meth:`encode`), ``[b, f, N, d_vision]``, instead
        of ``frames_fhwc``.

    Returns:
      As :meth:`feed_layout`, with ``text_logits`` ``[b, t, V]`` at the real text slots of all
      the chunks; the rest from the last chunk.
    """
    b, n, s = self.batch, self.tokens_per_frame, self.image_size
    if features is not None:
      frames, f = None, features.shape[1]
    else:
      if frames_fhwc is None:
        frames_fhwc = np.zeros((b, 0, s, s, 3), np.uint8)
      frames = self._frames(frames_fhwc)
      f = frames.shape[1]
    text_ids = [int(x) for x in text_ids]
    if not text_ids and not f:
      raise ValueError("an empty chunk: give text ids or frames.")
    big, before = self.text_buckets[-1], []
    while len(text_ids) > big:
      before.append(self.feed(text_ids[:big], what=what)["text_logits"])
      text_ids = text_ids[big:]
    t, p = len(text_ids), self.position
    tb = self.bucket(t) if t else 0
    text = np.zeros((b, tb), np.int32)
    text[:, :t] = text_ids
    tpos = np.broadcast_to(np.arange(p, p + tb, dtype=np.int32)[None], (b, tb))
    tseg = np.broadcast_to((np.arange(tb) < t).astype(np.int32)[None], (b, tb))
    fpos = np.broadcast_to((p + t + n * np.arange(f, dtype=np.int32))[None], (b, f))
    out = self.feed_layout(
      text,
      tpos,
      tseg,
      frames,
      fpos,
      np.ones((b, f), np.int32),
      next_position=p + t + n * f,
      what=what,
      features_bfnd=features,
    )
    out["text_logits"] = np.concatenate(before + [out["text_logits"][:, :t]], axis=1)
    return out

  def warmup(self, encoded: bool = False) -> None:
    """Compiles the frame step (one text token + one frame) and every text bucket.

    Runs the step on throw-away caches (the session's state and ledger are untouched), so a
    stream compiles nothing more after its first frame. ``encoded``: the frame step takes
    features (:meth:`encode`, compiled too) instead of pixels.
    """
    b, n, s = self.batch, self.tokens_per_frame, self.image_size
    shapes = [(1, 1)] + [(t, 0) for t in self.text_buckets]
    for t, f in shapes:
      ids = np.ones((b, t), np.int32)
      pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
      batch = {
        "text_tokens": jnp.asarray(ids),
        "text_positions": jnp.asarray(pos),
        "text_segment_ids": jnp.asarray(ids),
        "frames": jnp.zeros((b, f, s, s, 3), jnp.uint8),
        "frame_positions": jnp.asarray(t + n * np.arange(f, dtype=np.int32)[None].repeat(b, 0)),
        "frame_segment_ids": jnp.ones((b, f), jnp.int32),
      }
      if encoded and f:
        batch["features"] = jax.block_until_ready(self.encode(np.asarray(batch.pop("frames"))))
      caches = self._zero_caches()
      jax.block_until_ready(
        _step(
          self._params,
          caches,
          self._zero_state(),
          batch,
          jnp.int32(0),
          jnp.int32(0),
          jnp.zeros((b,), jnp.int32),
          self._rng,
          **self._static,
        )
      )


# Module-level jits (graphdef static): sessions of one model and cache shape share compilations.
@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampler", "vocab_size"), donate_argnums=(1, 2)
)
def _step(
  params,
  caches,
  state,
  batch,
  window,
  rope_offset,
  last_text,
  rng,
  *,
  graphdef,
  sampler: Sampler,
  vocab_size: int,
):
  """Evicts positions < ``window``, feeds the chunk, samples after text slot ``last_text`` [b].
  ``state``: a compression's per-stream state (None without one), returned updated."""
  model = nnx.merge(graphdef, params)
  model.eval()  # inference: no LoRA dropout (the rng is for sampling and random routing)
  caches = tuple(c.evict_before(window) for c in caches)
  text_logits, frame_logits, caches, state = model.stream_step(
    batch, caches, rope_offset=rope_offset, rng=rng, state=state
  )
  b, t, v = text_logits.shape
  last = (
    jnp.take_along_axis(text_logits, last_text[:, None, None], axis=1)[:, 0]
    if t
    else jnp.zeros((b, v), text_logits.dtype)
  )
  out = {
    "text_logits": text_logits,
    "frame_logits": frame_logits,
    "frame_probs": jax.nn.softmax(frame_logits, axis=-1),
    "next_token": sample_token(
      last, rng, temperature=sampler.temperature, top_p=sampler.top_p, vocab_size=vocab_size
    ),
    "overwritten": sum(jnp.sum(c.overwritten) for c in caches),
  }
  return out, caches, state


@functools.partial(jax.jit, donate_argnums=(0,))
def _pin(caches):
  return tuple(c.pin() for c in caches)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(params, frames, *, graphdef):
  """The vision tower, uint8 [b, f, S, S, 3] -> [b, f, N, d_vision] (what ``features`` holds)."""
  return nnx.merge(graphdef, params).vision(frames)


def encode_ahead(session: Session, frames: Iterable[tuple[float, np.ndarray]]):
  """Encoder ‖ decoder pipelining (LIVE's idea): yields ``(t, frame, features)`` for each
  ``(t, frame)`` of ``frames`` while a worker thread already decodes and encodes the NEXT frame
  (:meth:`Session.encode`), so the vision tower works on frame t+1 while the caller feeds frame t
  to the decoder (``StreamEngine.push_frame(features=...)``)."""
  it = iter(frames)

  def next_encoded():
    item = next(it, None)
    if item is None:
      return None
    t, frame = item
    return t, frame, jax.block_until_ready(session.encode(np.asarray(frame)[None]))

  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="encode_ahead") as pool:
    job = pool.submit(next_encoded)
    while (item := job.result()) is not None:
      job = pool.submit(next_encoded)
      yield item


# ------------------------------------------------------------------------------------- engine
def prompt_ids(tokenizer: StreamTokenizer, system_prompt: str) -> list[int]:
  """``<bos>{system}\\n``: the pinned start of every stream (as ``mod_jax.data.stream``)."""
  body = tokenizer.encode(system_prompt) if system_prompt else []
  return [tokenizer.bos_id] + body + list(tokenizer.newline_ids)


@dataclasses.dataclass
class Turn:
  """One utterance of the stream.

  Attributes:
    role: ``"assistant"`` (the model spoke) or ``"user"`` (a query was inserted).
    time: seconds into the video (the frame after which it was said / the query time).
    frame: index of the last frame fed before it (-1: before the first frame).
    text: decoded text (special tokens removed).
    token_ids: the response's ids (without ``<eos>``); the query's ids for a user turn.
    p_interval: P(interval token) at the frame end that triggered the response.
    truncated: the response hit ``max_new_tokens`` without ``<eos>`` (it is closed with one).
  """

  role: str
  time: float
  frame: int
  text: str
  token_ids: list[int]
  p_interval: float | None = None
  truncated: bool = False

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class StreamEngine:
  """The LIVE protocol on a :class:`Session` (one stream), token for token the training format.

  ``<bos>{system}\\n`` is fed and pinned; then each frame is fed with the text that precedes it
  in the stream format (``mod_jax.data.stream``): ``[`` before the first frame, ``,`` after a
  silent frame, ``<eos>\\n[`` after a response, and ``]\\nUser: q\\n[`` (or, after a response,
  ``<eos>\\nUser: q\\n[``) when queries enter before the frame. At the frame's last vision token
  the decision is taken (:func:`~mod_jax.infer.metrics.speak_decision` with ``threshold``); to
  speak, ``]\\nAssistant:`` is fed and tokens are decoded (the session's sampler) until ``<eos>``
  or ``max_new_tokens``. :meth:`create` builds the engine and its session from a model.
  """

  def __init__(
    self,
    session,
    tokenizer: StreamTokenizer,
    *,
    fps: float,
    system_prompt: str,
    threshold: float = DEFAULT_THRESHOLD,
    max_new_tokens: int = 100,
  ):
    """Args:
      session: a :class:`Session` with batch 1 (anything with its ``feed``/``pin``/``reset``).
      tokenizer: the stream tokenizer the model was trained with.
      fps: frames per second of the pushed frames (timestamps = frame index / fps).
      system_prompt: text after ``<bos>`` (``config.data.system_prompt``).
      threshold: P(interval) below which the model speaks (0: argmax rule only).
      max_new_tokens: response length limit (tokens, ``<eos>`` excluded).

    Raises:
      ValueError: threshold outside [0, 1], max_new_tokens < 1 or fps <= 0.
    """
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"threshold={threshold} must be in [0, 1].")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1.")
    if fps <= 0:
      raise ValueError(f"fps={fps} must be > 0.")
    self.session = session
    self.tok = tokenizer
    self.threshold = float(threshold)
    self.max_new_tokens = int(max_new_tokens)
    self.fps = float(fps)
    self.prompt_ids = prompt_ids(tokenizer, system_prompt)
    self.reset()

  @classmethod
  def create(
    cls,
    graphdef,
    params,
    config,
    tokenizer: StreamTokenizer,
    *,
    max_frames: int | None = None,
    max_text: int | None = None,
    on_full: str = "slide",
    rebase: bool = True,
    text_buckets: Sequence[int] = DEFAULT_TEXT_BUCKETS,
    sampler: Sampler = Sampler(),
    seed: int = 0,
    fps: float | None = None,
    system_prompt: str | None = None,
    compression=None,
    **kwargs,
  ) -> StreamEngine:
    """An engine with its own session.

    Args:
      graphdef, params: the model (``nnx.split(model, nnx.Param)``).
      config: the full config (``model``; ``data.system_prompt``, ``data.fps`` and the window
        ``data.max_frames`` / ``data.max_text`` by default).
      tokenizer: the model's stream tokenizer.
      max_frames, max_text: the window (:class:`Session`): frames, and text entries including
        the system prompt (one interval token per frame, queries, responses). Default: the
        training config's, so the model never attends to more than a training row.
      on_full: ``slide`` (evict the oldest chunks, keep the system prompt) or ``stop``.
      rebase: re-base RoPE positions to the window (module docstring).
      text_buckets: padded text chunk lengths (compiled once each).
      sampler: greedy or temperature/top-p decoding. seed: its PRNG seed.
      fps, system_prompt: override the config's.
      compression: a ``mod_jax.compress.apply.Compression`` (FastV / DyCoke) run on the model
        (``apply.attach``), or None.
      **kwargs: ``threshold``, ``max_new_tokens``.

    Raises:
      ValueError: a tokenizer with more ids than the model's vocabulary, bad settings, or a
        ``compression`` the model cannot run (``apply.check``).
      CacheFull: the system prompt does not leave room in the window (at :meth:`reset`).
    """
    if tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(
        f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model "
        f"only {config.model.vocab_size}; it is not this model's tokenizer."
      )
    prompt = config.data.system_prompt if system_prompt is None else system_prompt
    if compression is not None:
      from mod_jax.compress import apply

      graphdef = apply.attach(graphdef, params, compression, config.model)
    session = Session(
      graphdef,
      params,
      config.model,
      batch=1,
      max_frames=int(config.data.max_frames if max_frames is None else max_frames),
      max_text=int(config.data.max_text if max_text is None else max_text),
      on_full=on_full,
      rebase=rebase,
      text_buckets=text_buckets,
      sampler=sampler,
      vocab_size=tokenizer.vocab_size,
      seed=seed,
    )
    return cls(
      session,
      tokenizer,
      fps=float(config.data.fps if fps is None else fps),
      system_prompt=prompt,
      **kwargs,
    )

  # -- state
  def reset(self) -> None:
    """Starts a new stream: empties the cache, feeds and pins ``<bos>{system}\\n``."""
    self.session.reset()
    self.session.feed(self.prompt_ids, what="system prompt")
    self.session.pin()
    self._after = "start"  # what the last fed thing was: start | frame | response
    self._queries: list[tuple[float, str]] = []
    self.frames_seen = 0
    self.responses = 0
    self.truncated_responses = 0

  def warmup(self, encoded: bool = False) -> None:
    """Compiles every step shape a stream uses (:meth:`Session.warmup`; ``encoded``: frames
    come as features, :func:`encode_ahead`) and the prompt's pin, then resets, so a live stream
    compiles nothing after its first frame."""
    self.session.warmup(encoded)
    self.reset()

  @property
  def evicted_chunks(self) -> int:
    """Chunks dropped by the ``slide`` policy so far."""
    return self.session.ledger.evicted_events

  def add_query(self, time_s: float, text: str) -> None:
    """Queues a user query; it enters before the first frame at or after ``time_s`` seconds."""
    if not text.strip():
      raise ValueError("empty user query.")
    self._queries.append((float(time_s), text))
    self._queries.sort(key=lambda q: q[0])

  # -- the protocol
  def _opening(self, frame_index: int, time_s: float) -> tuple[list[int], list[Turn]]:
    """The text fed before frame ``frame_index`` (shown at ``time_s`` seconds) and the user
    turns it inserts: the queries whose time is at or before ``time_s``."""
    tok = self.tok
    entering = [q for q in self._queries if q[0] * self.fps - 1e-6 <= time_s * self.fps]
    self._queries = self._queries[len(entering) :]
    users, turns = [], []
    for t, q in entering:
      ids = tok.encode(q)
      users += list(tok.user_ids) + ids + list(tok.newline_ids)
      turns.append(Turn("user", t, frame_index - 1, q, ids))
    if self._after == "start":
      return users + list(tok.stream_open_ids), turns
    if self._after == "response":
      return [tok.eos_id] + list(tok.newline_ids) + users + list(tok.stream_open_ids), turns
    if users:
      return list(tok.stream_close_ids) + users + list(tok.stream_open_ids), turns
    return [tok.interval_id], turns

  def push_frame(
    self,
    frame_hwc: np.ndarray | None,
    *,
    respond: bool = True,
    time_s: float | None = None,
    features=None,
  ) -> list[Turn]:
    """Feeds the next frame and, if the model decides to speak, decodes its response.

    Args:
      frame_hwc: uint8 ``[S, S, 3]`` at the model's ``image_size`` (``iter_frames`` output).
      respond: False feeds the frame and skips the decision (the model stays silent).
      time_s: the frame's source time in seconds (default: frame index / fps); queries enter
        before the first frame at or after their time, and turns carry it. A live stream that
        skips frames passes it.
      features: the frame already encoded (``[1, 1, N, d_vision]``, :func:`encode_ahead`);
        ``frame_hwc`` may then be None.

    Returns:
      The turns this frame produced: inserted user queries, then the assistant response if any.

    Raises:
      CacheFull: under ``on_full='stop'`` when the frame (or a response token) does not fit.
    """
    i = self.frames_seen
    now = i / self.fps if time_s is None else float(time_s)
    text, turns = self._opening(i, now)
    # Long openings go in as their own chunk so the frame step keeps one compiled shape.
    if len(text) > 1:
      self.session.feed(text[:-1], what="query" if turns else "stream text")
    if features is not None:
      out = self.session.feed(text[-1:], features=features, what=f"frame {i}")
    else:
      out = self.session.feed(text[-1:], np.asarray(frame_hwc)[None], what=f"frame {i}")
    self.frames_seen += 1
    self._after = "frame"
    probs = out["frame_probs"][0, -1]
    if respond and speak_decision(probs, self.tok.interval_id, self.threshold):
      turns.append(self._respond(i, now, float(probs[self.tok.interval_id])))
    return turns

  def respond_now(self) -> Turn:
    """Decodes a response after the last pushed frame whatever the decision (offline
    benchmarks: the answer follows the last frame of the clip)."""
    last = self.frames_seen - 1
    return self._respond(last, last / self.fps, float("nan"))

  def _respond(self, frame_index: int, time_s: float, p_interval: float) -> Turn:
    tok = self.tok
    out = self.session.feed(
      list(tok.stream_close_ids) + list(tok.assistant_ids), what="response start"
    )
    ids: list[int] = []
    nxt = int(out["next_token"][0])
    truncated = False
    while nxt != tok.eos_id:
      if len(ids) == self.max_new_tokens:
        truncated = True
        break
      ids.append(nxt)
      nxt = int(self.session.feed([nxt], what="response token")["next_token"][0])
    self._after = "response"  # the <eos> is fed with the next frame's opening
    self.responses += 1
    self.truncated_responses += truncated
    return Turn(
      "assistant",
      time_s,
      frame_index,
      tok.decode(ids, skip_special_tokens=True).strip(),
      ids,
      p_interval,
      truncated,
    )
