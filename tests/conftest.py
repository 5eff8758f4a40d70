"""Test setup: 8 simulated CPU devices (before JAX initialises), repo root importable, and one
persistent XLA compilation cache per pytest session.

Most of the suite's time is XLA:CPU compiling the same tiny programs again and again: in
process, and in the ``python -m mod_jax.cli ...`` subprocesses of the end-to-end tests (train,
resume, eval, multihost workers, the notebook kernel). ``_compilation_cache`` points JAX at one
directory under the session's temporary folder (pytest's basetemp, cleaned with it; never the
user's home), caches every program (thresholds 0), and exports the same settings as environment
variables, which the subprocesses inherit (``mod_jax/train/main.py`` uses
``JAX_COMPILATION_CACHE_DIR`` when set). A cache entry is keyed by the program's HLO, the
compile options and the jax/XLA versions, so it cannot change a result; the resume-equals-
uninterrupted and sharded-equals-unsharded tests check that it does not.
"""

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the [tpu] extra) must not grab the host

import jax

jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CACHE_SETTINGS = {  # jax config name -> environment variable (read by jax at import)
  "jax_compilation_cache_dir": "JAX_COMPILATION_CACHE_DIR",
  "jax_persistent_cache_min_compile_time_secs": "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
  "jax_persistent_cache_min_entry_size_bytes": "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
}


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """One XLA compilation cache for the session: this process and the subprocesses it starts."""
  cache_dir = tmp_path_factory.mktemp("jax_compilation_cache")
  values = {
    "jax_compilation_cache_dir": str(cache_dir),
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
  }
  saved = {env: os.environ.get(env) for env in _CACHE_SETTINGS.values()}
  before = {name: getattr(jax.config, name) for name in values}
  for name, value in values.items():
    jax.config.update(name, value)
    os.environ[_CACHE_SETTINGS[name]] = str(value)
  yield values["jax_compilation_cache_dir"]
  for name, value in before.items():
    jax.config.update(name, value)
  for env, value in saved.items():
    if value is None:
      os.environ.pop(env, None)
    else:
      os.environ[env] = value
