"""The LRU cache of captured graphs that the diffusion heads and the next-scale samplers share."""

from __future__ import annotations

import copy
import pickle

import pytest

from maskar.models.scale_graphs import GraphCache as RunnerCache
from maskar.nn.graph_cache import LruGraphCache
from maskar.nn.graphed_chain import GraphCache as ChainCache


def test_lookup_is_lru_and_new_weights_drop_every_entry():
    cache = LruGraphCache(4)
    assert cache.lookup(("w1",), ("a",)) is None
    cache.entries[("a",)], cache.entries[("b",)] = "A", "B"
    assert cache.lookup(("w1",), ("a",)) == "A"
    assert list(cache.entries) == [("b",), ("a",)]  # the hit is now the most recent
    assert cache.lookup(("w2",), ("a",)) is None  # moved weights: the graphs read old memory
    assert not cache.entries and cache.weights == ("w2",)


@pytest.mark.parametrize("cls", [LruGraphCache, ChainCache, RunnerCache])
def test_copies_and_pickles_as_an_empty_cache_of_the_same_size(cls):
    cache = cls(3)
    cache.entries[("a",)] = object()
    cache.captures, cache.weights = 1, ("w",)
    for clone in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert type(clone) is cls and clone.max_entries == 3
        assert not clone.entries and clone.captures == 0 and clone.weights == () and not clone.failed


def test_subclasses_clear_their_own_state_with_the_entries():
    chains, runners = ChainCache(2), RunnerCache(2)
    chains.pools["dev"] = ("pool", "stream")
    runners.seen.add(("k",))
    for cache in (chains, runners):
        cache.entries[("a",)] = object()
        cache.lookup(("new weights",), ("a",))
        assert not cache.entries
    assert not chains.pools and not runners.seen


def test_capture_failed_marks_the_cache_and_warns_at_the_callers_line():
    cache = LruGraphCache(2)
    cache.entries[("a",)] = object()
    with pytest.warns(RuntimeWarning, match=r"Head: CUDA-graph capture failed \(ValueError: bad\)") as rec:
        cache.capture_failed("Head", ValueError("bad"), stacklevel=1)
    assert cache.failed and not cache.entries
    assert rec[0].filename == __file__
