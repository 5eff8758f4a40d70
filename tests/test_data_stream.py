"""LIVE stream rendering against hand-written token sequences (mod_jax/data/stream.py, docs/design.md §2)."""

import numpy as np
import pytest

from mod_jax.data import stream
from mod_jax.data.tokenizer import StreamTokenizer, TokenizerError, build_word_tokenizer

N = 2  # tokens per frame


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return build_word_tokenizer(
    ["go", "a", "red", "circle", "what", "is", "it"],
    tmp_path_factory.mktemp("tok") / "tokenizer.json",
  )


def ids(tok, words):
  """Hand-written stream text -> ids, one token per name (no tokenizer logic involved)."""
  vocab = tok.tokenizer.get_vocab()
  return [vocab[w] for w in words]


def render(tok, num_frames, narrations=(), queries=(), max_frames=24, max_text=64, chunks=1):
  return stream.render_stream(
    tok,
    num_frames=num_frames,
    narrations=narrations,
    queries=queries,
    fps=2.0,
    system_prompt="go",
    tokens_per_frame=N,
    max_frames=max_frames,
    max_text=max_text,
    chunks=chunks,
  )


def test_word_tokenizer_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vision_id) == (0, 1, 2, 4)
  assert tok.stream_close_ids == (5,) and tok.stream_open_ids == (6,)
  assert tok.interval_id == 7 and tok.newline_ids == (8,)
  assert tok.assistant_ids == (9,) and tok.user_ids == (10,)
  assert tok.encode("a red circle") == ids(tok, ["a", "red", "circle"])
  assert tok.encode("]\nAssistant: a red") == ids(tok, ["]\n", "Assistant:", "a", "red"])
  assert tok.decode(tok.encode("a red circle")) == "a red circle"


def test_missing_special_token_is_a_clear_error(tmp_path):
  import tokenizers
  from tokenizers import models, pre_tokenizers

  t = tokenizers.Tokenizer(
    models.WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3}, unk_token="<unk>")
  )
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  with pytest.raises(TokenizerError, match="vision placeholder token '<v>'"):
    StreamTokenizer(t)


