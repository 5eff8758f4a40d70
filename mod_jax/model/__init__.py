"""Flax NNX modules of the video LLM; see video_llm.py for the assembly and mod.py for routing."""
