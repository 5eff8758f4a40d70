"""Shared configuration defaults and up-front validation.

Configs are Python files (``configs/*.py``) whose ``get_config(arg)`` returns an
``ml_collections.ConfigDict`` built on :func:`base_config`. :func:`validate` refuses impossible
settings before anything is built, with a message naming the value and what to do.

Checks that need model code (RoPE scaling, LoRA targets, the routing plan) live with the model,
in :func:`mod_jax.model.factory.check_model_config`; this module imports no model code.

Sequence layout used everywhere (docs/design.md §1.2): a training row of static length
``L = T_cap + F_cap * tokens_per_frame`` holds ``T_cap`` text slots and ``F_cap`` frames of
``tokens_per_frame`` vision slots, with explicit RoPE ``positions`` and ``segment_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Logical axis names -> mesh axes (MaxText style: one table, physical axes appear nowhere else).
DEFAULT_LOGICAL_AXIS_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", "context"),  # a row's slots: whole frames per shard (docs/design.md §6)
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("vision_embed", "fsdp"),
  ("vision_mlp", "tensor"),
  ("vision_heads", "tensor"),
  ("norm", None),
  ("layers", None),  # the stacked decoder layers' leading axis (mod_jax/model/llm.py), never split
  # LoRA's rank axis (mod_jax/model/lora.py): adapters of an ``embed`` input or output are already
  # split over fsdp there (a mesh axis shards one dim), the others (mlp, heads, vocab) are split here
  ("lora_rank", "fsdp"),
)

MOD_INSERTIONS = ("none", "all", "all_deep", "interleaved", "interleaved_deep")
MOD_SELECTIONS = ("learned", "random", "uniform")
ROUTER_WEIGHTINGS = ("ste", "sigmoid", "score")
ROUTER_INPUTS = ("hidden", "normed")


def base_config() -> ConfigDict:
  """Returns the defaults every experiment config starts from (values of the paper where it has one)."""
  c = ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model
  m = c.model = ConfigDict()
  m.vocab_size = 256  # >= tokenizer vocabulary; padded for sharding
  m.d_model = 128
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.head_dim = 32
  m.d_ff = 384
  m.rope_theta = 10000.0
  m.rope_scaling = ml_collections.FieldReference(  # None, or transformers' rope parameters, e.g.
    None, field_type=object
  )  # {"rope_type": "llama3", "factor": 8.0, ...} (default/linear/llama3)
  m.rms_norm_eps = 1e-5
  m.tie_embeddings = False
  m.qkv_bias = False  # True for the Qwen2 family
  m.dtype = "float32"  # activation / compute dtype
  m.param_dtype = "float32"  # LLM base weights; bfloat16 only when frozen (LoRA rank > 0)
  m.attention = "auto"  # xla | blockwise | splash | cudnn | auto (TPU splash, GPU cudnn,
  # CPU blockwise); mod_jax/model/attention_ops.py
  m.attention_block_size = 128  # query / key block: 128 suits CPU (blockwise), 512 TPU (splash)
  m.attention_platform = ""  # platform the step is compiled for ("" = jax.default_backend();
  # `mod-jax compile --topology` sets "tpu" for AOT on a CPU host)
  m.scan_layers = True  # scan the repeating layer cycle (mod_jax/model/llm.py::layer_runs)
  m.tokens_per_frame = 10  # 1 pooled token + pool_size**2 grid tokens
  m.init_from = ""  # pretrained LLM loaded at step 0: HF dir, .gguf, `mod-jax convert` dir

  # LoRA (docs/design.md §1, mod_jax/model/lora.py). rank > 0 freezes the LLM: the optimizer updates the
  # adapters, the connector, the routers, the vision tower if vision.trainable, and `trainable`.
  lo = m.lora = ConfigDict()
  lo.rank = 0  # r; 0 = no LoRA (every parameter trains)
  lo.alpha = 16.0  # update scale alpha / r
  lo.dropout = 0.0  # on the adapter input, training steps only
  lo.targets = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
  lo.param_dtype = "float32"
  lo.trainable = ()  # regexes of more parameter paths to train, e.g. ("llm/embed",)

  v = m.vision = ConfigDict()
  v.image_size = 48
  v.patch_size = 8
  v.width = 96
  v.depth = 2
  v.n_heads = 4
  v.mlp_dim = 256
  v.pool_size = 3  # p: patch grid average-pooled to p x p
  v.layer_norm_eps = 1e-6
  v.trainable = True  # VideoLLM-online freezes a pretrained SigLIP; from scratch it must train
  v.init_from = ""  # pretrained SigLIP (HF SiglipVisionModel / SiglipModel dir) at step 0
  v.dtype = "float32"  # compute dtype of the tower
  v.param_dtype = "float32"  # bfloat16 only when frozen (trainable = False)
  v.frame_chunk = 0  # frames per tower call (lax.map over chunks; 0 = all at once)

  # Routing of vision tokens (docs/design.md §1.1, mod_jax/model/mod.py). insertion and keep_ratio take a
  # str/float or a list (typed `object` so `--config.model.mod.insertion=[1,3]` works). Baselines
  # are k = 0 settings of the same mechanism (mod.baseline_routing): EarlyExit(E) = insertion
  # [E..n-1] with keep_ratio [0.0]*(n-E); LayerSkip = "interleaved" with one 0.0 per routed layer;
  # Full computation = insertion "none".
  mod = m.mod = ConfigDict()
  mod.insertion = ml_collections.FieldReference(  # MOD_INSERTIONS or a list of layer indices
    "interleaved", field_type=object
  )
  mod.keep_ratio = ml_collections.FieldReference(  # r in [0, 1], or one r per routed layer;
    0.2, field_type=object
  )  # k = ceil(r * tokens_per_frame) per frame
  mod.selection = "learned"  # LayerExpert router / random / uniform (strided)
  mod.router_weighting = "ste"  # x <- x + g(s) f(x): ste (forward 1) | sigmoid | score
  mod.router_aux_loss_weight = 0.0  # Mixture-of-Depths aux loss: BCE(router logit, kept), per layer
  # Router training (mod_jax/model/mod.py, docs/ablation.md "Learned router"): the router's input
  # (hidden: the residual stream; normed: the layer's input norm, as γ-MoD); with ste, the gate's
  # forward value is annealed from sigmoid(s) to 1 over the first router_anneal_steps steps
  # (0: off); router_explore: Gumbel noise scale on the selection scores, annealed with it.
  mod.router_input = "hidden"
  mod.router_anneal_steps = 0
  mod.router_explore = 0.0
  # frame: per-frame top-k with a LayerExpert per layer (VideoLLM-MoD); sequence: γ-MoD — one
  # shared Linear(d -> 2) router, masked routing (only vision and answer tokens may skip), top-C
  # over the row with C = ceil(keep_ratio * L), and at inference P(process) > threshold.
  mod.routing = "frame"
  mod.threshold = 0.5

  # ---------------------------------------------------------------- data
  d = c.data = ConfigDict()
  d.source = "procedural"  # "procedural" (generated on first use), "folder" or "tfds"
  d.input = "frames"  # what a batch carries: "frames" (uint8 pixels, the tower runs in
  # the step) or "features" (pre-extracted tower output [F, N, w])
  d.dir = ""  # folder with videos + narrations.json; "" -> cache dir for procedural
  d.features_dir = ""  # folder/procedural + input="features": `mod-jax encode --out` of data.dir
  d.tfds_name = ""  # source="tfds": ego4d_narration_stream | coin_stream [/builder config]
  d.tfds_dir = ""  # source="tfds": the --data_dir of `mod-jax prepare`
  d.tfds_train_split = "train"  # source="tfds": split read as "train"
  d.tfds_eval_split = ""  # source="tfds": split read as "eval" ("" -> val, else test)
  d.fps = 2.0  # frames per second sampled from the video
  d.max_frames = 24  # F_cap: frames per training row
  d.max_text = 96  # T_cap: text slots per training row (padding counts as text)
  d.system_prompt = "narrate what happens in the video."
  d.num_packing_bins = 16
  d.on_bad_video = "skip"  # "skip" (count + warn) or "fail"
  d.worker_count = 0  # grain multiprocessing workers (0 = in-process)
  d.cache_mb = 1024  # per-process LRU cache of decoded clips (MiB of uint8 frames)
  d.tokenizer = ""  # tokenizer.json; "" -> {data root}/tokenizer.json
  tok = d.tokens = ConfigDict()  # token strings of that tokenizer (each a single token)
  tok.pad = "<pad>"
  tok.bos = "<bos>"
  tok.eos = "<eos>"
  tok.vision = "<v>"
  p = d.procedural = ConfigDict()
  p.num_train_videos = 192
  p.num_eval_videos = 24
  p.seconds = 12.0
  p.native_fps = 8.0
  p.resolution = 64
  p.seed = 0  # the generated clips depend on this (not on the training seed)

  # ---------------------------------------------------------------- training
  t = c.train = ConfigDict()
  t.steps = 600
  t.batch_size = 8  # global batch (rows)
  t.learning_rate = 2e-3
  t.warmup_steps = 50
  t.end_learning_rate_ratio = 0.05
  t.weight_decay = 0.01
  t.grad_clip_norm = 1.0
  t.stream_loss_weight = 1.0
  t.log_every = 20
  t.checkpoint_every = 200
  t.max_checkpoints = 2
  t.eval_batches = 8
  t.eval_every = 0  # steps between held-out evaluations during training (0: only at the end)
  t.remat = "none"  # a key of mod_jax.model.llm.REMAT_POLICIES (per scanned layer cycle)
  t.grad_accum_steps = 1  # micro-batches per step (batch_size / grad_accum_steps rows each)
  t.ce_chunk = 512  # slots per LM-head + cross-entropy chunk (bounds the logits)

  # ---------------------------------------------------------------- mesh
  mesh = c.mesh = ConfigDict()
  # (data, fsdp, tensor, context); one -1 absorbs the remaining devices. Trailing axes of size 1
  # may be left out: (-1, 1, 1) is (-1, 1, 1, 1). ``context`` splits every row into that many
  # chunks of whole frames, one per device (docs/design.md §6, mod_jax/model/rows.py).
  mesh.shape = (-1, 1, 1, 1)
  mesh.axes = ("data", "fsdp", "tensor", "context")
  mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
  # Multi-slice (devices in several TPU slices): slices per mesh axis, over DCN; mesh.shape is the
  # global shape and each axis holds shape / dcn_shape devices per slice (ICI). None = all slices
  # along the first axis (data parallelism over DCN). Override: --config.mesh.dcn_shape='(2,1,1)'.
  mesh.dcn_shape = ml_collections.config_dict.placeholder(tuple)
  return c


def parse_arg(arg: str | None, *, source: str, **defaults) -> ConfigDict:
  """A config file's arg string (big_vision style): ``"dense,llm=/ckpt/x"`` → ConfigDict.

  ``defaults`` name every key the config accepts and its default; a value takes its default's
  type (bool, int, float or str), and a bare key sets a bool key to True.

    parse_arg("dense,steps=5", source="configs/x.py", dense=False, steps=10, llm="")
    # -> ConfigDict(dense=True, steps=5, llm="")

  Raises:
    ValueError: an unknown key, a bare non-bool key or a value of the wrong type; the message
      names ``source``, the offending part and the accepted keys.
  """
  out = ConfigDict(defaults)
  usage = ",".join(f"{k}" if isinstance(v, bool) else f"{k}=…" for k, v in defaults.items())
  for part in filter(None, (arg or "").split(",")):
    key, has_value, value = part.partition("=")
    default = defaults.get(key)
    try:
      if key not in defaults:
        raise ValueError("unknown key")
      if isinstance(default, bool):
        if has_value and value.lower() not in ("true", "false"):
          raise ValueError("expected true or false")
        out[key] = not has_value or value.lower() == "true"
      elif not has_value or not value:
        raise ValueError("needs a value")
      else:
        out[key] = type(default)(value)
    except ValueError as e:
      raise ValueError(
        f"{source}: bad arg part {part!r} ({e}); the arg is comma-separated from: {usage}."
      ) from None
  return out


class ConfigError(ValueError):
  """An impossible or inconsistent configuration, detected before anything is built."""


def full_mesh_shape(shape: Sequence[int], axes: Sequence[str]) -> tuple[int, ...]:
  """``mesh.shape`` with one entry per mesh axis: left-out trailing axes have size 1 (so the
  three-entry (data, fsdp, tensor) shapes of earlier configs keep their meaning).

  Raises:
    ConfigError: more entries than ``mesh.axes``.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) > len(axes):
    raise ConfigError(
      f"mesh.shape={shape} has more entries than mesh.axes={tuple(axes)}; give one size per "
      f"axis (trailing axes of size 1 may be left out)."
    )
  return shape + (1,) * (len(axes) - len(shape))