def test_three_frames_one_narration(tok):
  """<bos>go\\n[<v><v>,<v><v>]\\nAssistant: a red circle<eos>\\n[<v><v>  (narration at 0.3 s)."""
  windows, stats = render(tok, 3, narrations=[(0.3, "a red circle")])
  assert len(windows) == 1 and stats.windows == 1 and stats.truncated_tokens == 0
  w = windows[0]
  # Positions: 0     1  2  3 4-5 6 7-8 9   10         11 12  13     14    15 16 17-18
  #            <bos> go \n [ <v> , <v> ]\n Assistant: a  red circle <eos> \n [  <v>
  text = [
    "<bos>",
    "go",
    "\n",
    "[",
    ",",
    "]\n",
    "Assistant:",
    "a",
    "red",
    "circle",
    "<eos>",
    "\n",
    "[",
  ]
  np.testing.assert_array_equal(w.text_tokens, ids(tok, text))
  np.testing.assert_array_equal(w.text_positions, [0, 1, 2, 3, 6, 9, 10, 11, 12, 13, 14, 15, 16])
  expected_targets = (
    ids(tok, ["go", "\n", "["])
    + [0, 0]
    + ids(tok, ["Assistant:", "a", "red", "circle", "<eos>", "\n", "["])
    + [0]
  )
  np.testing.assert_array_equal(w.text_targets, expected_targets)
  # videollm-online's labels: from the ]\n slot (target Assistant:) to the last word (target <eos>).
  np.testing.assert_array_equal(w.text_weights, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(w.frame_positions, [4, 7, 17])
  np.testing.assert_array_equal(w.frame_targets, [tok.interval_id, tok.stream_close_ids[0], 0])
  np.testing.assert_array_equal(w.frame_weights, [1, 1, 0])
  assert w.text_tokens.dtype == np.int32 and w.text_weights.dtype == np.float32
  assert w.frame_positions.dtype == np.int32 and w.frame_weights.dtype == np.float32
  ex = w.to_example(np.zeros((3, 8, 8, 3), np.uint8))
  assert ex["frames"].shape == (3, 8, 8, 3)


def test_narration_times_round_up_to_the_frame_grid(tok):
  # 0.5 s is exactly frame 1; 0.51 s rounds up to frame 2; beyond the end clamps to the last frame.
  for t, frame in ((0.0, 0), (0.5, 1), (0.51, 2), (9.0, 2)):
    (w,), _ = render(tok, 3, narrations=[(t, "a red circle")])
    speak = np.flatnonzero(w.frame_targets == tok.stream_close_ids[0])
    assert speak.tolist() == [frame], t
  # Two narrations on one frame: the later one is kept, the other counted.
  (w,), stats = render(tok, 3, narrations=[(0.6, "a red circle"), (0.9, "a circle")])
  assert stats.replaced_narrations == 1
  np.testing.assert_array_equal(
    w.text_targets[w.text_weights > 0], ids(tok, ["Assistant:", "a", "circle", "<eos>"])
  )


def test_query_enters_before_the_first_frame_at_or_after_it(tok):
  """Query at 0.7 s -> before frame 2 (t = 1.0 s); its answer is narrated after frame 2."""
  (w,), _ = render(tok, 3, narrations=[(1.0, "it is red")], queries=[(0.7, "what is it")])
  text = [
    "<bos>",
    "go",
    "\n",
    "[",
    ",",
    "]\n",
    "User:",
    "what",
    "is",
    "it",
    "\n",
    "[",
    "]\n",
    "Assistant:",
    "it",
    "is",
    "red",
    "<eos>",
  ]
  np.testing.assert_array_equal(w.text_tokens, ids(tok, text))
  # <bos> go \n [ <v><v> , <v><v> ]\n User: what is it \n [ <v><v> ]\n Assistant: it is red <eos>
  # 0     1  2  3 4    5 6 7    8 9   10    11   12 13 14 15 16   17 18  ...
  np.testing.assert_array_equal(w.frame_positions, [4, 7, 16])
  np.testing.assert_array_equal(w.frame_targets, [tok.interval_id] + [tok.stream_close_ids[0]] * 2)
  np.testing.assert_array_equal(w.frame_weights, [1, 1, 1])
  # Only the response is learned: ]\n -> Assistant:, Assistant: -> it, ..., red -> <eos>; the
  # query's ]\n -> User: (text slot 5) is not.
  np.testing.assert_array_equal(np.flatnonzero(w.text_weights), [12, 13, 14, 15, 16])
  # A query at time 0 goes right after the system prompt.
  (w,), _ = render(tok, 2, queries=[(0.0, "what is it")])
  assert w.text_tokens[:9].tolist() == ids(
    tok, ["<bos>", "go", "\n", "User:", "what", "is", "it", "\n", "["]
  )


def test_windows_cut_mid_video(tok):
  """F_cap = 2 frames: [frames 0-1 + the response], then [frame 2] with a fresh prefix."""
  windows, stats = render(tok, 3, narrations=[(0.3, "a red circle")], max_frames=2)
  assert stats.windows == 2
  w0, w1 = windows
  np.testing.assert_array_equal(
    w0.text_tokens,
    ids(tok, ["<bos>", "go", "\n", "[", ",", "]\n", "Assistant:", "a", "red", "circle", "<eos>"]),
  )
  assert w0.text_targets[-1] == 0
  np.testing.assert_array_equal(w0.text_weights, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(w0.frame_targets, [tok.interval_id, tok.stream_close_ids[0]])
  np.testing.assert_array_equal(w1.text_tokens, ids(tok, ["<bos>", "go", "\n", "["]))
  np.testing.assert_array_equal(w1.frame_positions, [4])
  np.testing.assert_array_equal(w1.frame_weights, [0])  # last frame, nothing after it
  assert (w0.frame_start, w0.frame_stop, w1.frame_start, w1.frame_stop) == (0, 2, 2, 3)
  # A window whose FIRST frame is answered: its ]\n slot right after the prefix is learned.
  windows, _ = render(tok, 3, narrations=[(0.5, "a red circle")], max_frames=1)
  w1 = windows[1]
  np.testing.assert_array_equal(
    w1.text_tokens,
    ids(tok, ["<bos>", "go", "\n", "[", "]\n", "Assistant:", "a", "red", "circle", "<eos>"]),
  )
  np.testing.assert_array_equal(w1.text_weights, [0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(w1.frame_targets, [tok.stream_close_ids[0]])
  # A silent video cut after frame 0: its target is the interval token, with weight 1.
  windows, _ = render(tok, 3, max_frames=1)
  assert [w.frame_targets.tolist() for w in windows] == [[tok.interval_id]] * 2 + [[0]]
  assert [w.frame_weights.tolist() for w in windows] == [[1.0], [1.0], [0.0]]
  # The text cap also cuts windows: every window respects both caps.
  narr = [(0.5 * k, "a red circle") for k in range(0, 40, 2)]
  windows, stats = render(tok, 40, narrations=narr, max_frames=8, max_text=20)
  assert all(w.num_frames <= 8 and w.num_text <= 20 for w in windows)
  assert sum(w.num_frames for w in windows) == 40 and stats.truncated_tokens == 0


def test_windows_flow_into_context_chunks(tok):
  """4 frames, a 6-word response after frame 0; rows of 24 text slots and 4 frames. One chunk:
  the whole stream is one window (17 text tokens). Two chunks of 12 text + 2 frames: the prefix
  (4), frame 0 and 8 of the 11 response tokens fill chunk 0's text (its 2nd frame slot stays
  free); chunk 1 takes the other 3, frame 1, ',' and frame 2, which fill its frame slots, so
  frame 3 starts a new window."""
  narr = [(0.0, "a red circle a red circle")]
  (w,), _ = render(tok, 4, narrations=narr, max_frames=4, max_text=24)
  assert (w.frame_start, w.frame_stop, w.num_text) == (0, 4, 17)
  (w0, w1), _ = render(tok, 4, narrations=narr, max_frames=4, max_text=24, chunks=2)
  assert (w0.frame_start, w0.frame_stop, w1.frame_start, w1.frame_stop) == (0, 3, 3, 4)
  assert w0.num_text == 4 + 11 + 1 and w1.num_text == 4  # <bos> go \n [ before frame 3
  with pytest.raises(ValueError, match="divisible by the context chunks 3"):
    render(tok, 4, max_frames=4, max_text=24, chunks=3)


def test_overlong_narration_is_truncated_and_counted(tok):
  (w,), stats = render(tok, 1, narrations=[(0.0, " ".join(["red"] * 30))], max_text=16)
  assert w.num_text == 16
  assert stats.truncated_windows == 1 and stats.truncated_tokens == 4 + 30 + 3 - 16
  # The kept tokens still predict the true next token.
  assert w.text_targets[-1] == ids(tok, ["red"])[0] and w.text_weights[-1] == 1


@pytest.fixture(scope="module")
def bpe_like_tok(tmp_path_factory):
  """A tokenizer where ']\\n', 'Assistant:' and 'User:' are two tokens each, as in byte-level BPEs
  (SmolLM2's encodes ']\\n' as ']' '\\n' and 'User:' as 'User' ':')."""
  import tokenizers
  from tokenizers import models, pre_tokenizers

  specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<v>", "[", ",", "\n"]
  words = ["]", "Assistant", "User", ":", "go", "a", "red", "circle", "what", "is", "it"]
  t = tokenizers.Tokenizer(
    models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>")
  )
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens([tokenizers.AddedToken(w, special=True, normalized=False) for w in specials])
  path = tmp_path_factory.mktemp("bpe_like") / "tokenizer.json"
  t.save(str(path))
  return StreamTokenizer.from_file(path)


def test_labels_equal_videollm_online_with_a_multi_token_stream_close(bpe_like_tok):
  """A query (0.3 s -> before frame 1), a response after frame 1, another after the last frame.

  Expected labels written by hand from videollm-online (``get_learn_ranges`` + ``data_collator``):
  learn ranges are each stream's closing ']\\n' (after its last frame) and each
  'Assistant: text<eos>'; the slot before every token of a range is labelled with that token. So ']' -> '\\n' is learned
  before the query and before each response; '\\n' -> 'User' is not; '\\n' -> 'Assistant' is.
  """
  tok = bpe_like_tok
  assert len(tok.stream_close_ids) == 2 and len(tok.assistant_ids) == 2
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
  # (position, token, target, learned) per text slot; frames at positions 4, 15, 27.
  table = [
    (0, "<bos>", "go", 0),
    (1, "go", "\n", 0),
    (2, "\n", "[", 0),
    (3, "[", None, 0),
    (6, "]", "\n", 1),
    (7, "\n", "User", 0),
    (8, "User", ":", 0),
    (9, ":", "what", 0),
    (10, "what", "is", 0),
    (11, "is", "it", 0),
    (12, "it", "\n", 0),
    (13, "\n", "[", 0),
    (14, "[", None, 0),
    (17, "]", "\n", 1),
    (18, "\n", "Assistant", 1),
    (19, "Assistant", ":", 1),
    (20, ":", "a", 1),
    (21, "a", "red", 1),
    (22, "red", "circle", 1),
    (23, "circle", "<eos>", 1),
    (24, "<eos>", "\n", 0),
    (25, "\n", "[", 0),
    (26, "[", None, 0),
    (29, "]", "\n", 1),
    (30, "\n", "Assistant", 1),
    (31, "Assistant", ":", 1),
    (32, ":", "it", 1),
    (33, "it", "is", 1),
    (34, "is", "red", 1),
    (35, "red", "<eos>", 1),
    (36, "<eos>", None, 0),
  ]
  vocab = tok.tokenizer.get_vocab()
  np.testing.assert_array_equal(w.text_positions, [p for p, *_ in table])
  np.testing.assert_array_equal(w.text_tokens, [vocab[t] for _, t, _, _ in table])
  np.testing.assert_array_equal(w.text_targets, [vocab[t] if t else 0 for _, _, t, _ in table])
  np.testing.assert_array_equal(w.text_weights, [x for *_, x in table])
  np.testing.assert_array_equal(w.frame_positions, [4, 15, 27])
  np.testing.assert_array_equal(w.frame_targets, [vocab["]"]] * 3)
  np.testing.assert_array_equal(w.frame_weights, [1, 1, 1])
