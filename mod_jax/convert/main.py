"""``mod-jax convert``: Hugging Face / GGUF checkpoints → mod_jax, and mod_jax → Hugging Face.

  mod-jax convert --from-hf DIR [--vision DIR] [--config configs/X.py] --out OUT
  mod-jax convert --from-gguf FILE.gguf [--config configs/X.py] --out OUT
  mod-jax convert --to-hf SRC --out OUT [--vision=false]

``--from-hf`` / ``--from-gguf`` write a mod_jax checkpoint (``OUT/model_config.json``, orbax
``OUT/params/``, ``OUT/tokenizer.json``) holding the whole video LLM: the language model from the
checkpoint, the vision tower from ``--vision`` (a SigLIP directory) or freshly initialised, and a
fresh connector and routers; the rest of the model (MoD routing, vision pooling) comes from
``--config`` (default: ``mod_jax.config.base_config``). Use OUT as ``model.init_from``.

``--to-hf`` reads such a directory or a training workdir (latest checkpoint) and writes the
language model with LoRA merged as a transformers checkpoint in OUT and the vision tower as a
``SiglipVisionModel`` in ``OUT/vision_tower`` (see :mod:`mod_jax.convert.export`). The last
stdout line is a JSON summary.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from mod_jax import flags as mj_flags

FROM_HF = flags.DEFINE_string("from-hf", None, "Hugging Face LLM directory to import.")
FROM_GGUF = flags.DEFINE_string("from-gguf", None, "GGUF file to import.")
TO_HF = flags.DEFINE_string("to-hf", None, "mod_jax checkpoint dir or training workdir to export.")
VISION = flags.DEFINE_string(
  "vision",
  None,
  "SigLIP directory for the vision tower (import); 'false' skips the vision tower (export).",
)
OUT = flags.DEFINE_string("out", None, "Output directory.")
DTYPE = flags.DEFINE_string("param_dtype", None, "Parameter dtype of the import (e.g. bfloat16).")


def convert_from(
  path: str, out: str, *, vision: str | None = None, config=None, param_dtype: str | None = None
) -> dict:
  """Imports an HF directory or GGUF file into a mod_jax checkpoint at ``out``; returns a summary."""
  from flax import nnx

  from mod_jax import api
  from mod_jax.convert import pretrained

  model, tok, cfg = api.load_pretrained(path, vision=vision, config=config, param_dtype=param_dtype)
  params = nnx.state(model, nnx.Param)
  pretrained.save_native(params, cfg.model, out, tok)
  n = sum(int(v.get_value().size) for _, v in params.flat_state())
  return {"out": os.path.abspath(out), "parameters": n, "tokenizer": tok is not None}


def convert_to_hf(src: str, out: str, *, vision: bool = True) -> dict:
  """Exports a mod_jax checkpoint / training workdir ``src`` as HF checkpoints in ``out``."""
  from mod_jax import api
  from mod_jax.convert import export, pretrained

  if pretrained.kind_of(src) != "mod_jax":
    raise app.UsageError(
      f"--to-hf {src!r} is not a mod_jax checkpoint (convert output or training workdir)."
    )
  model, tok, cfg = api.load_pretrained(src)
  summary = export.export_hf(model, cfg.model, out, tokenizer=tok, vision=vision)
  return {"out": os.path.abspath(out), **summary}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  sources = [x for x in (FROM_HF.value, FROM_GGUF.value, TO_HF.value) if x]
  if len(sources) != 1 or not OUT.value:
    raise app.UsageError(
      "give exactly one of --from-hf DIR, --from-gguf FILE, --to-hf SRC, and --out DIR."
    )
  if TO_HF.value:
    out = convert_to_hf(
      TO_HF.value, OUT.value, vision=(VISION.value or "true").lower() not in ("false", "0", "no")
    )
  else:
    out = convert_from(
      sources[0],
      OUT.value,
      vision=VISION.value,
      config=mj_flags.CONFIG.value,
      param_dtype=DTYPE.value,
    )
  print(json.dumps(out))
