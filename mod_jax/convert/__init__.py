"""Checkpoint conversion: Hugging Face safetensors and GGUF in, Hugging Face safetensors out.

* :mod:`.hf` — config.json ↔ ``config.model`` fields; tensor tables (HF name, shape, layout
  transform) for Llama / Qwen2 decoders and SigLIP vision towers; tensor-by-tensor safetensors
  reader and sharded writer; ``CheckpointError``.
* :mod:`.gguf` — ``GGUFSource``: a GGUF file under HF names (dequantized, q/k un-permuted), its
  config and tokenizer; ``smollm2_path()``.
* :mod:`.pretrained` — checkpoint kinds, loading into a model state in place (shardings kept),
  the mod_jax checkpoint format (orbax), ``init_from_pretrained`` for training.
* :mod:`.export` — ``export_hf``: a model (LoRA merged) as transformers / SigLIP checkpoints.
* :mod:`.main` — the ``mod-jax convert`` command.

The notebook entry point is ``mod_jax.from_pretrained`` (:mod:`mod_jax.api`).
"""
