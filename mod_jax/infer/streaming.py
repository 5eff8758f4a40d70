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

Layers (one mechanism, three users — ``mod-jax stream``, ``mod-jax eval``, the benchmark)::

  cache_sizes / frames_for_budget     static per-layer slot counts (dense: T + F·N, MoD: T + F·k)
  CacheLedger                         host bookkeeping: live entries per layer, eviction policy
  Session                             jitted step: write a chunk [text | frames] into the caches
                                      (``mod_jax.model.attention.KVCache``) and return its logits
  StreamEngine                        the LIVE protocol: prompt, frames, decisions, decoding,
                                      user queries, the cache-full policy

Cache-full policy (``on_full``): ``"stop"`` raises :class:`CacheFull` before a chunk that does not
fit (nothing is written; the caller ends the stream with a message), ``"slide"`` evicts the oldest
chunks — whole frames, queries or response tokens, the same ones in every layer — while the pinned
system prompt stays. Evicted entries keep their RoPE positions' meaning: new entries continue the
position count, so a long slide reaches positions the model never saw in training. A write can
never land on a live entry silently: each cache counts such writes and :class:`Session` raises.

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
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mod_jax.data.tokenizer import StreamTokenizer
from mod_jax.infer.metrics import speak_decision
from mod_jax.model.attention import KVCache
from mod_jax.model.mod import RoutingPlan
from mod_jax.model.video_llm import VideoLLM

ON_FULL = ("stop", "slide")
DEFAULT_THRESHOLD = 0.725  # P(interval) below which the LIVE demo speaks


