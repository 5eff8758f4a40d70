"""The four streaming metrics (videollm-online stream_evaluate) on hand-computed examples."""

import math

import numpy as np
import pytest

from mod_jax.infer import metrics

EOS, N = 2, 2  # <eos> id; vision tokens per frame


def _sample(events):
  """events in stream order: ("t", token, weight, ce, correct) | ("f", weight, speak)."""
  cols = {k: [] for k in ("tt", "tp", "tw", "ce", "ok", "fp", "fw", "fs")}
  pos = 0
  for e in events:
    if e[0] == "t":
      _, tok, w, ce, ok = e
      for k, v in zip(("tt", "tp", "tw", "ce", "ok"), (tok, pos, w, ce, ok)):
        cols[k].append(v)
      pos += 1
    else:
      _, w, speak = e
      for k, v in zip(("fp", "fw", "fs"), (pos, w, speak)):
        cols[k].append(v)
      pos += N
  a = lambda k, dt: np.asarray(cols[k], dt)
  return metrics.SampleStream(
    a("tt", np.int32),
    a("tp", np.int32),
    a("tw", np.float32),
    a("ce", np.float32),
    a("ok", bool),
    a("fp", np.int32),
    a("fw", np.float32),
    a("fs", bool),
  )


def _turn(speaks, ces=(0.5, 1.0, 1.5), oks=(True, False, True), close=True):
  """frames (all labelled, decisions ``speaks``) then ']\\n Assistant: w1 w2 <eos>'."""
  ev = [("t", 7, 0.0, 9.0, False)]  # interval / stream open (unlabelled)
  ev += [("f", 1.0, s) for s in speaks]
  ev += [("t", 5, 0.0, 9.0, False)]  # ]\n
  ev += [("t", 9 + i, 1.0, c, o) for i, (c, o) in enumerate(zip(ces, oks))]
  if close:
    ev += [("t", EOS, 0.0, 9.0, False)]
  return ev


def _never(*_):
  raise AssertionError("late_fn must not be called")


PROMPT = [("t", 1, 0.0, 9.0, False)]


def test_on_time_single_turn():
  r = metrics.evaluate_sample(
    _sample(PROMPT + _turn([False, False, True])), eos_id=EOS, late_fn=_never
  )
  assert r.lm_ppl == pytest.approx(math.exp(1.0))  # exp(mean(0.5, 1.0, 1.5))
  assert r.lm_correctness == pytest.approx(1 / 3)  # first error at the 2nd token
  assert r.frame_diff == 0 and r.frame_diffs == [0]
  assert r.fluency == pytest.approx((3 + 1) / (3 + 3))  # frames + leading-correct tokens


def test_early_response():
  r = metrics.evaluate_sample(
    _sample(PROMPT + _turn([True, False, True])), eos_id=EOS, late_fn=_never
  )
  assert r.frame_diffs == [2] and r.frame_diff == 2  # spoke 2 frames before the answer
  assert r.fluency == pytest.approx((3 - 2) / 6)


def test_late_response_found_in_the_next_frames():
  calls = []

  def late(frame_index, m):
    calls.append((frame_index, m))
    return [False, True, False]

  # Turn 1: 4 frames, never speaks; turn 2: 4 frames. m = min(4, 4 - 1) = 3.
  ev = PROMPT + _turn([False] * 4) + _turn([False, False, False, True])
  r = metrics.evaluate_sample(_sample(ev), eos_id=EOS, late_fn=late)
  assert calls == [(3, 3)]  # after frame 3, feed 3 more frames
  assert r.frame_diffs == [-2, 0]  # spoke at the 2nd appended frame
  assert r.frame_diff == pytest.approx((2 + 0) / 2)
  assert r.fluency == pytest.approx(((4 - 1) / 7 + (4 + 1) / 7) / 2)
  assert r.turns == 2 and r.late_queries == 1


def test_late_response_never_comes():
  ev = PROMPT + _turn([False] * 3) + _turn([True, False])  # m = min(2, 3 - 1) = 2
  r = metrics.evaluate_sample(_sample(ev), eos_id=EOS, late_fn=lambda i, m: [False] * m)
  assert r.frame_diffs[0] == -2
  # Turn 2 spoke at its first of 2 frames: early by 1.
  assert r.frame_diffs[1] == 1 and r.frame_diff == pytest.approx(1.5)


def test_late_in_last_turn_counts_as_on_time():
  r = metrics.evaluate_sample(_sample(PROMPT + _turn([False, False])), eos_id=EOS, late_fn=_never)
  assert r.frame_diffs == [0]
  assert r.fluency == pytest.approx((2 + 1) / (2 + 3))


def test_late_with_a_single_frame_turn_appends_nothing():
  ev = PROMPT + _turn([False]) + _turn([True])  # m = min(1, 1 - 1) = 0
  r = metrics.evaluate_sample(_sample(ev), eos_id=EOS, late_fn=_never)
  assert r.frame_diffs == [0, 0]


def test_several_turns_are_averaged_and_trailing_frames_ignored():
  ev = (
    PROMPT
    + _turn([False, True], ces=(0.0, 0.0, 0.0), oks=(True, True, True))
    + _turn([True, False, False], ces=(2.0, 2.0, 2.0), oks=(False, True, True))
    + [("t", 7, 0.0, 9.0, False), ("f", 1.0, True), ("f", 1.0, False)]
  )  # no <eos> after
  r = metrics.evaluate_sample(_sample(ev), eos_id=EOS, late_fn=_never)
  assert r.turns == 2
  assert r.lm_ppl == pytest.approx((1.0 + math.exp(2.0)) / 2)
  assert r.lm_correctness == pytest.approx((1.0 + 0.0) / 2)
  assert r.frame_diffs == [0, 2]
  assert r.fluency == pytest.approx(((2 + 3) / 5 + (3 - 2) / 6) / 2)


