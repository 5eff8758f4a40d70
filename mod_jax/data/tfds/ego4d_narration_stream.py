"""``ego4d_narration_stream``: Ego4D v2 narrations as LIVE narration streams (tfds builder).

Source: videollm-online ``data/ego4d/narration.py`` (``Ego4DNarrationStream``), ``data/stream.py``
(``max_frames_clip``), ``data/utils.py::ceil_time_by_fps``. What is kept, per video and
annotator pass (``narration_pass_1`` / ``narration_pass_2``: one stream each):

1. **Cleaning** (``_clean_text``): ``#C``, ``#c``, ``@c``, ``#O``, ``#o``, ``#Unsure``,
   ``#unsure`` and then every ``#`` are removed; leading/trailing ``.``, ``,``, newlines and
   spaces stripped and one ``.`` appended; inner whitespace collapsed; first word capitalized.
   ``"#C C picks up a cup"`` -> ``"C picks up a cup."``.
2. **>= 2 words** after cleaning (``"#C C"`` -> ``"C."`` is dropped: ``short_narration``).
3. Sorted by time; times **ceiled to the frame grid** (``ceil(t * fps)``, clamped to the video's
   last frame); a narration repeating the previous kept text is dropped (``duplicate_text``); one
   landing on the same frame as the previous one replaces it (``replaced_narration``); once the
   stream has reached the last frame the rest are dropped (``beyond_video``).
4. The sample covers frames ``[first narration's frame, last kept narration's frame]``, at most
   ``max_frames`` (1200) frames: narrations whose frame would exceed that are dropped with the
   rest of the stream (``clipped_narrations``), as ``max_frames_clip`` does.

Bad entries are counted by reason, never fatal: ``invalid_utf8`` (text that is not valid UTF-8),
``bad_time`` (timestamp missing, not a number or negative), ``non_string_text``,
``malformed_entry``. Splits (``Ego4DNarrationStream.get_annos``): ``val`` = videos of the Ego4D
benchmarks' ``*_val.json`` annotations, ``test`` = of their ``*_test_unannotated.json`` minus val,
``train`` = the rest; benchmark files that are absent are listed in the statistics
(``missing_split_files``) and, with none present, every video is ``train``.

Differences from the reference, on purpose: the reference's user instruction after the first
frame is our config's system prompt (``data.system_prompt``), and its first frame's decision is
not learned while ours is (the narration there is a response like the others).
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import tensorflow_datasets as tfds

from mod_jax.data.tfds import common

PASSES = ("narration_pass_1", "narration_pass_2")
# videollm-online Ego4DNarrationStream.benchmarks_with_keys: benchmark -> list key in its json.
BENCHMARK_KEYS = {
  "goalstep": "videos",
  "fho_lta": "clips",
  "nlq": "videos",
  "moments": "videos",
  "av": "videos",
  "fho_oscc-pnr": "clips",
  "fho_sta": "annotations",
  "vq": "videos",
}

_TAGS = ("#C", "#c", "@c", "#O", "#o", "#Unsure", "#unsure")


def clean_text(text: str) -> str:
  """videollm-online ``Ego4DNarrationStream._clean_text`` (module docstring, rule 1)."""
  for tag in _TAGS:
    text = text.replace(tag, "")
  text = text.replace("#", "").strip(".,\n ") + "."
  words = text.split()
  words[0] = words[0].capitalize()
  return " ".join(words)


def pass_narrations(items: Any, counts: collections.Counter) -> list[tuple[float, str]]:
  """One annotator pass's kept narrations ``(seconds, cleaned text)``, sorted by time (rules 1-2;
  drops counted in ``counts``)."""
  if not isinstance(items, list):
    counts["malformed_entry"] += 1
    return []
  out = []
  for item in items:
    if not isinstance(item, dict):
      counts["malformed_entry"] += 1
      continue
    t, text = item.get("timestamp_sec"), item.get("narration_text")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
      counts["bad_time"] += 1
    elif not isinstance(text, str):
      counts["non_string_text"] += 1
    elif not common.is_utf8(text):
      counts["invalid_utf8"] += 1
    else:
      text = clean_text(text)
      if len(text.split(" ")) >= 2:
        out.append((float(t), text))
      else:
        counts["short_narration"] += 1
  return sorted(out, key=lambda x: x[0])


def video_streams(entry: Any, counts: collections.Counter) -> dict[str, list[tuple[float, str]]]:
  """``{pass name: narrations}`` of one ``narration.json`` entry (passes with none omitted)."""
  if not isinstance(entry, dict):
    counts["malformed_entry"] += 1
    return {}
  out = {}
  for p in PASSES:
    if p not in entry:
      continue
    body = entry[p]
    items = body.get("narrations") if isinstance(body, dict) else None
    narrations = pass_narrations(items, counts)
    if narrations:
      out[p] = narrations
  return out


def stream_samples(
  video: str,
  streams: dict[str, list[tuple[float, str]]],
  num_frames: int | None,
  *,
  fps: float,
  max_frames: int,
  counts: collections.Counter,
) -> list[common.Sample]:
  """The samples of one video (rules 3-4). ``num_frames`` None: count samples only (no clamp)."""
  out = []
  last_frame = (num_frames - 1) if num_frames is not None else None
  for name, narrations in streams.items():
    conv: list[list[Any]] = []  # [frame, text]
    start = common.ceil_frame(narrations[0][0], fps, num_frames)
    last, last_text = start - 1, None
    for i, (t, text) in enumerate(narrations):
      if last_frame is not None and last >= last_frame:
        counts["beyond_video"] += len(narrations) - i
        break
      if text == last_text:
        counts["duplicate_text"] += 1
        continue
      k = common.ceil_frame(t, fps, num_frames)
      if k == last:
        conv[-1][1] = text
        counts["replaced_narration"] += 1
      else:
        conv.append([k, text])
      last, last_text = k, text
    kept = [c for c in conv if c[0] - start + 1 <= max_frames]
    counts["clipped_narrations"] += len(conv) - len(kept)
    if not kept:
      continue
    stop = kept[-1][0] + 1
    out.append(
      common.Sample(
        id=f"{video}/{name}",
        frame_start=start,
        frame_stop=stop,
        narrations=[(k - start, x) for k, x in kept],
      )
    )
  return out


def read_splits(annotations_dir: str) -> tuple[dict[str, set[str]], list[str]]:
  """``({"val": uids, "test": uids}, missing files)`` from the benchmark annotation files."""
  val: set[str] = set()
  test: set[str] = set()
  missing = []
  for bench, key in BENCHMARK_KEYS.items():
    for suffix, into in (("val", val), ("test_unannotated", test)):
      path = os.path.join(annotations_dir, f"{bench}_{suffix}.json")
      if not os.path.isfile(path):
        missing.append(os.path.basename(path))
        continue
      data = common.load_json(path)
      for item in data.get(key, []) if isinstance(data, dict) else []:
        if isinstance(item, dict) and isinstance(item.get("video_uid"), str):
          into.add(item["video_uid"])
  return {"val": val, "test": test - val}, missing


def index_annotations(
  manual_dir: str, *, fps: float = 2.0, max_frames: int = 1200
) -> dict[str, Any]:
  """Everything a build needs from the annotations alone (no video is opened).

  Returns:
    ``{"splits": {split: [(video_uid, streams)]}, "counts": {split: Counter}, "missing":
    [benchmark files not found]}``; streams as :func:`video_streams`.

  Raises:
    FileNotFoundError: no ``annotations/narration.json`` in ``manual_dir``.
  """
  ann_dir = os.path.join(manual_dir, "annotations")
  path = os.path.join(ann_dir, "narration.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} not found. {Ego4dNarrationStream.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}"
    )
  data = common.load_json(path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected an object mapping video uids to entries.")
  held_out, missing = read_splits(ann_dir)
  splits: dict[str, list[tuple[str, Any]]] = {"train": [], "val": [], "test": []}
  counts = {s: collections.Counter() for s in splits}
  for uid in sorted(data):
    split = next((s for s in ("val", "test") if uid in held_out[s]), "train")
    c = counts[split]
    if not common.is_utf8(uid):
      c["invalid_utf8"] += 1
      continue
    streams = video_streams(data[uid], c)
    if not streams:
      c["videos_without_narrations"] += 1
      continue
    splits[split].append((uid, streams))
  return {"splits": splits, "counts": counts, "missing": missing}


class Ego4dNarrationStream(tfds.core.GeneratorBasedBuilder):
  """Ego4D v2 narration streams (one per video and annotator pass), frames or features."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [common.stream_config()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Ego4D v2 (license required: https://ego4d-data.org) with the Ego4D CLI:
    ego4d --output_directory ego4d_data --datasets full_scale annotations --version v2
  and pass --manual_dir ego4d_data/v2, which holds annotations/narration.json (plus the
  benchmark *_val.json / *_test_unannotated.json files that define the val/test splits) and
  full_scale/<video_uid>.mp4. With --features DIR the videos are replaced by
  `mod-jax encode --videos ego4d_data/v2/full_scale --out DIR`.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Ego4D narration streams for streaming video LLMs (VideoLLM-online).",
      features=common.example_features(self.builder_config),
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
      homepage="https://ego4d-data.org",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    manual = os.fspath(dl_manager.manual_dir)
    self._videos_dir = os.path.join(manual, "full_scale")
    idx = index_annotations(manual, fps=cfg.fps, max_frames=cfg.max_frames)
    self.info.metadata["params"] = build_params(cfg)
    gens = {}
    for split, videos in idx["splits"].items():
      stats = common.Stats()
      stats.counts.update(idx["counts"][split])
      if split == "train":
        stats.counts["missing_split_files"] = len(idx["missing"])
      if not videos:
        self.info.metadata.setdefault("stats", {})[split] = stats.as_dict()
        continue
      files = common.video_files(self._videos_dir, cfg.features_dir)
      items = [(files.get(uid, f"{uid}.mp4"), (uid, s)) for uid, s in videos]
      gens[split] = self._generate_examples(split, items, stats)
    return gens

  def _generate_examples(self, split, items, stats):
    cfg = self.builder_config

    def make(payload, num_frames, st):
      uid, streams = payload
      return stream_samples(
        uid, streams, num_frames, fps=cfg.fps, max_frames=cfg.max_frames, counts=st.counts
      )

    yield from common.write_samples(self, split, self._videos_dir, items, make, stats)


def build_params(cfg: common.StreamConfig) -> dict[str, Any]:
  """The build parameters stored in ``metadata.json`` (checked when training reads it)."""
  out: dict[str, Any] = {
    "fps": cfg.fps,
    "max_frames": cfg.max_frames,
    "input": "features" if cfg.features_dir else "frames",
  }
  if cfg.features_dir:
    from mod_jax.data import features as features_lib

    m = features_lib.read_manifest(cfg.features_dir)
    out.update(tokens_per_frame=m["tokens_per_frame"], width=m["width"], dtype=m["dtype"])
  else:
    out.update(image_size=cfg.image_size, frame_format=cfg.frame_format)
  return out
