"""Cloud TPU slice names -> chips, hosts, topology and the machine types that provision them.

Used by ``launch/tpu_vm.sh``, ``launch/xpk.sh`` and ``launch/vertex.py`` (one table for all).
Names as gcloud / xpk write them: ``v5p-128`` counts TensorCores (2 per v4/v5p chip),
``v5litepod-16`` / ``v6e-16`` count chips. Hosts: 4 chips per host on multi-host slices; v5e
and v6e slices of up to 8 chips are one host.

  python launch/tpu_topology.py v5p-128        # -> "hosts=16 chips=64 topology=4x4x4"

Raises ValueError for a name or size not in the tables (the message lists the sizes).
"""

from __future__ import annotations

import sys

# chips -> topology (Cloud TPU docs' standard slice shapes)
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}  # fmt: skip
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
       256: "16x16"}  # fmt: skip
# generation -> (cores per chip, topology table, Vertex machine family, Vertex accelerator enum)
_GENERATIONS = {
  "v4": (2, _3D, "ct4p-hightpu-4t", "TPU_V4_POD"),
  "v5p": (2, _3D, "ct5p-hightpu-4t", "TPU_V5P"),
  "v5litepod": (1, _2D, "ct5lp-hightpu-{n}t", "TPU_V5_LITEPOD"),
  "v6e": (1, _2D, "ct6e-standard-{n}t", "TPU_V6E"),
}


def parse(tpu_type: str) -> dict:
  """``{"tpu_type", "generation", "chips", "hosts", "topology", "machine_type",
  "accelerator_type"}`` of a slice name such as ``v5p-128`` or ``v5litepod-16``."""
  gen, _, size = tpu_type.rpartition("-")
  gen = "v5litepod" if gen == "v5e" else gen
  if gen not in _GENERATIONS or not size.isdigit():
    raise ValueError(
      f"TPU type {tpu_type!r}: expected <generation>-<size> with generation in "
      f"{sorted(_GENERATIONS)}, e.g. v5p-128 or v5litepod-16."
    )
  cores, table, machine, accel = _GENERATIONS[gen]
  chips = int(size) // cores
  if chips not in table:
    sizes = sorted(c * cores for c in table)
    raise ValueError(
      f"TPU type {tpu_type!r}: no standard {gen} slice of that size; use one of {sizes}."
    )
  single_host = chips <= (8 if cores == 1 else 4)
  per_host = chips if single_host else 4
  return {
    "tpu_type": tpu_type,
    "generation": gen,
    "chips": chips,
    "hosts": chips // per_host,
    "topology": table[chips],
    "machine_type": machine.format(n=per_host),
    "accelerator_type": accel,
  }


if __name__ == "__main__":
  try:
    t = parse(sys.argv[1])
  except (IndexError, ValueError) as e:
    sys.exit(f"tpu_topology.py: {e}")
  print(f"hosts={t['hosts']} chips={t['chips']} topology={t['topology']}")
