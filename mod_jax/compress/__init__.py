"""Peers of VideoLLM-MoD on the same model (docs/design.md §4): FastV and DyCoke (training-free,
applied to any trained checkpoint) and γ-MoD's ARank. ``fastv.py``, ``dycoke.py``, ``arank.py``
hold the published definitions as pure functions; ``apply.py`` runs them inside the decoder as
configurations of the MoD machinery (``mod_jax.model.mod``: select → gather → compute → scatter).
"""
