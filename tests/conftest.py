"""Test setup: 8 simulated CPU devices (before JAX initialises), repo root importable."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the [tpu] extra) must not grab the host

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
