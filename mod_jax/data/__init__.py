"""Data: PyAV decoding, the LIVE stream format, tokenizers, sources and the grain pipeline.

* :mod:`.video` — ``decode_video(path, fps, size)`` (fixed-fps, letterboxed), ``iter_frames``
  (the same, incremental: files, pipes, devices, URLs), ``VideoError``.
* :mod:`.tokenizer` — ``StreamTokenizer`` (stream-format ids), ``build_word_tokenizer``.
* :mod:`.stream` — ``render_stream``: annotations -> LIVE token windows with labels (SPEC §2).
* :mod:`.sources.folder` — a folder of videos + ``narrations.json``, validated and counted.
* :mod:`.sources.procedural` — the generated default dataset, written as such a folder.
* :mod:`.pipeline` — ``prepare_data``, ``load_tokenizer``, ``make_dataset`` (grain, packed rows),
  ``data_stats``, ``batch_spec``.
"""
