"""``coin_stream``: COIN procedures as LIVE streams plus the five COIN benchmarks (tfds builder).

Source: videollm-online ``data/coin/coin.py`` (annotation cleaning, train/test subsets) and
``data/coin/benchmarks.py`` (``COINStep``, ``COINNext``, ``COINTask``, ``COINProcedure``,
``COINTaskProcedure``). ``COIN.json``: ``{"database": {video_id: {"class": "MakeCoffee",
"subset": "training"|"testing", "start": s, "end": e, "annotation": [{"segment": [s, e],
"label": "pour water"}, ...]}}}``.

Splits (``train`` = subset containing "train", ``test`` = containing "test"):

* ``train`` / ``test`` — **streams**: one per video, the whole video (at most ``max_frames``
  frames, later steps are dropped and counted as ``clipped_narrations``), each step narrated as
  ``"{Label}."`` on the frame where its segment ends (``ceil(end * fps)``), no user turn: the
  COIN steps read as a narration stream of the procedure (a sample shaped like
  ``ego4d_narration_stream``'s).
* ``{step,next,task,procedure,taskprocedure}_{train,test}`` — the **benchmark samples**, exactly
  the reference's: the user's question before the first frame, frames
  ``[ceil(start * fps), ceil(end * fps)]`` (clamped to the video) of step ``i`` (task: of the
  annotated ``start`` .. ``end``), and the answer after the last frame. step: step ``i``'s label;
  next: step ``i+1``'s; task: the cleaned class; procedure: the next ``<= 5`` steps, numbered
  one per line (a single next step is asked as in *next*); taskprocedure: the same, the question
  naming the task. ``answers`` holds the category index of each expected step (or the task) in
  ``metadata.json``'s ``categories`` (``steps``: every distinct ``"{Label}."`` in COIN.json,
  sorted; ``tasks``: every distinct ``"{Task}."``), which the benchmark's Levenshtein matching
  maps predictions onto (:mod:`mod_jax.infer.coin_benchmark`).

Labels are cleaned as ``COIN._clean_step`` / ``_clean_task`` (``MakeCoffee`` -> ``make coffee``;
``t v``/``c d``/``s i m``/``n b a``/``s s d``/``r j45`` re-capitalized) and answers are
``text.capitalize() + "."``. Bad entries of COIN.json are counted by reason in
``metadata.json``'s ``annotation_stats`` (``malformed_entry``, ``bad_segment``, ``invalid_utf8``,
``no_subset``, ``dropped_videos``); bad videos are skipped and counted per split.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import tensorflow_datasets as tfds

from mod_jax.data.tfds import common
from mod_jax.data.tfds.ego4d_narration_stream import build_params

BENCHMARKS = ("step", "next", "task", "procedure", "taskprocedure")
MAX_NUM_STEPS = 5  # COINProcedure.max_num_steps

Q_STEP = "What is the action in the video? Format your answer concisely. No extra text output."
Q_NEXT = (
  "What is the next action for the video? Format your answer concisely. No extra text output."
)
Q_TASK = (
  "What is the overall activity in the video? Format your answer concisely. No extra text output."
)


def q_procedure(n: int) -> str:
  return (
    f"What is the next {n} actions for the video? Format your answer concisely, listing each "
    f"action on a new line with a number prefix. No extra text output."
  )


def q_task_single(task: str) -> str:
  return (
    f"To {task}, what is the next action for the video? Format your answer concisely. "
    f"No extra text output."
  )


def q_task_multi(task: str, n: int) -> str:
  return (
    f"To {task}, what is the next {n} actions for the video? Format your answer concisely, "
    f"listing each action on a new line with a number prefix. No extra text output."
  )


_STEP_REPLACES = {
  "process (crop, fold) paper": "crop and fold paper",
  "try to press gun head, spray residual old grease": (
    "try to press gun head to spray residual old grease"
  ),
}
_TASK_REPLACES = (
  (" t v", " TV"),
  (" c d", " CD"),
  ("s i m", "SIM"),
  ("n b a", "NBA"),
  ("s s d", "SSD"),
  ("r j45", "RJ45"),
)


def clean_step(label: str) -> str:
  """``COIN._clean_step``."""
  return _STEP_REPLACES.get(label, label)


def clean_task(name: str) -> str:
  """``COIN._clean_task``: ``PutOnHair`` -> ``put on hair`` (acronyms restored)."""
  out = "".join(" " + c.lower() if c.isupper() else c for c in name)
  for a, b in _TASK_REPLACES:
    out = out.replace(a, b)
  return out.strip()


def answer(text: str) -> str:
  """The reference's response form: ``text.capitalize() + "."``."""
  return text.capitalize() + "."