def test_unlabelled_frames_are_not_stream_targets():
  ev = PROMPT + [("t", 7, 0.0, 9.0, False), ("f", 0.0, True)] + _turn([False, True])[1:]
  r = metrics.evaluate_sample(_sample(ev), eos_id=EOS, late_fn=_never)
  assert r.frame_diffs == [0]  # the unlabelled early "speak" is not counted


def test_sample_without_turns_gets_reference_defaults():
  ev = PROMPT + [("t", 7, 0.0, 9.0, False), ("f", 1.0, True)]
  r = metrics.evaluate_sample(_sample(ev), eos_id=EOS, late_fn=_never)
  assert (r.lm_ppl, r.frame_diff, r.fluency, r.lm_correctness, r.turns) == (1.0, 0.0, 1.0, 1.0, 0)


def test_threshold_option_of_the_decision():
  interval = 3
  probs = np.array(
    [
      [0.0, 0.3, 0.0, 0.7],  # argmax interval, P = 0.7
      [0.0, 0.35, 0.25, 0.4],  # argmax interval, P = 0.4
      [0.0, 0.5, 0.2, 0.3],  # argmax another token
      [0.0, 0.2, 0.0, 0.8],
    ]
  )
  np.testing.assert_array_equal(
    metrics.speak_decision(probs, interval, 0.0), [False, False, True, False]
  )
  np.testing.assert_array_equal(
    metrics.speak_decision(probs, interval, 0.725), [True, True, True, False]
  )
  np.testing.assert_array_equal(
    metrics.speak_decision(probs, interval, 0.5), [False, True, True, False]
  )
  with pytest.raises(ValueError, match="threshold=1.5"):
    metrics.speak_decision(probs, interval, 1.5)


def test_aggregate_means_over_samples_and_frames_to_seconds():
  a = metrics.SampleResult(2.0, 1.0, 0.5, 1.0, 1, [1], 0)
  b = metrics.SampleResult(4.0, 3.0, 1.0, 0.0, 2, [-3, 3], 1)
  c = metrics.SampleResult(1.0, 0.0, 1.0, 1.0, 0, [], 0)
  out = metrics.aggregate([a, b, c], fps=2.0)
  assert out["lm_ppl"] == pytest.approx(7 / 3)
  assert out["time_diff"] == pytest.approx((4 / 3) / 2.0)  # mean frame_diff / fps
  assert out["fluency"] == pytest.approx(2.5 / 3)
  assert out["lm_correctness"] == pytest.approx(2 / 3)
  assert (out["samples"], out["turns"], out["samples_without_turns"]) == (3, 3, 1)


def test_a_rendered_stream_counts_the_references_labels_per_turn(tmp_path):
  """LM tokens per turn are videollm-online's labels: ]\\n -> Assistant: .. last word -> <eos>.

  Stream (N = 2; query at 0.3 s before frame 1, responses after frames 1 and 2), positions:
  <bos>0 go1 \\n2 [3 <v>4-5 ]\\n6 User:7 what8 is9 it10 \\n11 [12 <v>13-14 ]\\n15 Assistant:16 a17
  red18 circle19 <eos>20 \\n21 [22 <v>23-24 ]\\n25 Assistant:26 it27 is28 red29 <eos>30.
  Turn 1 = [0, 21): LM slots 15..19 (5; the query's ]\\n at 6 is not one), frames 0, 1.
  Turn 2 = [21, 31): LM slots 25..29 (5), frame 2.
  """
  from mod_jax.data import stream
  from mod_jax.data.tokenizer import build_word_tokenizer

  tok = build_word_tokenizer(
    ["go", "a", "red", "circle", "what", "is", "it"], tmp_path / "tokenizer.json"
  )
  (w,), _ = stream.render_stream(
    tok,
    num_frames=3,
    narrations=[(0.5, "a red circle"), (1.0, "it is red")],
    queries=[(0.3, "what is it")],
    fps=2.0,
    system_prompt="go",
    tokens_per_frame=N,
    max_frames=8,
    max_text=64,
  )
  np.testing.assert_array_equal(w.frame_positions, [4, 13, 23])
  pos = w.text_positions
  sample = metrics.SampleStream(
    text_tokens=w.text_tokens,
    text_positions=pos,
    text_weights=w.text_weights,
    text_ce=pos / 10.0,
    text_correct=pos != 17,
    frame_positions=w.frame_positions,
    frame_weights=w.frame_weights,
    frame_speak=np.array([False, True, True]),
  )
  r = metrics.evaluate_sample(sample, eos_id=tok.eos_id, late_fn=_never)
  assert r.frame_diffs == [0, 0] and r.turns == 2
  # Mean CE 1.5..1.9 in turn 1, 2.5..2.9 in turn 2.
  assert r.lm_ppl == pytest.approx((math.exp(1.7) + math.exp(2.7)) / 2)
  assert r.lm_correctness == pytest.approx((2 / 5 + 5 / 5) / 2)  # slot 17 is wrong
  assert r.fluency == pytest.approx(((2 + 2) / (2 + 5) + (1 + 5) / (1 + 5)) / 2)
