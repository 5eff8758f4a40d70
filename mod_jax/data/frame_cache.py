"""A bounded, thread-safe LRU cache of decoded clips, and the per-process instance readers share.

Decoding a video is the slow part of reading one; a data source that validates videos at index
time (:mod:`mod_jax.data.sources.folder`) puts the decoded frames here so the pipeline's map step
and ``mod-jax eval`` find them again. One cache per byte budget per process
(:func:`shared_cache`); each grain worker process has its own.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class FrameCache:
  """A thread-safe LRU cache of decoded clips, bounded in bytes.

  Keys are hashable (the readers use ``(path, fps, size)``); values are numpy arrays, made
  read-only when stored. A value larger than the whole budget is returned but not kept.
  ``max_bytes = 0`` disables caching.
  """

  def __init__(self, max_bytes: int):
    self.max_bytes = int(max_bytes)
    self._items: collections.OrderedDict[Any, np.ndarray] = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def get(self, key: Any, make: Callable[[], np.ndarray]) -> np.ndarray:
    """Returns the cached value of ``key``, or ``make()`` (stored if it fits)."""
    with self._lock:
      if key in self._items:
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key]
      self.misses += 1
    value = make()
    self.put(key, value)
    return value

  def put(self, key: Any, value: np.ndarray) -> None:
    """Stores ``value`` (evicting the least recently used) unless it exceeds the budget."""
    if value.nbytes > self.max_bytes:
      return
    value.setflags(write=False)
    with self._lock:
      if key in self._items:
        return
      self._items[key] = value
      self._bytes += value.nbytes
      while self._bytes > self.max_bytes:
        _, old = self._items.popitem(last=False)
        self._bytes -= old.nbytes

  @property
  def nbytes(self) -> int:
    """Bytes held now."""
    return self._bytes


_SHARED: dict[int, FrameCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(max_bytes: int) -> FrameCache:
  """This process's :class:`FrameCache` for a budget of ``max_bytes`` (created on first use).

  ``data.cache_mb`` names the budget in configs; readers built from the same config therefore
  share one cache (the index's validating decode is reused by the pipeline and ``mod-jax eval``).
  """
  with _SHARED_LOCK:
    if max_bytes not in _SHARED:
      _SHARED[max_bytes] = FrameCache(max_bytes)
    return _SHARED[max_bytes]
