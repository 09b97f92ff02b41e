"""What every cache of captured CUDA graphs in maskar shares (the diffusion heads' chains,
:mod:`maskar.nn.graphed_chain`; the next-scale samplers' runners, :mod:`maskar.models.scale_graphs`).

A graph reads the memory its capture saw: when a model's parameters move or are replaced, every
graph of the cache is stale and dropped. A capture that fails once marks the cache ``failed`` and
the owner samples eagerly from then on. A model holding a cache can still be copied and pickled:
the copy gets an empty cache of the same size (graphs themselves cannot be copied).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any


class LruGraphCache:
    """An LRU map of captured graphs, keyed by the call's static knobs, valid for one set of
    weights (``weights``: whatever identifies the memory the graphs read)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple, Any] = OrderedDict()
        self.weights: tuple = ()
        self.failed = False  # a capture failed: sample eagerly from then on
        self.captures = 0

    def clear(self) -> None:
        """Drop every graph (and with the last reference, its memory pool)."""
        self.entries.clear()

    def __deepcopy__(self, memo: dict) -> LruGraphCache:
        return type(self)(self.max_entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def lookup(self, weights: tuple, key: tuple) -> Any | None:
        """The entry for ``key`` (made the most recent), or None; every entry is dropped first
        when ``weights`` differ from those the graphs were captured with."""
        if weights != self.weights:
            self.clear()
            self.weights = weights
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
        return found

    def capture_failed(self, owner: str, error: Exception, stacklevel: int) -> None:
        """Give up on graphs for good and say so once (``stacklevel`` as the caller's own warning
        would have it)."""
        self.failed = True
        self.clear()
        warnings.warn(
            f"{owner}: CUDA-graph capture failed ({type(error).__name__}: {error}); sampling eagerly",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
