"""Structure checks: no import cycle inside mod_jax; strict logical axis names."""

import ast
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

import configs.tiny as tiny
from mod_jax.config import DEFAULT_LOGICAL_AXIS_RULES
from mod_jax.model import partitioning
from mod_jax.model.factory import build_model
from mod_jax.train.sharding import rules_of
from tests.helpers import synthetic_batch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mod_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """mod_jax module -> the mod_jax modules it imports anywhere in its body (functions too)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # `from pkg import sub` imports the submodule when there is one.
        targets = [
          f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
          for a in node.names
        ]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def test_import_graph_is_acyclic():
  graph = import_graph()
  assert "mod_jax.model.rows" in graph["mod_jax.model.mod"]  # the walk sees imports
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        cycles.append(stack[stack.index(dep) :] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_logical_axis_name_has_a_rule_and_every_rule_is_used(monkeypatch):
  """Parameters' and activation constraints' logical names against the default rules table."""
  c = tiny.get_config()
  c.model.lora.rank = 4  # adapters carry names too
  c.model.qkv_bias = True
  rules = rules_of(c)
  seen: set[str] = set()
  strict = partitioning.logical_to_spec

  def recording(names, rules):
    seen.update(n for n in names if n is not None)
    return strict(names, rules)

  monkeypatch.setattr(partitioning, "logical_to_spec", recording)
  model = build_model(c.model, rngs=0, rules=rules)
  for _, v in nnx.state(model, nnx.Param).flat_state():
    recording(v.get_metadata()["out_sharding"], rules)
  jax.eval_shape(lambda b: model(b)[0], synthetic_batch(c, 2))  # activation constraints
  assert {"batch", "length", "embed", "heads", "kv_heads", "mlp", "vocab"} <= seen
  assert seen == {name for name, _ in DEFAULT_LOGICAL_AXIS_RULES}, "dead or missing rules"
  with pytest.raises(ValueError, match=r"\['embd'\].*Add a rule"):
    strict(("batch", "embd"), rules)


def test_next_key_draws_what_rng_stream_call_draws(monkeypatch):
  """partitioning.next_key is nnx.RngStream.__call__ without its slow counter update: the same
  keys in the same order, eagerly and inside a trace, so a model's initial weights are unchanged."""
  stream, ref = nnx.Rngs(params=3).params, nnx.Rngs(params=3).params
  for _ in range(3):
    assert jax.random.key_data(partitioning.next_key(stream)).tolist() == (
      jax.random.key_data(ref()).tolist()
    )
  assert int(stream.count[...]) == int(ref.count[...]) == 3

  c = tiny.get_config().model
  build = lambda: nnx.state(build_model(c, rngs=0), nnx.Param)
  ours = jax.jit(build)()
  monkeypatch.setattr(partitioning, "next_key", lambda s: s())
  theirs = jax.jit(build)()
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, theirs
  )
