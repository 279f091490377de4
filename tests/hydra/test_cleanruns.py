"""The sweep's clean runs in groups of consecutive prompts (:mod:`causalnet.hydra.cleanruns`):
groups fixed by the prompts' lengths alone, each run computed with its group's and handed out
once, memory bounded, safe to pickle. Oracle: a counting stand-in for the adapter's
``clean_runs`` (what was asked, how often)."""

from __future__ import annotations

import pickle
import threading
from collections import deque

import torch
from hypothesis import given
from hypothesis import strategies as st

from causalnet.hydra.cleanruns import (
    GROUP,
    GROUP_TOKENS,
    KEEP,
    CleanGroups,
    groups,
    next_for,
)


class Counting:
    """An adapter's ``clean_runs`` stand-in: each run is (the prompt's tokens, granularity)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, ...]]] = []

    def clean_runs(self, prompts: list[torch.Tensor], granularity: str = "layer") -> list:
        self.batches.append([tuple(p.tolist()) for p in prompts])
        return [(tuple(p.tolist()), granularity) for p in prompts]


def _tokens(lengths: list[int]) -> list[torch.Tensor]:
    return [torch.full((n,), i) for i, n in enumerate(lengths)]


@given(st.lists(st.integers(1, 400), max_size=40))
def test_groups_cover_every_prompt_once_in_order_within_both_caps(lengths):
    out = groups(lengths)
    assert [i for g in out for i in g] == list(range(len(lengths)))
    for g in out:
        assert len(g) >= 1
        padded = len(g) * max(lengths[i] for i in g)
        assert len(g) == 1 or (len(g) <= GROUP and padded <= GROUP_TOKENS)


def test_groups_depend_on_the_lengths_only():
    assert groups([3] * 20) == [range(0, 8), range(8, 16), range(16, 20)]
    assert groups([300, 2, 2]) == [range(0, 1), range(1, 3)]  # too long to share: alone


def test_a_group_is_computed_once_and_each_run_handed_out_once():
    adapter, kept = Counting(), CleanGroups()
    tokens = _tokens([4] * 10)
    got = [kept.take(adapter, tokens, "layer", i) for i in (3, 0, 7, 9, 8)]
    assert [g[0] for g in got] == [tuple(tokens[i].tolist()) for i in (3, 0, 7, 9, 8)]
    assert [len(b) for b in adapter.batches] == [8, 2]  # prompts 0-7, then 8-9
    kept.take(adapter, tokens, "layer", 3)  # asked again: its group runs again
    assert [len(b) for b in adapter.batches] == [8, 2, 8]


def test_at_most_keep_groups_are_kept_and_a_dropped_group_is_computed_again():
    adapter, kept = Counting(), CleanGroups()
    tokens = _tokens([2] * (GROUP * (KEEP + 2)))
    for g in range(KEEP + 1):  # the first prompt of KEEP + 1 groups
        kept.take(adapter, tokens, "head", g * GROUP)
    assert len(kept._kept) == KEEP
    kept.take(adapter, tokens, "head", 1)  # group 0 was dropped: computed again
    assert len(adapter.batches) == KEEP + 2


def test_runs_of_another_adapter_are_not_handed_out():
    first, second, kept = Counting(), Counting(), CleanGroups()
    tokens = _tokens([2] * 4)
    kept.take(first, tokens, "layer", 0)
    kept.take(second, tokens, "layer", 1)
    assert len(first.batches) == 1 and len(second.batches) == 1


def test_runs_of_other_prompts_or_another_granularity_are_not_handed_out():
    """A kept run is handed out only for the tokens and granularity it was computed from: the
    same object asked with another prompt list of the same lengths, or at another granularity,
    computes the group again (and hands out that list's runs)."""
    adapter, kept = Counting(), CleanGroups()
    tokens = _tokens([3] * 4)
    others = [t + 100 for t in tokens]  # the same lengths, other tokens
    kept.take(adapter, tokens, "layer", 0)
    assert kept.take(adapter, others, "layer", 1) == (tuple(others[1].tolist()), "layer")
    assert kept.take(adapter, others, "head", 2) == (tuple(others[2].tolist()), "head")
    assert len(adapter.batches) == 3
    assert kept.take(adapter, others, "head", 3) == (tuple(others[3].tolist()), "head")
    assert len(adapter.batches) == 3  # kept from the last computation


def test_threads_asking_for_one_group_wait_for_one_computation():
    adapter, kept = Counting(), CleanGroups()
    tokens = _tokens([3] * GROUP)
    threads = [
        threading.Thread(target=kept.take, args=(adapter, tokens, "layer", i)) for i in range(GROUP)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(adapter.batches) == 1


def test_pickling_drops_what_is_kept():
    adapter, kept = Counting(), CleanGroups()
    tokens = _tokens([2] * 3)
    kept.take(adapter, tokens, "layer", 0)
    shipped = pickle.loads(pickle.dumps(kept))
    assert shipped._kept == {} and shipped._adapter is None
    shipped.take(adapter, tokens, "layer", 1)
    assert len(adapter.batches) == 2


def test_ray_dispatch_sends_a_groups_prompts_to_the_worker_that_took_its_first():
    of = [0] * 8 + [1] * 8
    queue, owners, alive = deque(range(16)), {}, [True, True]
    took = [next_for(queue, w, owners, of, alive) for w in (0, 1, 0, 1, 0, 1)]
    assert took == [0, 8, 1, 9, 2, 10]  # worker 1 skips group 0, owned by worker 0
    alive[0] = False  # worker 0 died: its group goes to the next live worker that asks
    assert next_for(queue, 1, owners, of, alive) == 3 and owners[0] == 1


def test_ray_dispatch_lets_an_idle_worker_take_another_workers_group_at_the_end():
    of = [0] * 4
    queue, owners = deque([2, 3]), {0: 0}
    assert next_for(queue, 1, owners, of, [True, True]) == 2  # computed again there
    assert list(queue) == [3]