class CacheFull(RuntimeError):
  """The next chunk does not fit in the KV cache under the ``stop`` policy (nothing written)."""


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
  """Host-side account of what every layer's cache holds; applies the cache-full policy.

  Entries are written in chunks (a prompt, [interval + frame], a query, a response token); each
  chunk is one *event* with a count per layer and the stream position of its first token. Events
  after :meth:`pin` form a FIFO that mirrors the caches' rings, so evicting the oldest events
  frees exactly the slots the next writes go to.
  """

  def __init__(self, sizes: Sequence[int], on_full: str = "stop"):
    if on_full not in ON_FULL:
      raise ValueError(f"on_full={on_full!r}; choose one of {ON_FULL}.")
    self.sizes = tuple(int(s) for s in sizes)
    self.on_full = on_full
    self.used = [0] * len(self.sizes)
    self.pinned = [0] * len(self.sizes)
    self.events: collections.deque = collections.deque()  # (first_position, counts)
    self.evicted_events = 0

  def reserve(self, counts: Sequence[int], first_position: int, what: str = "chunk") -> int:
    """Makes room for an event; returns the eviction boundary (evict positions below it).

    Raises:
      CacheFull: under ``stop`` when it does not fit, or under ``slide`` when it does not fit
        even with every unpinned event evicted. Nothing is changed then.
    """
    counts = [int(c) for c in counts]
    drop = 0
    used = list(self.used)
    while any(u + c > s for u, c, s in zip(used, counts, self.sizes)):
      if self.on_full == "stop" or drop == len(self.events):
        layer = next(i for i, (u, c, s) in enumerate(zip(used, counts, self.sizes)) if u + c > s)
        raise CacheFull(
          f"KV cache full: the {what} needs {counts[layer]} entries in layer {layer}, which "
          f"holds {self.used[layer]} of {self.sizes[layer]} (pinned {self.pinned[layer]}); "
          f"policy on_full={self.on_full!r}. Give a larger cache (max_frames / max_text) or "
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
      CacheFull: a layer would be left without a free slot for the stream.
    """
    if any(u >= s for u, s in zip(self.used, self.sizes)):
      raise CacheFull(
        f"the pinned prefix fills the KV cache ({self.used} of {self.sizes}); give a larger cache."
      )
    self.pinned = list(self.used)
    self.events.clear()


# ------------------------------------------------------------------------------------- session
def attach_caches(model: VideoLLM, batch: int, sizes: Sequence[int]) -> None:
  """Gives decoder layer i a :class:`KVCache` of ``sizes[i]`` slots (replacing any old one)."""
  layers = model.llm.layers
  if len(sizes) != len(layers):
    raise ValueError(f"{len(sizes)} cache sizes for {len(layers)} layers.")
  for layer, size in zip(layers, sizes):
    a = layer.attn
    a.cache = KVCache(batch, int(size), a.k.shape[1], a.k.shape[2], a.dtype)
  if getattr(model.llm, "compress", None) is not None:  # DyCoke KV pruning state
    from mod_jax.compress import apply

    apply.attach_state(model, batch, sizes)


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


class Session:
  """A model with attached KV caches and the jitted step that feeds it one chunk at a time.

  A chunk is the model's slot layout (``VideoLLM.__call__``): t text slots and f frames with
  explicit stream positions. The step evicts what the ledger dropped, writes the chunk's entries
  (text + kept vision tokens per layer) into the caches, and returns the logits at the text slots
  and frame ends, the next token sampled after the last text slot, and P(interval) at the frame
  ends. Each (t, f) shape compiles once.
  """

  def __init__(
    self,
    graphdef,
    params,
    model_cfg,
    *,
    batch: int = 1,
    sizes: Sequence[int],
    on_full: str = "stop",
    sampler: Sampler = Sampler(),
    vocab_size: int | None = None,
    seed: int = 0,
    compressor=None,
  ):
    """Builds caches of ``sizes[i]`` slots per layer (see :func:`cache_sizes`).

    Args:
      graphdef, params: ``nnx.split(model, nnx.Param)`` of a :class:`VideoLLM`.
      model_cfg: its ``config.model``.
      batch: streams fed in lockstep.
      sizes: cache slots per decoder layer.
      on_full: ``stop`` or ``slide`` (module docstring).
      sampler: decoding settings of the sampled next token.
      vocab_size: ids that may be sampled (the tokenizer's size); default the model's vocabulary.
      seed: PRNG seed for sampling and ``random`` selection.
      compressor: a ``mod_jax.compress.apply.StreamCompressor`` (DyCoke TTM state) or None.
    """
    model = nnx.merge(graphdef, params)
    attach_caches(model, batch, sizes)
    self._graphdef, self._params, cache = nnx.split(model, nnx.Param, nnx.Cache)
    self._zero_cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
    self.cache = cache
    self.model_cfg = model_cfg
    self.batch = batch
    self.sizes = tuple(sizes)
    self.on_full = on_full
    self.plan = model.llm.plan
    self.per_frame = vision_entries_per_frame(self.plan)
    self.tokens_per_frame = model_cfg.tokens_per_frame
    self.image_size = model_cfg.vision.image_size
    self._rng = jax.random.key(seed)
    self._calls = 0
    self.compressor = compressor
    self._static = dict(
      graphdef=self._graphdef, sampler=sampler, vocab_size=int(vocab_size or model_cfg.vocab_size)
    )
    self.reset()

  def reset(self) -> None:
    """Empties the caches and the ledger; the next chunk starts at position 0."""
    self.cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._zero_cache)
    self.ledger = CacheLedger(self.sizes, self.on_full)
    self.position = 0
    if self.compressor is not None:
      self.compressor.reset()

  def pin(self) -> None:
    """Keeps everything fed so far (the system prompt) through any eviction."""
    self.ledger.pin()
    self.cache = _pin(self._params, self.cache, graphdef=self._graphdef)

  def counts(self, num_text: int, num_frames: int) -> list[int]:
    """Cache entries a chunk of ``num_text`` text slots and ``num_frames`` frames writes per layer."""
    return [num_text + num_frames * n for n in self.per_frame]

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
  ):
    """Feeds one chunk in the slot layout (explicit positions; segment id 0 = padding slot).

    Args:
      text_tokens_bt, text_positions_bt, text_segment_ids_bt: int32 ``[b, t]``.
      frames_bfhwc: uint8 ``[b, f, S, S, 3]``; frame_positions_bf, frame_segment_ids_bf: int32
        ``[b, f]`` (frame i's vision tokens sit at positions p_i .. p_i + N - 1).
      next_position: the stream position that follows this chunk.
      what: named in a :class:`CacheFull` message.

    Returns:
      dict of numpy arrays: ``text_logits`` f32 ``[b, t, V]``, ``frame_logits`` f32 ``[b, f, V]``,
      ``frame_probs`` f32 ``[b, f, V]`` (softmax at the frame ends), ``next_token`` int32 ``[b]``
      (sampled after the last text slot; meaningless when t = 0), ``overwritten`` (0).

    Raises:
      CacheFull: the chunk does not fit under the policy (nothing is written).
      RuntimeError: a write landed on a live cache entry (a bookkeeping error; never silent).
    """
    t = np.shape(text_tokens_bt)[1]
    f = np.shape(frames_bfhwc)[1]
    first = int(
      min(
        np.min(text_positions_bt, initial=2**31 - 1), np.min(frame_positions_bf, initial=2**31 - 1)
      )
    )
    window = self.ledger.reserve(self.counts(t, f), first, what)
    batch = {
      "text_tokens": jnp.asarray(text_tokens_bt, jnp.int32),
      "text_positions": jnp.asarray(text_positions_bt, jnp.int32),
      "text_segment_ids": jnp.asarray(text_segment_ids_bt, jnp.int32),
      "frames": jnp.asarray(frames_bfhwc, jnp.uint8),
      "frame_positions": jnp.asarray(frame_positions_bf, jnp.int32),
      "frame_segment_ids": jnp.asarray(frame_segment_ids_bf, jnp.int32),
    }
    if self.compressor is not None:  # training-free peer state (mod_jax/compress/apply.py)
      batch = self.compressor.prepare(batch)
    rng = jax.random.fold_in(self._rng, self._calls)
    self._calls += 1
    out, self.cache = _step(self._params, self.cache, batch, jnp.int32(window), rng, **self._static)
    out = jax.device_get(out)
    if out["overwritten"]:
      raise RuntimeError(
        f"KV cache bookkeeping error: {int(out['overwritten'])} live entries "
        f"were overwritten while feeding a {what} at position {first}."
      )
    self.position = int(next_position)
    return out

  def feed(
    self, text_ids: Sequence[int], frames_fhwc: np.ndarray | None = None, *, what: str = "chunk"
  ):
    """Feeds text tokens and then frames at the next stream positions (all streams alike).

    Args:
      text_ids: t token ids (t may be 0).
      frames_fhwc: uint8 ``[f, S, S, 3]`` or ``[b, f, S, S, 3]``; None for a text-only chunk.

    Returns:
      As :meth:`feed_layout`.
    """
    b, n, s = self.batch, self.tokens_per_frame, self.image_size
    if frames_fhwc is None:
      frames_fhwc = np.zeros((b, 0, s, s, 3), np.uint8)
    frames = np.asarray(frames_fhwc)
    if frames.ndim == 4:
      frames = np.broadcast_to(frames[None], (b, *frames.shape))
    if frames.shape[0] != b or frames.shape[2:] != (s, s, 3) or frames.dtype != np.uint8:
      raise ValueError(
        f"frames must be uint8 [f, {s}, {s}, 3] (or [{b}, f, ...]); got "
        f"{frames.dtype} {frames.shape}. Decode with mod_jax.data.video at "
        f"size={s}."
      )
    t, f, p = len(text_ids), frames.shape[1], self.position
    text = np.broadcast_to(np.asarray(text_ids, np.int32)[None], (b, t))
    tpos = np.broadcast_to(np.arange(p, p + t, dtype=np.int32)[None], (b, t))
    fpos = np.broadcast_to((p + t + n * np.arange(f, dtype=np.int32))[None], (b, f))
    return self.feed_layout(
      text,
      tpos,
      np.ones((b, t), np.int32),
      frames,
      fpos,
      np.ones((b, f), np.int32),
      next_position=p + t + n * f,
      what=what,
    )


# Module-level jits (graphdef static): sessions of one model and cache shape share compilations.
@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampler", "vocab_size"), donate_argnums=(1,)
)
def _step(params, cache, batch, window, rng, *, graphdef, sampler: Sampler, vocab_size: int):
  model = nnx.merge(graphdef, params, cache)
  model.eval()  # inference: no LoRA dropout (the rng is for sampling and random routing)
  for layer in model.llm.layers:
    layer.attn.cache.evict_before(window)
  text_logits, frame_logits, _ = model(batch, rng=rng)
  b = text_logits.shape[0]
  last = text_logits[:, -1] if text_logits.shape[1] else jnp.zeros((b, text_logits.shape[-1]))
  out = {
    "text_logits": text_logits,
    "frame_logits": frame_logits,
    "frame_probs": jax.nn.softmax(frame_logits, axis=-1),
    "next_token": sample_token(
      last, rng, temperature=sampler.temperature, top_p=sampler.top_p, vocab_size=vocab_size
    ),
    "overwritten": sum(layer.attn.cache.overwritten[...] for layer in model.llm.layers),
  }
  return out, nnx.state(model, nnx.Cache)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnums=(1,))
def _pin(params, cache, *, graphdef):
  model = nnx.merge(graphdef, params, cache)
  for layer in model.llm.layers:
    layer.attn.cache.pin()
  return nnx.state(model, nnx.Cache)


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
    max_frames: int,
    max_text: int,
    on_full: str = "slide",
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
      config: the full config (``model``; ``data.system_prompt`` and ``data.fps`` by default).
      tokenizer: the model's stream tokenizer.
      max_frames, max_text: cache capacity (:func:`cache_sizes`): frames, and text entries
        besides the system prompt (one interval token per frame, queries, responses).
      on_full: ``slide`` (evict the oldest frames, keep the system prompt) or ``stop``.
      sampler: greedy or temperature/top-p decoding. seed: its PRNG seed.
      fps, system_prompt: override the config's.
      compression: a ``mod_jax.compress.apply.Compression`` (FastV / DyCoke) or None.
      **kwargs: ``threshold``, ``max_new_tokens``.

    Raises:
      ValueError: a tokenizer with more ids than the model's vocabulary, or bad settings.
    """
    if tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(
        f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model "
        f"only {config.model.vocab_size}; it is not this model's tokenizer."
      )
    prompt = config.data.system_prompt if system_prompt is None else system_prompt
    sizes = cache_sizes(
      RoutingPlan.from_config(config.model),
      max_frames,
      max_text + len(prompt_ids(tokenizer, prompt)),
    )
    compressor = None
    if compression is not None:
      from mod_jax.compress import apply

      graphdef = apply.attach(graphdef, params, compression, config.model)
      compressor = apply.StreamCompressor(graphdef, params, compression)
    session = Session(
      graphdef,
      params,
      config.model,
      batch=1,
      sizes=sizes,
      on_full=on_full,
      sampler=sampler,
      vocab_size=tokenizer.vocab_size,
      seed=seed,
      compressor=compressor,
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

  def warmup(self) -> None:
    """Compiles the frame step, the response start and the one-token decode step, then resets.

    So the first frames of a live stream are not held up by compilation.
    """
    s = self.session.image_size
    self.session.feed([self.tok.interval_id], np.zeros((1, s, s, 3), np.uint8), what="warmup")
    self.session.feed(list(self.tok.stream_close_ids) + list(self.tok.assistant_ids), what="warmup")
    self.session.feed([self.tok.eos_id], what="warmup")
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
  def _opening(self, frame_index: int) -> tuple[list[int], list[Turn]]:
    """The text fed before frame ``frame_index`` and the user turns it inserts."""
    tok = self.tok
    entering = [q for q in self._queries if math.ceil(q[0] * self.fps - 1e-6) <= frame_index]
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

  def push_frame(self, frame_hwc: np.ndarray, *, respond: bool = True) -> list[Turn]:
    """Feeds the next frame and, if the model decides to speak, decodes its response.

    Args:
      frame_hwc: uint8 ``[S, S, 3]`` at the model's ``image_size`` (``decode_video`` output).
      respond: False feeds the frame and skips the decision (the model stays silent).

    Returns:
      The turns this frame produced: inserted user queries, then the assistant response if any.

    Raises:
      CacheFull: under ``on_full='stop'`` when the frame (or a response token) does not fit.
    """
    i = self.frames_seen
    text, turns = self._opening(i)
    # Long openings go in as their own chunk so the frame step keeps one compiled shape.
    if len(text) > 1:
      self.session.feed(text[:-1], what="query" if turns else "stream text")
    out = self.session.feed(text[-1:], np.asarray(frame_hwc)[None], what=f"frame {i}")
    self.frames_seen += 1
    self._after = "frame"
    probs = out["frame_probs"][0, -1]
    if respond and speak_decision(probs, self.tok.interval_id, self.threshold):
      turns.append(self._respond(i, float(probs[self.tok.interval_id])))
    return turns

  def _respond(self, frame_index: int, p_interval: float) -> Turn:
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
      frame_index / self.fps,
      frame_index,
      tok.decode(ids, skip_special_tokens=True).strip(),
      ids,
      p_interval,
      truncated,
    )
