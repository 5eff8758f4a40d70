"""``mod-jax compile``: AOT compilation of the real steps for local devices and TPU topologies,
not-fitting steps reported (exit 1, no traceback), topology names, the hybrid multi-slice mesh.

The TPU cases need libtpu (``pip install 'jax[tpu]==0.10.2'``, the ``tpu`` extra) and are skipped
without it. Oracles: the analytic FLOP count (``mod_jax.analysis.flops``), the compiler's own
out-of-memory verdict, the devices' ``slice_index``.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from mod_jax.analysis import compile as aot
from mod_jax.analysis import flops
from mod_jax.config import ConfigError
from mod_jax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
  not aot.libtpu_available(), reason="libtpu not installed (pip install 'jax[tpu]==0.10.2')"
)
FIELDS = (
  "topology",
  "chips",
  "hbm_bytes",
  "peak_bytes_per_chip",
  "fits",
  "flops_per_step",
  "compile_s",
  "dense_peak_bytes_per_chip",
  "dense_fits",
  "memory_ratio",
  "flops_ratio",
  "stream_peak_bytes_per_chip",
  "stream_fits",
  "stream_compile_s",
)


def _small():
  c = tiny.get_config()
  c.model.n_layers = 2  # (dense, MoD): the interleaved pattern, half the compile time
  return c


def _check_summary(s, c, chips, fits=True, dense=True):
  assert set(
    FIELDS if dense else [f for f in FIELDS if "dense" not in f and "ratio" not in f]
  ) <= set(s), set(FIELDS) - set(s)
  assert s["chips"] == chips
  for p in ("", "dense_", "stream_") if dense else ("", "stream_"):
    peak = (
      s[f"{p}argument_bytes_per_chip"]
      + s[f"{p}output_bytes_per_chip"]
      - s[f"{p}alias_bytes_per_chip"]
      + s[f"{p}temp_bytes_per_chip"]
    )
    assert s[f"{p}peak_bytes_per_chip"] == peak > 0
    assert s[f"{p}fits"] == fits == (peak <= s["hbm_bytes"])
    assert s[f"{p}compile_s"] > 0 and s[f"{p}xla_flops_per_chip"] > 0
  # A training step's FLOPs are the model's analytic count (XLA counts a scanned body once).
  mod_a = flops.analytic_flops(c)["total"]
  assert s["flops_per_step"] == mod_a
  assert s["stream_flops_per_step"] is None
  if not dense:
    return
  den_a = flops.analytic_flops(flops.dense_counterpart(c))["total"]
  assert s["flops_ratio"] == pytest.approx(mod_a / den_a)
  assert s["memory_ratio"] == pytest.approx(
    s["peak_bytes_per_chip"] / s["dense_peak_bytes_per_chip"]
  )


@pytest.mark.slow
def test_command_compiles_for_local_devices_and_reports_not_fitting():
  """The CLI on the local CPU (one device here) with a 100 KiB "HBM": every step compiles, is
  reported as not fitting, exit status 1, no traceback, the JSON line last."""
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "mod_jax.cli",
      "compile",
      "--config",
      "configs/tiny.py",
      "--config.model.n_layers=2",
      "--hbm_gib=0.0001",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  s = json.loads(out.stdout.strip().splitlines()[-1])
  c = tiny.get_config()
  c.model.n_layers = 2
  _check_summary(s, c, 1, fits=False)
  assert s["topology"] == "local:cpu" and s["hbm_source"] == "override" and not s["all_fit"]
  assert s["hbm_bytes"] == 0.0001 * 2**30 and s["stream_cache_frames"] == c.data.max_frames
  assert "NO" in out.stdout and "MoD / dense" in out.stdout  # the table above the JSON line


@pytest.mark.slow
@needs_libtpu
def test_compiles_for_a_tpu_topology():
  """The MoD train step and the streaming step (the dense step is the local test's)."""
  c = _small()
  s = aot.run(c, "v5p:2x2x1", dense=False)
  _check_summary(s, c, 4, dense=False)
  assert s["topology"] == "v5:2x2x1" and s["chip_config"] == "megacore"
  assert s["device_kind"] == "TPU v5"
  assert s["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1, "context": 1}
  assert s["hbm_bytes"] == pytest.approx(95.74 * 2**30, rel=1e-3)  # the compiler's limit


@pytest.mark.slow
@needs_libtpu
def test_context_axis_compiles_for_a_tpu_topology():
  """Each row over 4 chips (context axis): splash runs per chip on its queries with its mask
  info split over 4 query shards, K/V all-gathered (docs/design.md §6)."""
  c = _small()
  c.mesh.shape = (1, 1, 1, 4)
  c.model.attention = "auto"  # splash on the TPU target
  s = aot.run(c, "v5e:2x2", dense=False, stream=False)
  assert s["fits"] and s["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "context": 4}


@pytest.mark.slow
@needs_libtpu
def test_step_that_does_not_fit_is_reported():
  """A 2**23-token vocabulary: the LM head and AdamW state exceed a v5e chip's 15.75 GiB; the
  compiler refuses the step and ``run`` reports it instead of raising."""
  c = _small()
  c.model.vocab_size = 2**23
  s = aot.run(c, "v5e:2x2", dense=False, stream=False)
  assert s["fits"] is False and s["all_fit"] is False and s["peak_bytes_per_chip"] is None
  assert "exceeds available HBM" in s["error"] and s["required_bytes_per_chip"] > s["hbm_bytes"]
  assert s["hbm_bytes"] == pytest.approx(15.75 * 2**30, rel=1e-3)


def test_command_rejects_unknown_topology():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "mod_jax.cli",
      "compile",
      "--config",
      "configs/tiny.py",
      "--topology",
      "v5litepod:16x16",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "v5e:16x16" in out.stderr and "v5:4x4x4" in out.stderr  # examples listed


@pytest.mark.parametrize(
  "name,libtpu_name,chips",
  [
    ("v5:4x4x4", "v5:4x4x4", 64),
    ("v5p:2x2x1", "v5:2x2x1", 4),
    ("v5p-128", "v5:4x4x4", 64),
    ("v5e:16x16", "v5e:16x16", 256),
    ("v5litepod-256", "v5e:16x16", 256),
    ("v5e-32", "v5e:4x8", 32),
    ("v4-16", "v4:2x2x2", 8),
    ("v6e:4x4", "v6e:4x4", 16),
  ],
)
def test_topology_names(name, libtpu_name, chips):
  t = aot.parse_topology(name)
  assert (t.name, t.chips) == (libtpu_name, chips)
  assert t.chip_config == ("megacore" if name.startswith(("v4", "v5p", "v5:")) else "default")


@pytest.mark.parametrize("name", ["v5litepod:16x16", "v5e:4x4x4", "v5p-6", "tpu-v5", "h100:8"])
def test_bad_topology_names(name):
  with pytest.raises(aot.TopologyError, match="e.g. v5:4x4x4"):
    aot.parse_topology(name)


@needs_libtpu
@pytest.mark.parametrize("dcn_shape,spanning_axis", [(None, 0), ((1, 2, 1), 1)])
def test_hybrid_mesh_over_two_slices(dcn_shape, spanning_axis):
  """2 slices of v5p:2x2x1: the axis named by dcn_shape (default data) crosses slices, the
  others stay inside one slice."""
  _, devices = aot.topology_devices("v5p:2x2x1", num_slices=2)
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  c = tiny.get_config()
  c.mesh.shape = (4, 2, 1)
  c.mesh.dcn_shape = dcn_shape
  mesh = sharding.make_mesh(c, devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "context": 1}
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  for axis in range(slices.ndim):
    spans = np.any(np.ptp(slices, axis=axis) > 0)  # does moving along `axis` change slice?
    assert spans == (axis == spanning_axis), (axis, slices)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@needs_libtpu
def test_hybrid_mesh_checks_dcn_shape():
  _, devices = aot.topology_devices("v5p:2x2x1", num_slices=2)
  c = tiny.get_config()
  c.mesh.dcn_shape = (4, 1, 1)
  with pytest.raises(ConfigError, match="number of slices"):
    sharding.make_mesh(c, devices)
