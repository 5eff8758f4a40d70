"""Hugging Face import/export against transformers (torch CPU): logits, SigLIP outputs, errors.

Tiny random Llama / Qwen2 / SigLIP models with awkward shapes are built from configs, saved with
``save_pretrained``, imported with ``mod_jax.from_pretrained`` and compared with transformers'
outputs on the same inputs (the reference implementation is the oracle).
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import configs.tiny as tiny_config
from mod_jax import api
from mod_jax.config import ConfigError
from mod_jax.convert import export, pretrained
from mod_jax.convert import main as convert_main
from mod_jax.convert.hf import CheckpointError

torch.set_grad_enabled(False)
IDS = np.random.default_rng(0).integers(0, 97, (2, 29))
LLAMA3 = {
  "rope_type": "llama3",
  "rope_theta": 5e5,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}


def _tiny():
  return tiny_config.get_config()


def _save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return str(path)


def _hf_logits(model_or_dir, ids=IDS, dtype=None):
  m = model_or_dir
  if isinstance(m, str):
    m = transformers.AutoModelForCausalLM.from_pretrained(m, dtype=dtype or torch.float32)
  return m.eval()(torch.tensor(ids)).logits.float().numpy()


@nnx.jit
def _call(model, ids):
  return model.text_logits(ids)


def _ours(path, **kw):
  model, _ = api.from_pretrained(path, config=_tiny(), **kw)
  return model, np.asarray(_call(model, jnp.asarray(IDS, jnp.int32)))


# Awkward shapes: GQA with 5 query heads on 1 KV head, head_dim 12 (q width 60 != d 40), an odd
# MLP width, Llama-3 rope scaling; tied/untied; the transformers 4 config dialect; shards.
LLAMA_CASES = {
  "gqa_llama3_untied": dict(
    config=dict(
      vocab_size=97,
      hidden_size=40,
      intermediate_size=71,
      num_hidden_layers=2,
      num_attention_heads=5,
      num_key_value_heads=1,
      head_dim=12,
      rope_parameters=LLAMA3,
      tie_word_embeddings=False,
      rms_norm_eps=1e-5,
    ),
    v4_dialect=False,
    shard=None,
  ),
  "tied_linear_v4_sharded": dict(
    config=dict(
      vocab_size=97,
      hidden_size=36,
      intermediate_size=50,
      num_hidden_layers=3,
      num_attention_heads=3,
      num_key_value_heads=3,
      tie_word_embeddings=True,
      rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.5},
    ),
    v4_dialect=True,
    shard="20KB",
  ),
}


def _to_v4_dialect(path):
  """Rewrites config.json the way transformers 4 wrote it (rope_theta + rope_scaling)."""
  f = os.path.join(path, "config.json")
  cfg = json.load(open(f))
  rope = dict(cfg.pop("rope_parameters"))
  cfg["rope_theta"] = rope.pop("rope_theta")
  kind = rope.pop("rope_type")
  cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
  json.dump(cfg, open(f, "w"))


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_logits_match_transformers(case, tmp_path):
  spec = LLAMA_CASES[case]
  torch.manual_seed(0)
  ref_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec["config"]))
  path = _save(
    ref_model, tmp_path / "m", **({"max_shard_size": spec["shard"]} if spec["shard"] else {})
  )
  if spec["v4_dialect"]:
    _to_v4_dialect(path)
  if spec["shard"]:
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  ref = _hf_logits(path)
  _, ours = _ours(path)
  assert ours.shape == ref.shape == (2, 29, 97)
  assert np.abs(ours - ref).max() <= 1e-4


def test_qwen2_logits_match_transformers_fp32_and_bf16(tmp_path):
  torch.manual_seed(1)
  cfg = transformers.Qwen2Config(
    vocab_size=97,
    hidden_size=42,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
  )
  ref_model = transformers.Qwen2ForCausalLM(cfg)
  for name, p in ref_model.named_parameters():  # biases are zero at init: make them matter
    if name.endswith("bias"):
      p.copy_(torch.randn_like(p))
  path = _save(ref_model, tmp_path / "q")
  _, ours = _ours(path)
  assert np.abs(ours - _hf_logits(path)).max() <= 1e-4
  # bf16 weights and compute on both sides (different rounding orders): stated tolerance 1e-2
  # for logits below 1 in magnitude (a few bf16 ulps; measured 2.4e-3).
  _, ours16 = _ours(path, dtype="bfloat16", param_dtype="bfloat16")
  ref16 = _hf_logits(path, dtype=torch.bfloat16)
  assert np.abs(ref16).max() < 1.0
  assert np.abs(ours16 - ref16).max() <= 1e-2


SIGLIP = dict(
  hidden_size=24,
  intermediate_size=40,
  num_hidden_layers=2,
  num_attention_heads=3,
  image_size=12,
  patch_size=4,
  layer_norm_eps=1e-6,
)


@pytest.mark.parametrize("which", ["SiglipVisionModel", "SiglipModel"])
def test_siglip_matches_transformers(which, tmp_path):
  torch.manual_seed(2)
  vc = transformers.SiglipVisionConfig(**SIGLIP)
  if which == "SiglipModel":  # vision tower under the 'vision_model.' prefix, text tower ignored
    full = transformers.SiglipModel(
      transformers.SiglipConfig(
        vision_config=vc.to_dict(),
        text_config=dict(
          hidden_size=16,
          intermediate_size=20,
          num_hidden_layers=1,
          num_attention_heads=2,
          vocab_size=50,
        ),
      )
    )
    ref_model = full.vision_model
  else:
    ref_model = full = transformers.SiglipVisionModel(vc)
  for name, p in ref_model.named_parameters():  # random biases/norms so every tensor matters
    if name.endswith("bias") or "norm" in name:
      p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
  path = _save(full, tmp_path / "s")
  pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, 12, 12)).astype(np.float32)
  ref = ref_model.eval()(pixel_values=torch.tensor(pixels))
  enc, tok = api.from_pretrained(path, config=_tiny())
  assert tok is None
  hidden, pooled = enc.encode(jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert np.abs(np.asarray(hidden) - ref.last_hidden_state.numpy()).max() <= 1e-4
  assert np.abs(np.asarray(pooled) - ref.pooler_output.numpy()).max() <= 1e-4


def test_export_with_lora_loads_in_transformers(tmp_path):
  """A mod_jax model with trained-looking LoRA adapters exports merged; transformers agrees."""
  from mod_jax.model import lora

  c = _tiny()
  c.model.lora.rank = 3
  c.model.lora.alpha = 5.0
  model = api.init_model(c.model)
  rng = np.random.default_rng(4)
  for _, _, _, ad in lora.adapters(model):  # B = 0 at init: give the adapters content
    ad.b.value = jnp.asarray(rng.normal(0, 0.05, ad.b.shape), jnp.float32)
  ours = np.asarray(_call(model, jnp.asarray(IDS, jnp.int32) % c.model.vocab_size))
  out = tmp_path / "hf"
  summary = export.export_hf(model, c.model, str(out), max_shard_bytes=40_000)
  assert summary["merged_lora"] == 7 * c.model.n_layers + 1  # q k v o gate up down, lm_head
  assert len(summary["llm_files"]) > 1  # sharded with an index
  ref = _hf_logits(str(out), IDS % c.model.vocab_size)
  assert np.abs(ours - ref).max() <= 1e-4
  # The vision tower as a SiglipVisionModel.
  pixels = np.random.default_rng(5).uniform(-1, 1, (1, 24, 24, 3)).astype(np.float32)
  hidden, pooled = model.vision.encode(jnp.asarray(pixels))
  sv = transformers.SiglipVisionModel.from_pretrained(str(out / "vision_tower")).eval()
  r = sv(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  assert np.abs(np.asarray(hidden) - r.last_hidden_state.numpy()).max() <= 1e-4
  assert np.abs(np.asarray(pooled) - r.pooler_output.numpy()).max() <= 1e-4


def test_convert_command_roundtrip(tmp_path):
  """HF → mod_jax checkpoint → HF gives transformers the same logits (in-process CLI code)."""
  torch.manual_seed(6)
  cfg = transformers.LlamaConfig(**LLAMA_CASES["gqa_llama3_untied"]["config"])
  path = _save(transformers.LlamaForCausalLM(cfg), tmp_path / "src")
  ref = _hf_logits(path)
  s1 = convert_main.convert_from(path, str(tmp_path / "mj"), config=_tiny())
  assert s1["parameters"] > 0
  s2 = convert_main.convert_to_hf(str(tmp_path / "mj"), str(tmp_path / "back"), vision=False)
  assert s2["vision_files"] == [] and "connector" in s2["not_exported"]
  assert np.abs(_hf_logits(str(tmp_path / "back")) - ref).max() <= 1e-5
  # The converted checkpoint initialises training: a matching config loads, a mismatch is named.
  c = _tiny()
  c.model.update(pretrained.llm_fields(path))
  c.model.init_from = str(tmp_path / "mj")
  model, _ = api.from_pretrained(path, config=_tiny())
  state = nnx.state(model, nnx.Param)
  for _, v in state.flat_state():
    v.set_value(jnp.zeros_like(v.get_value()))
  assert pretrained.init_from_pretrained(c, state)
  nnx.update(model, state)
  assert np.abs(np.asarray(_call(model, jnp.asarray(IDS, jnp.int32))) - ref).max() <= 1e-4
  c.model.d_ff = 72
  with pytest.raises(ConfigError, match=r"model.d_ff=72 but the checkpoint has 71"):
    pretrained.init_from_pretrained(c, state)


def test_init_from_loads_into_a_sharded_train_state(tmp_path):
  """Training's init_from fills an FSDP x tensor sharded state in place, shardings unchanged."""
  import jax

  from mod_jax.train import sharding

  c = _tiny()
  m = c.model
  torch.manual_seed(8)
  ref_model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=m.vocab_size,
      hidden_size=m.d_model,
      intermediate_size=m.d_ff,
      num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads,
      num_key_value_heads=m.n_kv_heads,
      head_dim=m.head_dim,
      rms_norm_eps=m.rms_norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
      tie_word_embeddings=False,
    )
  )
  m.init_from = _save(ref_model, tmp_path / "llm")
  c.mesh.shape = (1, 2, 2)
  mesh = sharding.make_mesh(c, devices=jax.devices()[:4])
  state, graphdef, _, _ = sharding.create_train_state(c, mesh)
  before = {p: v.get_value().sharding for p, v in state.params.flat_state()}
  assert pretrained.init_from_pretrained(c, state.params)
  after = {p: v.get_value().sharding for p, v in state.params.flat_state()}
  assert after == before and any(not s.is_fully_replicated for s in after.values())
  model = nnx.merge(graphdef, state.params)
  ids = IDS % m.vocab_size
  with jax.set_mesh(mesh):
    ours = np.asarray(_call(model, jnp.asarray(ids, jnp.int32)))
  assert np.abs(ours - _hf_logits(ref_model, ids)).max() <= 1e-4


