"""Config helpers: the arg parser and the named model presets."""

import pytest
import transformers

from mod_jax import presets
from mod_jax.config import base_config, parse_arg
from mod_jax.convert import gguf, hf, pretrained


def test_parse_arg_types_flags_and_errors():
  a = parse_arg("dense,llm=/ckpt/x,steps=5", source="configs/x.py", dense=False, llm="", steps=1)
  assert (a.dense, a.llm, a.steps) == (True, "/ckpt/x", 5)
  assert parse_arg("", source="x", dense=False).dense is False
  assert parse_arg("dense=false", source="x", dense=True).dense is False
  for bad, why in (("denes", "unknown key"), ("steps", "needs a value"), ("steps=a", "int")):
    with pytest.raises(ValueError, match=rf"configs/x.py: bad arg part '{bad}' .*{why}"):
      parse_arg(bad, source="configs/x.py", dense=False, steps=1)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match=r"'llama-8b'.*known: \['llama3-8b'"):
    presets.apply(base_config().model, llm="llama-8b")


@pytest.mark.real_weights
def test_smollm2_preset_matches_the_gguf_metadata():
  fields = pretrained.llm_fields(gguf.smollm2_path())
  preset = presets.LLM_PRESETS["smollm2-135m"]
  assert {k: fields[k] for k in preset} == pytest.approx(preset, rel=1e-6)  # GGUF stores f32


def test_public_presets_match_transformers_configs():
  """Llama-3-8B and SigLIP-L/16@384 as transformers builds them from the public config values."""
  llama = transformers.LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=8192,
  )  # meta-llama/Meta-Llama-3-8B-Instruct config.json
  fields = hf.llm_fields(llama.to_dict(), "Meta-Llama-3-8B-Instruct/config.json")
  preset = presets.LLM_PRESETS["llama3-8b"]
  assert {k: fields[k] for k in preset} == preset
  siglip = transformers.SiglipVisionConfig(
    image_size=384,
    patch_size=16,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    layer_norm_eps=1e-6,
  )  # google/siglip-large-patch16-384 vision_config
  fields = hf.vision_fields(siglip.to_dict(), "siglip-large-patch16-384/config.json")
  preset = presets.VISION_PRESETS["siglip-l16-384"]
  assert {k: fields[k] for k in preset} == preset
