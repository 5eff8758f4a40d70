"""Attention dispatcher: every kernel path against the XLA reference, in values and gradients.

The XLA path itself is checked against a per-query numpy loop (the mask written out literally).
Only queries with a non-zero segment id are compared (padding outputs are unspecified); gradients
are taken of ``sum(out · cotangent · valid)``. Splash runs in Pallas interpret mode off TPU, so its
shapes are the smallest that still give two 128-token blocks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mod_jax.config import DEFAULT_LOGICAL_AXIS_RULES
from mod_jax.model import attention_ops
from mod_jax.model.attention_ops import attend

jax.config.update("jax_enable_x64", False)


def _segments(t: int, lengths_per_row) -> np.ndarray:
  """Packed rows in stream order: segments 1, 2, ... of the given lengths, then padding (0)."""
  rows = []
  for lengths in lengths_per_row:
    row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(t)])
    rows.append(row[:t])
  return np.asarray(rows, np.int32)


def _inputs(b, t, s, n, kh, h, *, segments, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, n, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, s, kh, h)), dtype)
  ct = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  q_seg = kv_seg = None
  if segments is not None:
    q_seg, kv_seg = jnp.asarray(segments[0]), jnp.asarray(segments[1])
  return q, k, v, q_seg, kv_seg, ct


@functools.cache
def _value_and_grad(implementation, causal, block_size, **kw):
  def loss(q, k, v, q_seg, kv_seg, ct):
    out = attend(
      q,
      k,
      v,
      q_seg,
      kv_seg,
      causal=causal,
      implementation=implementation,
      block_size=block_size,
      **kw,
    )
    valid = 1.0 if q_seg is None else (q_seg != 0)[:, :, None, None]
    return jnp.sum(out.astype(jnp.float32) * ct * valid), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _compare(implementation, case, *, block_size, atol=1e-5, **kw):
  q, k, v, q_seg, kv_seg, ct, causal = case
  (_, ref), ref_grads = _value_and_grad("xla", causal, 512)(q, k, v, q_seg, kv_seg, ct)
  (_, out), grads = _value_and_grad(implementation, causal, block_size, **kw)(
    q, k, v, q_seg, kv_seg, ct
  )
  assert out.shape == q.shape and out.dtype == q.dtype
  assert bool(jnp.all(jnp.isfinite(out))), "padding outputs must be finite too"
  valid = np.ones(q.shape[:2], bool) if q_seg is None else np.asarray(q_seg) != 0
  np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=atol, rtol=0)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=atol, rtol=0, err_msg=f"d{name}")


# (b, t, s, n, kh, h, segment lengths per row or None, causal)
CASES = {
  "packed_gqa_causal": (2, 37, 37, 4, 2, 8, [[10, 15, 7], [30]], True),
  "packed_mha_causal": (2, 37, 37, 2, 2, 8, [[5, 20, 9], [37]], True),
  "packed_mqa_causal": (1, 40, 40, 4, 1, 8, [[12, 12, 12]], True),
  "vision_noncausal": (2, 37, 37, 4, 4, 8, None, False),
  "cross_noncausal_gqa": (2, 21, 37, 4, 2, 8, ([[8, 10], [21]], [[15, 18], [30]]), False),
}


def _case(name):
  b, t, s, n, kh, h, lengths, causal = CASES[name]
  segments = None
  if lengths is not None:
    q_len, kv_len = lengths if isinstance(lengths, tuple) else (lengths, lengths)
    segments = (_segments(t, q_len), _segments(s, kv_len))
  return (*_inputs(b, t, s, n, kh, h, segments=segments), causal)


def test_xla_reference_matches_a_per_query_loop():
  q, k, v, q_seg, kv_seg, _, causal = _case("packed_gqa_causal")
  out = np.asarray(attend(q, k, v, q_seg, kv_seg, causal=causal, implementation="xla"))
  q, k, v, q_seg = map(np.asarray, (q, k, v, q_seg))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  for r in range(b):
    for i in range(t):
      if q_seg[r, i] == 0:
        continue
      keys = [j for j in range(t) if j <= i and q_seg[r, j] == q_seg[r, i]]
      for head in range(n):
        logits = k[r, keys, head // g] @ q[r, i, head] / np.sqrt(h)
        p = np.exp(logits - logits.max())
        want = (p / p.sum()) @ v[r, keys, head // g]
        np.testing.assert_allclose(out[r, i, head], want, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_xla(name):
  # block 16 < length: several query/key blocks, a padded last block, causal skipping.
  _compare("blockwise", _case(name), block_size=16)


def test_blockwise_single_block_matches_xla():
  _compare("blockwise", _case("packed_gqa_causal"), block_size=512)


def test_blockwise_bf16_roughly_matches_float32_reference():
  q, k, v, q_seg, kv_seg, ct, causal = _case("packed_gqa_causal")
  bf = lambda x: x.astype(jnp.bfloat16)
  (_, ref), ref_grads = _value_and_grad("xla", causal, 512)(q, k, v, q_seg, kv_seg, ct)
  (_, out), grads = _value_and_grad("blockwise", causal, 16)(bf(q), bf(k), bf(v), q_seg, kv_seg, ct)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16
  valid = np.asarray(q_seg) != 0
  np.testing.assert_allclose(np.asarray(out, np.float32)[valid], np.asarray(ref)[valid], atol=3e-2)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=8e-2)


def test_blockwise_skips_key_blocks_above_the_diagonal():
  # NaN values in the second key block: queries of the first block never read it (0 · NaN would
  # poison them if the block were visited and masked instead of skipped).
  q, k, v, _, _, _, _ = _case("vision_noncausal")
  q, k, v = q[:, :32], k[:, :32], v[:, :32]
  poisoned = v.at[:, 16:].set(jnp.nan)
  out = attend(q, k, poisoned, causal=True, implementation="blockwise", block_size=16)
  ref = attend(q, k, v, causal=True, implementation="xla")
  np.testing.assert_allclose(np.asarray(out[:, :16]), np.asarray(ref[:, :16]), atol=1e-5)


def test_padding_tokens_do_not_affect_real_queries():
  q, k, v, q_seg, kv_seg, _, causal = _case("packed_gqa_causal")
  pad = (np.asarray(q_seg) == 0)[:, :, None, None]
  noisy = lambda x: jnp.where(pad, 1e3, x)
  valid = ~pad[:, :, 0, 0]
  for impl in ("xla", "blockwise"):
    f = lambda *a, impl=impl: attend(
      *a, q_seg, kv_seg, causal=causal, implementation=impl, block_size=16
    )
    clean, dirty = f(q, k, v), f(noisy(q), noisy(k), noisy(v))
    assert bool(jnp.all(jnp.isfinite(dirty)))
    np.testing.assert_allclose(np.asarray(dirty)[valid], np.asarray(clean)[valid], atol=1e-6)


def test_blockwise_in_a_rematted_layer_scan():
  """The decoder's use: jit(grad(scan(checkpoint(layer)))), compared with the XLA path."""
  q, k, v, q_seg, kv_seg, _, _ = _case("packed_gqa_causal")
  w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 8)) * 0.3, jnp.float32)

  def loss(w, implementation):
    def layer(x, w_nh):
      out = attend(
        x, k, v, q_seg, kv_seg, causal=True, implementation=implementation, block_size=16
      )
      return x + out * w_nh, None

    x, _ = jax.lax.scan(jax.checkpoint(layer), q, w)
    return jnp.sum(jnp.where((q_seg != 0)[:, :, None, None], jnp.tanh(x), 0.0))

  grad = lambda impl: jax.jit(jax.value_and_grad(loss), static_argnums=1)(w, impl)
  (ref, ref_g), (val, g) = grad("xla"), grad("blockwise")
  np.testing.assert_allclose(float(val), float(ref), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), atol=1e-4)


