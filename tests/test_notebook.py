"""notebooks/quickstart.ipynb is stored without outputs and runs top to bottom (nbclient)."""

import os
import time

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def test_notebook_is_stored_without_outputs():
  import nbformat

  nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch):
  import nbformat
  from nbclient import NotebookClient

  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(os.path.join(NOTEBOOKS, "quickstart.ipynb"), as_version=4)
  t0 = time.time()
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}
  ).execute()
  elapsed = time.time() - t0
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert "equal to the trained parameters: True" in text, text[-2000:]
  assert "'layer_1': (8, 2)" in text and "'layer_3': (8, 2)" in text, text[-2000:]
  assert len(images) == 2  # the loss curve and the kept patches
  assert "decoder_vision" in text  # the flops table
  print(f"\nnotebook executed in {elapsed:.0f} s")
