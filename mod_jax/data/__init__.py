"""Data: PyAV decoding, the LIVE stream format, tokenizers, sources and the grain pipeline."""