# Splash (Pallas, interpret mode off TPU): blocks are multiples of 128, so t = 200 pads to 256 and
# block_size 128 gives two blocks per axis.
SPLASH_CASES = {
  "packed_gqa_causal": (2, 200, 200, 4, 2, 8, [[60, 70, 40], [180]], True),
  "vision_noncausal": (1, 200, 200, 2, 2, 8, None, False),
}


@pytest.mark.parametrize("name", list(SPLASH_CASES))
def test_splash_matches_xla(name, monkeypatch):
  monkeypatch.setitem(CASES, name, SPLASH_CASES[name])
  _compare("splash", _case(name), block_size=128)


def test_splash_under_a_mesh_runs_per_shard():
  """Batch over data, heads over tensor (tensor=2) or replicated (tensor=4 does not divide k=2)."""
  b, t, s, n, kh, h, lengths, causal = SPLASH_CASES["packed_gqa_causal"]
  segs = _segments(t, lengths)
  case = (*_inputs(b, t, s, n, kh, h, segments=(segs, segs)), causal)
  for shape in ((2, 1, 2), (2, 1, 4)):
    mesh = Mesh(
      np.asarray(jax.devices()[: np.prod(shape)]).reshape(shape),
      ("data", "fsdp", "tensor"),
      axis_types=(AxisType.Auto,) * 3,
    )
    _value_and_grad.cache_clear()  # a fresh trace under each mesh
    with jax.set_mesh(mesh):
      _compare("splash", case, block_size=128, rules=DEFAULT_LOGICAL_AXIS_RULES)


