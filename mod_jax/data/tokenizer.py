"""The stream tokenizer: an HF ``tokenizers.Tokenizer`` plus the ids the LIVE format needs.

The LIVE stream (docs/design.md §2; videollm-online ``models/tokenization_live.py``) is built from a few
fixed pieces of text: ``<bos>``, ``<eos>``, the vision placeholder ``<v>``, the interval token
``,`` between frames, the stream close ``]\\n`` (its first id is the frame-end target that means
"speak now"), the stream open ``[``, ``\\n``, and the role tags ``Assistant:`` / ``User:``.
:class:`StreamTokenizer` resolves all of them once, from any ``tokenizer.json``, and fails with a
clear message when one is missing.

:func:`build_word_tokenizer` builds the small word-level tokenizer of the procedural dataset,
where every one of these pieces is a single added token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import models, pre_tokenizers

PAD, BOS, EOS, UNK, VISION = "<pad>", "<bos>", "<eos>", "<unk>", "<v>"
STREAM_CLOSE, STREAM_OPEN, INTERVAL, NEWLINE = "]\n", "[", ",", "\n"
ASSISTANT, USER = "Assistant:", "User:"
# Order fixes the ids of build_word_tokenizer: <pad> = 0, <bos> = 1, ...
WORD_TOKENIZER_SPECIALS = (
  PAD,
  BOS,
  EOS,
  UNK,
  VISION,
  STREAM_CLOSE,
  STREAM_OPEN,
  INTERVAL,
  NEWLINE,
  ASSISTANT,
  USER,
)


class TokenizerError(ValueError):
  """A tokenizer that lacks a token the stream format needs (or cannot be loaded)."""


class StreamTokenizer:
  """Token ids of the LIVE stream format on top of an HF ``tokenizers.Tokenizer``.

  Attributes:
    tokenizer: the wrapped ``tokenizers.Tokenizer``.
    pad_id, bos_id, eos_id, vision_id: single ids of ``<pad>``, ``<bos>``, ``<eos>``, ``<v>``.
    interval_id: single id of the interval token ``,`` (frame-end target "stay silent").
    stream_close_ids: ids of ``]\\n``; ``stream_close_ids[0]`` is the frame-end target "speak".
    stream_open_ids: ids of ``[``.
    newline_ids: ids of ``\\n``.
    assistant_ids, user_ids: ids of ``Assistant:`` and ``User:``.
    unk_id: id of the unknown token, or None when the tokenizer has none.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    pad: str = PAD,
    bos: str = BOS,
    eos: str = EOS,
    vision: str = VISION,
    name: str = "tokenizer",
  ):
    """Resolves the stream-format ids.

    Args:
      tokenizer: an HF tokenizer (any model: WordLevel, BPE, Unigram, ...).
      pad, bos, eos, vision: the strings of those tokens in this vocabulary (Llama-3 e.g. uses
        ``<|begin_of_text|>`` / ``<|eot_id|>``); each must be a single token.
      name: shown in error messages (the file it came from).

    Raises:
      TokenizerError: a required token is absent, or ``,`` / a special token is not a single id.
    """
    self.tokenizer = tokenizer
    self.name = name
    self.pad_id = self._single(pad, "pad")
    self.bos_id = self._single(bos, "bos")
    self.eos_id = self._single(eos, "eos")
    self.vision_id = self._single(vision, "vision placeholder")
    self.interval_id = self._single(INTERVAL, "interval token")
    self.stream_close_ids = self._pieces(STREAM_CLOSE, "stream close")
    self.stream_open_ids = self._pieces(STREAM_OPEN, "stream open")
    self.newline_ids = self._pieces(NEWLINE, "newline")
    self.assistant_ids = self._pieces(ASSISTANT, "assistant tag")
    self.user_ids = self._pieces(USER, "user tag")
    self.unk_id = tokenizer.token_to_id(UNK)
    if self.stream_close_ids[0] == self.interval_id:
      raise TokenizerError(
        f"{name}: ']\\n' starts with the interval token ',' (id "
        f"{self.interval_id}); the frame-end targets would be identical."
      )

  def _single(self, token: str, what: str) -> int:
    i = self.tokenizer.token_to_id(token)
    if i is None:
      ids = self.tokenizer.encode(token, add_special_tokens=False).ids
      if len(ids) == 1 and ids[0] != self.tokenizer.token_to_id(UNK):
        return ids[0]
      raise TokenizerError(
        f"{self.name}: the {what} token {token!r} is not a single token of this vocabulary "
        f"(it encodes to {ids}). Add it to the tokenizer (tokenizer.add_special_tokens) or "
        f"name the right string (config data.tokens.*)."
      )
    return i

  def _pieces(self, text: str, what: str) -> tuple[int, ...]:
    i = self.tokenizer.token_to_id(text)
    if i is not None:
      return (i,)
    ids = tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)
    if not ids or (self.tokenizer.token_to_id(UNK) in ids):
      raise TokenizerError(f"{self.name}: the {what} {text!r} cannot be encoded (got {ids}).")
    return ids

  @classmethod
  def from_file(cls, path: str | os.PathLike[str], **tokens: str) -> StreamTokenizer:
    """Loads a ``tokenizer.json``.

    Args:
      path: an HF ``tokenizer.json``.
      **tokens: ``pad``, ``bos``, ``eos``, ``vision`` token strings (see ``__init__``).

    Raises:
      TokenizerError: the file is missing or unreadable, or lacks a required token.
    """
    path = os.fspath(path)
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises bare Exception for bad files
      raise TokenizerError(f"cannot load tokenizer {path!r}: {e}") from e
    return cls(tok, name=path, **tokens)

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (the model's embedding table must be at least this)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Text -> ids, with no ``<bos>``/``<eos>`` added."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Ids -> text (specials such as ``<v>`` kept unless ``skip_special_tokens``)."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def count_unknown(self, ids: Sequence[int]) -> int:
    """Number of ``<unk>`` ids in ``ids`` (0 when the tokenizer has no unknown token)."""
    return 0 if self.unk_id is None else sum(1 for i in ids if i == self.unk_id)


def build_word_tokenizer(words: Iterable[str], path: str | os.PathLike[str]) -> StreamTokenizer:
  """Builds and saves a word-level tokenizer whose stream pieces are single added tokens.

  Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, ``<v>``=4, ``]\\n``=5, ``[``=6,
  ``,``=7, ``\\n``=8, ``Assistant:``=9, ``User:``=10, then ``words`` in sorted order (duplicates
  and words equal to a special removed). Text is split by the ``Whitespace`` pre-tokenizer
  (``\\w+|[^\\w\\s]+``), so each word must be such a piece; unknown words map to ``<unk>``.
  The output is deterministic given the set of words.

  Args:
    words: the vocabulary (e.g. every word the procedural generator can say, and ``.``).
    path: where to write ``tokenizer.json`` (parent directory must exist).

  Returns:
    The :class:`StreamTokenizer` of the saved file.

  Raises:
    ValueError: a word is not a single Whitespace pre-token (e.g. contains a space).
  """
  words = sorted(set(words) - set(WORD_TOKENIZER_SPECIALS))
  splitter = pre_tokenizers.Whitespace()
  for w in words:
    pieces = [p for p, _ in splitter.pre_tokenize_str(w)]
    if pieces != [w]:
      raise ValueError(f"build_word_tokenizer: word {w!r} splits into {pieces}; give single words.")
  vocab = {t: i for i, t in enumerate(WORD_TOKENIZER_SPECIALS)}
  for w in words:
    vocab[w] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = splitter
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in WORD_TOKENIZER_SPECIALS]
  )
  path = os.fspath(path)
  # Tokenizer.save writes JSON; re-dump with sorted keys so the file is byte-identical per vocab.
  data = json.loads(tok.to_str())
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=True)
  return StreamTokenizer(tokenizers.Tokenizer.from_file(path), name=path)
