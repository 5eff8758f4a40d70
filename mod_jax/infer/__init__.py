"""Streaming inference (LIVE) and its evaluation.

* :mod:`mod_jax.infer.streaming` — static-shape KV cache sizing and bookkeeping, the jitted
  per-chunk step (:class:`~mod_jax.infer.streaming.Session`) and the LIVE protocol
  (:class:`~mod_jax.infer.streaming.StreamEngine`: per-frame decision, decoding, user queries).
* :mod:`mod_jax.infer.metrics` — LM-PPL, TimeDiff, Fluency, LM-Correctness (videollm-online
  ``stream_evaluate``) on plain arrays.
* :mod:`mod_jax.infer.evaluate` — those metrics for a checkpoint on the held-out split.
* :mod:`mod_jax.infer.stream_main`, :mod:`mod_jax.infer.eval_main` — ``mod-jax stream`` and
  ``mod-jax eval``.
"""