def test_splash_compiles_ahead_of_time_for_a_tpu_topology(monkeypatch):
  """Forward + backward lower to Mosaic kernels and compile for a v5e 2x2 slice from this host."""
  if jax.default_backend() == "tpu":
    pytest.skip("on a TPU host the kernel runs for real in test_splash_matches_xla")
  from jax.experimental import topologies

  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # CPU-only host: no chip to share
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # noqa: BLE001 (no libtpu, lock held, ...)
    pytest.skip(f"no TPU topology on this host: {e}")
  mesh = Mesh(
    np.asarray(topology.devices).reshape(2, 1, 2),
    ("data", "fsdp", "tensor"),
    axis_types=(AxisType.Auto,) * 3,
  )
  b, t, n, kh, h = 2, 300, 4, 2, 128

  def step(q, k, v, seg, ct):
    f = lambda q, k, v: attend(
      q,
      k,
      v,
      seg,
      seg,
      causal=True,
      implementation="auto",
      backend="tpu",
      rules=DEFAULT_LOGICAL_AXIS_RULES,
    )
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)

  heads = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))
  sds = lambda shape, dtype, sharding=heads: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  args = (
    sds((b, t, n, h), jnp.bfloat16),
    sds((b, t, kh, h), jnp.bfloat16),
    sds((b, t, kh, h), jnp.bfloat16),
    sds((b, t), jnp.int32, NamedSharding(mesh, PartitionSpec("data"))),
    sds((b, t, n, h), jnp.bfloat16),
  )
  with jax.set_mesh(mesh):
    lowered = jax.jit(step).lower(*args)
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dq, dkv kernels
    compiled = lowered.compile()
  assert "all-gather" not in compiled.as_text()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn needs an NVIDIA GPU")
def test_cudnn_matches_xla():
  segs = _segments(64, [[20, 30, 6]])
  case = (*_inputs(1, 64, 64, 4, 2, 64, segments=(segs, segs), dtype=jnp.bfloat16), True)
  _compare("cudnn", case, block_size=512, atol=5e-2)


def test_cudnn_off_gpu_is_a_clear_error():
  q, k, v, *_ = _case("vision_noncausal")
  with pytest.raises(ValueError, match="needs an NVIDIA GPU.*blockwise"):
    attend(q, k, v, causal=False, implementation="cudnn", backend="cpu")


def test_resolve_implementation():
  assert attention_ops.resolve_implementation("auto", "tpu") == "splash"
  assert attention_ops.resolve_implementation("auto", "gpu") == "cudnn"
  assert attention_ops.resolve_implementation("auto", "cpu") == "blockwise"
  assert attention_ops.resolve_implementation("blockwise") == "blockwise"
  with pytest.raises(ValueError, match="'flash'.*'xla', 'blockwise', 'splash', 'cudnn'"):
    attention_ops.resolve_implementation("flash")


def test_bad_arguments_are_clear_errors():
  q, k, v, q_seg, kv_seg, _, _ = _case("cross_noncausal_gqa")
  with pytest.raises(ValueError, match="t == s.*t=21, s=37"):
    attend(q, k, v, q_seg, kv_seg, causal=True)
  with pytest.raises(ValueError, match="both"):
    attend(q, k, v, q_seg, None, causal=False)
  with pytest.raises(ValueError, match="multiple of KV heads"):
    attend(q[:, :, :3], k, v, causal=False)
  with pytest.raises(ValueError, match="not known"):
    attend(q, k, v, causal=False, implementation="flash")
