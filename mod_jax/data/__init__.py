"""Data: PyAV decoding, the LIVE stream format, tokenizers, sources and the grain pipeline.

* :mod:`.video` — ``decode_video(path, fps, size)`` (fixed-fps, letterboxed), ``iter_frames``
  (the same, incremental: files, pipes, devices, URLs), ``VideoError``.
* :mod:`.tokenizer` — ``StreamTokenizer`` (stream-format ids), ``build_word_tokenizer``.
* :mod:`.stream` — ``render_stream``: annotations -> LIVE token windows with labels (docs/design.md §2).
* :mod:`.sources.folder` — a folder of videos + ``narrations.json``, validated and counted.
* :mod:`.sources.procedural` — the generated default dataset, written as such a folder.
* :mod:`.tfds` — ``ego4d_narration_stream`` and ``coin_stream`` builders, ``prepare``
  (``mod-jax prepare``), and reading a build (``data.source="tfds"``).
* :mod:`.features` / :mod:`.encode` — pre-extracted tower features per video (``mod-jax encode``).
* :mod:`.frame_cache` — the per-process LRU cache of decoded clips.
* :mod:`.packing` — first-fit packing of samples into rows of R context chunks (``pack_rows``;
  R = 1: grain's first fit), and the flow rule that also cuts streams into windows.
* :mod:`.pipeline` — ``prepare_data``, ``load_tokenizer``, ``DataIndex`` / ``load_split`` (the
  indexed splits and their counts), ``make_dataset`` (grain, packed rows), ``batch_spec``,
  ``row_chunks`` (R).
"""