# ------------------------------------------------------------------------------ malformed input
@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
  torch.manual_seed(7)
  cfg = transformers.LlamaConfig(
    vocab_size=97,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
  )
  return _save(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("small"))


def _copy_with(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  cfg = json.load(open(os.path.join(src, "config.json")))
  if edit_config:
    edit_config(cfg)
  json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
  return str(dst)


def test_missing_tensor_is_named(small_llama, tmp_path):
  bad = _copy_with(
    small_llama, tmp_path / "b", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight")
  )
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' is missing"):
    api.from_pretrained(bad, config=_tiny())


def test_wrong_shape_is_named(small_llama, tmp_path):
  def edit(t):
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros((25, 16), np.float32)

  bad = _copy_with(small_llama, tmp_path / "b", edit)
  with pytest.raises(
    CheckpointError,
    match=r"'model.layers.0.mlp.up_proj.weight' has shape "
    r"\(25, 16\) but config.json implies \(24, 16\)",
  ):
    api.from_pretrained(bad, config=_tiny())


def test_unexpected_tensor_is_reported(small_llama, tmp_path):
  def edit(t):
    t["model.layers.0.self_attn.o_proj.bias"] = np.zeros((16,), np.float32)

  bad = _copy_with(small_llama, tmp_path / "b", edit)
  with pytest.raises(CheckpointError, match=r"o_proj.bias"):
    api.from_pretrained(bad, config=_tiny())


def test_unknown_architecture_and_fields_are_named(small_llama, tmp_path):
  def arch(c):
    c["architectures"] = ["MistralForCausalLM"]

  bad = _copy_with(small_llama, tmp_path / "a", edit_config=arch)
  with pytest.raises(CheckpointError, match=r"MistralForCausalLM"):
    api.from_pretrained(bad, config=_tiny())

  def rope(c):
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}

  bad = _copy_with(small_llama, tmp_path / "r", edit_config=rope)
  with pytest.raises(CheckpointError, match=r"rope type 'yarn'"):
    api.from_pretrained(bad, config=_tiny())

  def missing(c):
    del c["intermediate_size"]

  bad = _copy_with(small_llama, tmp_path / "m", edit_config=missing)
  with pytest.raises(CheckpointError, match=r"'intermediate_size' is missing"):
    api.from_pretrained(bad, config=_tiny())


def test_pickle_checkpoints_are_refused(small_llama, tmp_path):
  """Only safetensors/GGUF are read: a pytorch_model.bin is never unpickled."""
  d = tmp_path / "p"
  d.mkdir()
  (d / "config.json").write_text(open(os.path.join(small_llama, "config.json")).read())
  (d / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")
  with pytest.raises(CheckpointError, match=r"pickle-based files are never loaded"):
    api.from_pretrained(str(d), config=_tiny())
  with pytest.raises(CheckpointError, match=r"not GGUF"):
    api.from_pretrained(str(d / "pytorch_model.bin"))