def context_axis_size(config: ConfigDict, num_devices: int | None = None) -> int:
  """R: the size of the ``context`` mesh axis of ``config.mesh.shape`` (1 without one), i.e.
  the context chunks of every packed row (docs/design.md §6).

  Args:
    config: full config (``mesh.shape``, ``mesh.axes``).
    num_devices: the device count, needed only when the context entry is -1.

  Raises:
    ConfigError: the entry is -1 and ``num_devices`` is None, or the shape does not resolve.
  """
  axes = tuple(config.mesh.axes)
  if "context" not in axes:
    return 1
  shape = full_mesh_shape(config.mesh.shape, axes)
  if shape[axes.index("context")] == -1:
    if num_devices is None:
      raise ConfigError(
        f"mesh.shape={tuple(config.mesh.shape)} leaves the context axis to the device count; "
        f"give the device count, or a fixed context size."
      )
    shape = resolve_mesh_shape(shape, num_devices)
  return shape[axes.index("context")]


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills a single -1 in ``shape`` so the product equals ``num_devices``.

  Raises:
    ConfigError: more than one -1, or the product does not match ``num_devices``.
  """
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"mesh.shape={shape}: at most one -1 is allowed.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(
        f"mesh.shape={shape} cannot fill {num_devices} devices: {num_devices} is not divisible "
        f"by {known}. Choose axis sizes whose product divides the device count."
      )
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(
      f"mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are available. "
      f"Set --config.mesh.shape so the product is {num_devices} (use -1 for one axis)."
    )
  return shape


def split_mesh_shape(
  shape: Sequence[int], dcn_shape: Sequence[int] | None, num_slices: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici_shape, dcn_shape) of a resolved global mesh ``shape`` over ``num_slices`` slices.

  ``dcn_shape`` (``config.mesh.dcn_shape``) gives the slices per mesh axis; None puts all slices
  on the first axis (data parallelism over DCN). Axis i holds ``shape[i] // dcn_shape[i]``
  devices per slice.

  Raises:
    ConfigError: dcn_shape's rank differs from shape's, its product is not ``num_slices``, or it
      does not divide ``shape``.
  """
  shape = tuple(int(s) for s in shape)
  dcn = (
    (num_slices,) + (1,) * (len(shape) - 1)
    if dcn_shape is None
    else tuple(int(s) for s in dcn_shape)
  )
  if len(dcn) < len(shape):  # trailing axes left out, as in mesh.shape: one slice each
    dcn = dcn + (1,) * (len(shape) - len(dcn))
  if len(dcn) != len(shape) or min(dcn) < 1 or math.prod(dcn) != num_slices:
    raise ConfigError(
      f"mesh.dcn_shape={dcn_shape} must give one size >= 1 per mesh axis "
      f"({len(shape)}) with product = the number of slices ({num_slices}), "
      f"e.g. {(num_slices,) + (1,) * (len(shape) - 1)}."
    )
  if any(s % d for s, d in zip(shape, dcn)):
    raise ConfigError(
      f"mesh.dcn_shape={dcn} does not divide mesh.shape={shape} axis by axis; "
      f"each axis needs a whole number of devices per slice."
    )
  return tuple(s // d for s, d in zip(shape, dcn)), dcn


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
REMAT_POLICIES = (
  "none",
  "full",
  "save_dots",
  "save_qkv_proj",
  "save_dot_except_mlpwi",
  "save_proj",
  "save_proj_except_mlpwo",
)
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _validate_precision_and_memory(config: ConfigDict) -> None:
  """Dtypes (trainable weights stay float32), attention path, remat, accumulation, input."""
  m, t, d = config.model, config.train, config.data
  for name, value in (
    ("model.dtype", m.dtype),
    ("model.param_dtype", m.param_dtype),
    ("model.vision.dtype", m.vision.dtype),
    ("model.vision.param_dtype", m.vision.param_dtype),
    ("model.lora.param_dtype", m.lora.param_dtype),
  ):
    if value not in _FLOAT_DTYPES:
      raise ConfigError(f"{name}={value!r}; choose one of {_FLOAT_DTYPES}.")
  if m.attention not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(
      f"model.attention={m.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}."
    )
  if m.attention_block_size < 8 or m.attention_block_size % 8:
    raise ConfigError(
      f"model.attention_block_size={m.attention_block_size} must be a positive "
      f"multiple of 8 (128 or more on TPU)."
    )
  if t.remat not in REMAT_POLICIES:
    raise ConfigError(f"train.remat={t.remat!r}; choose one of {REMAT_POLICIES}.")
  if t.grad_accum_steps < 1 or t.batch_size % t.grad_accum_steps:
    raise ConfigError(
      f"train.grad_accum_steps={t.grad_accum_steps} must be >= 1 and divide "
      f"train.batch_size={t.batch_size} (each micro-batch has batch_size / "
      f"grad_accum_steps rows)."
    )
  if t.ce_chunk < 1 or m.vision.frame_chunk < 0:
    raise ConfigError(
      f"train.ce_chunk={t.ce_chunk} must be >= 1 and model.vision.frame_chunk="
      f"{m.vision.frame_chunk} >= 0."
    )
  if d.input not in ("frames", "features"):
    raise ConfigError(f"data.input={d.input!r}; choose 'frames' or 'features'.")


def _validate_context(config: ConfigDict, context: int) -> None:
  """Checks a ``context`` mesh axis of size ``context`` (docs/design.md §6): each row is split
  into ``context`` chunks of ``max_text / context`` text slots and ``max_frames / context`` whole
  frames, one chunk per device, so MoD's per-frame top-k and compaction stay on one device.

  Raises:
    ConfigError: the caps are not divisible by the axis, ``length`` does not map to it, or a
      feature that needs the whole row on one device is on (γ-MoD sequence routing, cuDNN
      attention).
  """
  if context <= 1:
    return
  m, d = config.model, config.data
  for name, value in (("data.max_text", d.max_text), ("data.max_frames", d.max_frames)):
    if value % context:
      raise ConfigError(
        f"{name}={value} is not divisible by the context axis size {context} "
        f"(mesh.shape={tuple(config.mesh.shape)}): each device holds 1/{context} of every "
        f"row's text slots and whole frames. Use a multiple of {context} or a smaller axis."
      )
  rules = dict((k, v) for k, v in config.mesh.logical_axis_rules)
  length = rules.get("length")
  if "context" not in ((length,) if isinstance(length, str) else tuple(length or ())):
    raise ConfigError(
      f"the context mesh axis has size {context} but mesh.logical_axis_rules map 'length' to "
      f"{length!r}; map it to 'context' (the default table does) or set the axis size to 1."
    )
  if m.mod.get("routing", "frame") == "sequence":
    raise ConfigError(
      "model.mod.routing='sequence' (γ-MoD) takes a top-C over the whole row, which a context "
      f"axis of size {context} splits over devices; use routing='frame' or context size 1."
    )
  if m.attention == "cudnn":
    raise ConfigError(
      f"model.attention='cudnn' cannot run with a context axis of size {context} (its causal "
      f"mask has no query offset); use 'blockwise', 'xla' or 'splash'."
    )


def validate_for_training(config: ConfigDict) -> None:
  """Training-only checks (inference may hold any weights in bfloat16): trainable weights are
  kept in float32 while compute runs in ``model.dtype``; frozen ones may be bfloat16.

  Raises:
    ConfigError: a bfloat16/float16 ``param_dtype`` for weights the optimizer updates.
  """
  m = config.model
  if m.param_dtype != "float32" and m.lora.rank == 0:
    raise ConfigError(
      f"model.param_dtype={m.param_dtype!r} but the LLM weights are trained (model.lora.rank=0):"
      f" trainable weights are kept in float32 (compute runs in model.dtype). Use "
      f"param_dtype='float32', or freeze the base with LoRA (model.lora.rank > 0)."
    )
  if m.vision.param_dtype != "float32" and m.vision.trainable:
    raise ConfigError(
      f"model.vision.param_dtype={m.vision.param_dtype!r} but model.vision.trainable=True: "
      f"trainable weights are kept in float32. Use 'float32' or freeze the tower."
    )
  if m.lora.rank > 0 and m.lora.param_dtype != "float32":
    raise ConfigError(
      f"model.lora.param_dtype={m.lora.param_dtype!r}: LoRA adapters are trained "
      f"and kept in float32."
    )


def validate(config: ConfigDict, num_devices: int | None = None, num_slices: int = 1) -> None:
  """Checks a config for impossible settings; raises :class:`ConfigError` naming the value.

  Args:
    config: a ConfigDict from ``base_config()`` (possibly overridden).
    num_devices: devices the mesh must cover (``jax.device_count()``); None skips mesh checks.
    num_slices: TPU slices those devices span (``mesh.dcn_shape`` is checked against it).
  """
  m, d, t = config.model, config.data, config.train
  mod = m.mod
  p = m.vision.pool_size
  if m.tokens_per_frame != 1 + p * p:
    raise ConfigError(
      f"model.tokens_per_frame={m.tokens_per_frame} but model.vision.pool_size={p} gives "
      f"1 + p*p = {1 + p * p} (1 pooled token + p x p grid). Set one consistently."
    )
  grid = m.vision.image_size // m.vision.patch_size
  if m.vision.image_size % m.vision.patch_size:
    raise ConfigError(
      f"model.vision.image_size={m.vision.image_size} is not a multiple of "
      f"patch_size={m.vision.patch_size}."
    )
  if grid % p:
    raise ConfigError(
      f"patch grid {grid}x{grid} (image_size/patch_size) is not divisible by pool_size={p}; "
      f"average pooling to {p}x{p} needs equal windows. Change image_size or pool_size."
    )
  if mod.selection not in MOD_SELECTIONS:
    raise ConfigError(f"model.mod.selection={mod.selection!r}; choose one of {MOD_SELECTIONS}.")
  if mod.router_weighting not in ROUTER_WEIGHTINGS:
    raise ConfigError(
      f"model.mod.router_weighting={mod.router_weighting!r}; choose one of {ROUTER_WEIGHTINGS}."
    )
  ins = mod.insertion
  if isinstance(ins, str):
    if ins not in MOD_INSERTIONS:
      raise ConfigError(
        f"model.mod.insertion={ins!r}; choose one of {MOD_INSERTIONS} or a list of layer indices."
      )
  else:
    bad = [i for i in ins if not 0 <= int(i) < m.n_layers]
    if bad:
      raise ConfigError(f"model.mod.insertion lists layers {bad} outside 0..{m.n_layers - 1}.")
  if mod.get("routing", "frame") not in ("frame", "sequence"):
    raise ConfigError(f"model.mod.routing={mod.routing!r}; choose frame or sequence.")
  if mod.get("routing", "frame") == "sequence" and (
    mod.selection != "learned" or not isinstance(mod.keep_ratio, (int, float))
  ):
    raise ConfigError(
      "model.mod.routing='sequence' (γ-MoD) needs selection='learned' and one scalar keep_ratio "
      f"(the capacity); got selection={mod.selection!r}, keep_ratio={mod.keep_ratio!r}."
    )
  if mod.router_aux_loss_weight < 0:
    raise ConfigError(
      f"model.mod.router_aux_loss_weight={mod.router_aux_loss_weight} must be >= 0."
    )
  if mod.get("router_input", "hidden") not in ROUTER_INPUTS:
    raise ConfigError(
      f"model.mod.router_input={mod.router_input!r}; choose one of {ROUTER_INPUTS}."
    )
  anneal, explore = int(mod.get("router_anneal_steps", 0)), float(mod.get("router_explore", 0.0))
  if anneal < 0 or explore < 0:
    raise ConfigError(
      f"model.mod.router_anneal_steps={anneal} and router_explore={explore} must be >= 0."
    )
  if anneal > 0 and mod.router_weighting != "ste":
    raise ConfigError(
      f"model.mod.router_anneal_steps={anneal} anneals the ste gate's forward value from "
      f"sigmoid(s) to 1; router_weighting={mod.router_weighting!r} has no such schedule. Use "
      f"router_weighting='ste' or router_anneal_steps=0."
    )
  if explore > 0 and anneal == 0:
    raise ConfigError(
      f"model.mod.router_explore={explore} is annealed with the gate and is off without it; "
      f"set model.mod.router_anneal_steps > 0 (e.g. half of train.steps) or router_explore=0."
    )
  if anneal > t.steps:
    raise ConfigError(
      f"model.mod.router_anneal_steps={anneal} > train.steps={t.steps}: the anneal would not "
      f"finish, and the evaluated model (gate 1) would differ from the trained one. Use at "
      f"most train.steps."
    )
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f"model.n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}.")
  if m.vision.width % m.vision.n_heads:
    raise ConfigError(
      f"model.vision.width={m.vision.width} is not divisible by vision.n_heads={m.vision.n_heads}."
    )
  if d.max_frames < 1 or d.max_text < 4:
    raise ConfigError(
      f"data.max_frames={d.max_frames} must be >= 1 and data.max_text="
      f"{d.max_text} >= 4 (room for <bos>, prompt and stream tokens)."
    )
  if d.max_frames * m.tokens_per_frame + d.max_text > 1 << 20:
    raise ConfigError("sequence length T_cap + F_cap*N exceeds 2**20 tokens.")
  if d.on_bad_video not in ("skip", "fail"):
    raise ConfigError(f"data.on_bad_video={d.on_bad_video!r}; choose 'skip' or 'fail'.")
  _validate_precision_and_memory(config)
  if t.steps < 1 or t.batch_size < 1:
    raise ConfigError(f"train.steps={t.steps} and train.batch_size={t.batch_size} must be >= 1.")
  if t.warmup_steps >= t.steps:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be < train.steps={t.steps}.")
  if num_devices is not None:
    shape = full_mesh_shape(resolve_mesh_shape(config.mesh.shape, num_devices), config.mesh.axes)
    split_mesh_shape(shape, config.mesh.get("dcn_shape"), num_slices)
    axes = dict(zip(config.mesh.axes, shape))
    _validate_context(config, axes.get("context", 1))
    batch_shards = axes.get("data", 1) * axes.get("fsdp", 1)
    micro = t.batch_size // t.grad_accum_steps
    if micro % batch_shards:
      raise ConfigError(
        f"train.batch_size={t.batch_size} / grad_accum_steps={t.grad_accum_steps} = {micro} "
        f"rows per micro-batch is not divisible by the batch shards data*fsdp={batch_shards} "
        f"of mesh {shape}. Use a multiple of {batch_shards} rows per micro-batch."
      )
    tp = axes.get("tensor", 1)
    for name, value in (
      ("n_heads", m.n_heads),
      ("n_kv_heads", m.n_kv_heads),
      ("d_ff", m.d_ff),
      ("vocab_size", m.vocab_size),
    ):
      if value % tp:
        raise ConfigError(f"model.{name}={value} is not divisible by the tensor axis size {tp}.")
    rank_axes = dict(config.mesh.logical_axis_rules).get("lora_rank")
    rank_axes = (rank_axes,) if isinstance(rank_axes, str) else tuple(rank_axes or ())
    shards = math.prod(axes.get(a, 1) for a in rank_axes)
    if m.lora.rank > 0 and m.lora.rank % shards:
      raise ConfigError(
        f"model.lora.rank={m.lora.rank} is not divisible by {shards}, the size of the mesh axes "
        f"{rank_axes} that mesh.logical_axis_rules give the adapters' rank axis 'lora_rank'. Use "
        f"a rank that is a multiple of {shards}, or map 'lora_rank' to None (each chip then holds "
        f"every adapter and its optimizer moments whole)."
      )