def _num(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_database(data: Any, counts: collections.Counter) -> list[dict[str, Any]]:
  """Valid videos of ``COIN.json`` in id order: ``{"video", "split", "task", "start", "end",
  "steps": [(start, end, text)]}`` (bad entries dropped and counted)."""
  db = data.get("database") if isinstance(data, dict) else None
  if not isinstance(db, dict):
    raise ValueError('COIN.json: expected {"database": {video_id: {...}}}.')
  out = []
  for vid in sorted(db):
    a = db[vid]
    if not common.is_utf8(vid):
      counts["invalid_utf8"] += 1
      continue
    if not isinstance(a, dict) or not isinstance(a.get("annotation"), list):
      counts["malformed_entry"] += 1
      continue
    subset = str(a.get("subset", "")).lower()
    split = "train" if "train" in subset else "test" if "test" in subset else None
    if split is None:
      counts["no_subset"] += 1
      continue
    if not isinstance(a.get("class"), str) or not common.is_utf8(a["class"]):
      counts["malformed_entry"] += 1
      continue
    steps = []
    ok = True
    for step in a["annotation"]:
      seg = step.get("segment") if isinstance(step, dict) else None
      label = step.get("label") if isinstance(step, dict) else None
      if not (isinstance(seg, list) and len(seg) == 2 and all(_num(x) for x in seg)):
        counts["bad_segment"] += 1
        ok = False
      elif not isinstance(label, str) or not common.is_utf8(label):
        counts["invalid_utf8" if isinstance(label, str) else "malformed_entry"] += 1
        ok = False
      elif seg[0] < 0 or seg[1] < seg[0]:
        counts["bad_segment"] += 1
        ok = False
      else:
        steps.append((float(seg[0]), float(seg[1]), clean_step(label)))
    if not ok or not steps:  # a procedure with a hole would shift every next-step answer
      counts["dropped_videos"] += 1
      continue
    start = a.get("start", steps[0][0])
    end = a.get("end", steps[-1][1])
    out.append(
      {
        "video": vid,
        "split": split,
        "task": clean_task(a["class"]),
        "start": float(start) if _num(start) else steps[0][0],
        "end": float(end) if _num(end) else steps[-1][1],
        "steps": steps,
      }
    )
  return out


def categories(videos: list[dict[str, Any]]) -> dict[str, list[str]]:
  """``{"steps": sorted distinct step answers, "tasks": sorted distinct task answers}``."""
  return {
    "steps": sorted({answer(t) for v in videos for _, _, t in v["steps"]}),
    "tasks": sorted({answer(v["task"]) for v in videos}),
  }


def video_samples(
  kind: str,
  v: dict[str, Any],
  num_frames: int | None,
  cats: dict[str, list[str]],
  *,
  fps: float,
  max_frames: int,
  counts: collections.Counter,
) -> list[common.Sample]:
  """The samples of one video for ``kind`` ("stream" or a benchmark name)."""

  def frames(s: float, e: float) -> tuple[int, int]:
    a, b = common.ceil_frame(s, fps, num_frames), common.ceil_frame(e, fps, num_frames) + 1
    if b - a > max_frames:
      counts["clipped_samples"] += 1
      b = a + max_frames
    return a, b

  steps, vid = v["steps"], v["video"]
  step_index = {t: i for i, t in enumerate(cats["steps"])}
  if kind == "stream":
    last = num_frames - 1 if num_frames is not None else None
    narr: dict[int, str] = {}
    for _, e, text in steps:
      k = common.ceil_frame(e, fps, num_frames)
      if k in narr:
        counts["replaced_narration"] += 1
      narr[k] = answer(text)
    kept = sorted((k, t) for k, t in narr.items() if k < max_frames)
    counts["clipped_narrations"] += len(narr) - len(kept)
    if not kept:
      return []
    stop = kept[-1][0] + 1 if last is None else min(last + 1, max_frames)
    return [common.Sample(f"{vid}/stream", 0, stop, kept)]
  out = []
  if kind == "task":
    a, b = frames(v["start"], v["end"])
    t = answer(v["task"])
    sample = common.Sample(
      f"{vid}/task", a, b, [(b - a - 1, t)], [(0, Q_TASK)], [cats["tasks"].index(t)]
    )
    return [sample]
  n_prompts = len(steps) if kind == "step" else len(steps) - 1
  for i in range(n_prompts):
    a, b = frames(steps[i][0], steps[i][1])
    if kind == "step":
      q, nxt = Q_STEP, [steps[i]]
    elif kind == "next":
      q, nxt = Q_NEXT, [steps[i + 1]]
    else:
      nxt = steps[i + 1 : i + 1 + MAX_NUM_STEPS]
      if kind == "procedure":
        q = Q_NEXT if len(nxt) == 1 else q_procedure(len(nxt))
      else:
        q = q_task_single(v["task"]) if len(nxt) == 1 else q_task_multi(v["task"], len(nxt))
    texts = [answer(t) for _, _, t in nxt]
    if len(texts) == 1:
      resp = texts[0]
    else:
      resp = "\n".join(f"{j + 1}. {t}" for j, t in enumerate(texts))
    out.append(
      common.Sample(
        f"{vid}/{kind}/{i}", a, b, [(b - a - 1, resp)], [(0, q)], [step_index[t] for t in texts]
      )
    )
  return out


def index_annotations(manual_dir: str) -> dict[str, Any]:
  """``{"videos": parsed videos, "categories": ..., "counts": Counter}`` from ``COIN.json``.

  Raises:
    FileNotFoundError: no ``COIN.json`` in ``manual_dir``.
  """
  path = os.path.join(manual_dir, "COIN.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found. {CoinStream.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
  counts: collections.Counter[str] = collections.Counter()
  videos = parse_database(common.load_json(path), counts)
  return {"videos": videos, "categories": categories(videos), "counts": counts}


class CoinStream(tfds.core.GeneratorBasedBuilder):
  """COIN procedure streams and benchmark samples, frames or features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [common.stream_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download COIN (https://coin-dataset.github.io): COIN.json and the videos, saved as
  <manual_dir>/COIN.json and <manual_dir>/videos/<video_id>.mp4 (any extension PyAV reads).
  With --features DIR the videos are replaced by
  `mod-jax encode --videos <manual_dir>/videos --out DIR`.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="COIN procedures as streams plus the step/next/task/procedure benchmarks.",
      features=common.example_features(self.builder_config),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
      homepage="https://coin-dataset.github.io",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    manual = os.fspath(dl_manager.manual_dir)
    self._videos_dir = os.path.join(manual, "videos")
    idx = index_annotations(manual)
    files = common.video_files(self._videos_dir, cfg.features_dir)
    cats = idx["categories"]
    self.info.metadata["params"] = build_params(cfg)
    self.info.metadata["categories"] = cats
    # COIN.json's bad entries, once for the whole file (a bad entry may have no subset).
    self.info.metadata["annotation_stats"] = dict(sorted(idx["counts"].items()))
    gens = {}
    for kind in ("stream",) + BENCHMARKS:
      for split in ("train", "test"):
        name = split if kind == "stream" else f"{kind}_{split}"
        items = [
          (files.get(v["video"], f"{v['video']}.mp4"), v)
          for v in idx["videos"]
          if v["split"] == split
        ]
        stats = common.Stats()
        scratch: collections.Counter[str] = collections.Counter()  # counted again when built
        if not any(
          video_samples(kind, v, None, cats, fps=cfg.fps, max_frames=cfg.max_frames, counts=scratch)
          for _, v in items
        ):  # tfds refuses an empty split
          self.info.metadata.setdefault("stats", {})[name] = stats.as_dict()
          continue
        gens[name] = self._generate_examples(name, kind, items, stats)
    return gens

  def _generate_examples(self, split, kind, items, stats):
    cfg = self.builder_config
    cats = self.info.metadata["categories"]

    def make(v, num_frames, st):
      return video_samples(
        kind, v, num_frames, cats, fps=cfg.fps, max_frames=cfg.max_frames, counts=st.counts
      )

    yield from common.write_samples(self, split, self._videos_dir, items, make, stats)
