"""The sweep's clean runs, a group of consecutive prompts at a time: one padded forward each.

A clean run of one prompt of ~10 tokens is bound by reading the model's weights from memory;
``adapter.clean_runs`` of several prompts reads them once for all (measured on a random Qwen3
of SmolLM2-135M's size, 8 known_1000 prompts on 2 CPU cores: 24 ms per prompt, against ~60 ms
each alone). :class:`CleanGroups` computes the clean runs of a prompt's group at the first
request for one of them and hands each run out once.

Groups are fixed by the plan's tokens alone (:func:`groups`): runs of at most :data:`GROUP`
consecutive prompts whose padded batch (prompts x the longest) stays within
:data:`GROUP_TOKENS` tokens. So every executor, in any order, and a resumed sweep run each
prompt's clean run in the batch a fresh serial sweep would: the same numbers, byte for byte
(a batched forward's rounding may differ from a single prompt's by float32 rounding; it never
depends on which prompts are still to do). The most recent :data:`KEEP` groups are kept, so
memory stays bounded whatever the order; a prompt asked for again (or after its group was
dropped) gets its group computed again, with the same numbers.

Thread-safe: a group is computed once while other threads wait for it (the thread executor's
prompts then patch side by side). Pickling (a plan shipped to Ray workers) drops what is kept.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..adapters import CleanRun

#: Most prompts whose clean runs share one forward.
GROUP = 8
#: Most tokens of one group's padded batch (prompts x the longest): the batch's activations and
#: a discovered model's logits at every position ([tokens, vocabulary]) stay small.
GROUP_TOKENS = 256
#: Groups kept at once (the thread executor has at most 2 x threads prompts in flight).
KEEP = 4


def groups(lengths: list[int]) -> list[range]:
    """Consecutive prompt indices, in order, cut where a group would pass :data:`GROUP` prompts
    or :data:`GROUP_TOKENS` padded tokens; a prompt longer than that is a group of its own.

    >>> groups([5, 5, 5, 100, 5])
    [range(0, 3), range(3, 5)]
    """
    out: list[range] = []
    start, longest = 0, 0
    for i, n in enumerate(lengths):
        wider = max(longest, n)
        if i > start and (i - start >= GROUP or (i - start + 1) * wider > GROUP_TOKENS):
            out.append(range(start, i))
            start, wider = i, n
        longest = wider
    if lengths:
        out.append(range(start, len(lengths)))
    return out


def group_numbers(lengths: list[int]) -> list[int]:
    """Each prompt's group number under :func:`groups`."""
    return _numbers(groups(lengths))


def _numbers(cut: list[range]) -> list[int]:
    return [g for g, members in enumerate(cut) for _ in members]


def next_for(
    queue: deque[int], worker: int, owners: dict[int, int], group_of: list[int], alive: list[bool]
) -> int:
    """Pop from ``queue`` the next prompt for ``worker`` so that a group's prompts go to one
    worker (each worker computes a group's clean runs once, for all of it): the first prompt of
    a group this worker owns, or that no live worker owns (the worker takes it over); failing
    both, the first prompt (another worker's group: computed again there, same numbers). Ray's
    dispatch (:class:`causalnet.hydra.distributed.RayExecutor`).

    >>> q, owners, of = deque([0, 1, 2, 3]), {}, [0, 0, 1, 1]
    >>> next_for(q, 0, owners, of, [True, True]), next_for(q, 1, owners, of, [True, True])
    (0, 2)
    """
    for k, index in enumerate(queue):
        owner = owners.get(group_of[index])
        if owner is None or owner == worker or not alive[owner]:
            owners[group_of[index]] = worker
            del queue[k]
            return index
    return queue.popleft()


class CleanGroups:
    """The clean runs of a plan's prompts, computed a group at a time (module docstring).

    A kept run is handed out only for the adapter, granularity and tokens it was computed from:
    asked with another list of prompts (even of the same lengths), another granularity or
    another model, the group is computed again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # group number -> prompt index -> (its tokens, granularity, clean run)
        self._kept: OrderedDict[int, dict[int, tuple[Tensor, str, CleanRun]]] = OrderedDict()
        self._lengths: list[int] = []
        self._of: list[int] = []  # prompt index -> its group's number
        self._groups: list[range] = []
        self._adapter: weakref.ref | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def take(self, adapter: Any, tokens: list[Tensor], granularity: str, index: int) -> CleanRun:
        """Prompt ``index``'s clean run (``tokens[index]``), computed with its group's."""
        with self._lock:
            if self._adapter is None or self._adapter() is not adapter:
                self._kept.clear()  # runs of another model
                self._adapter = weakref.ref(adapter)
            lengths = [len(t) for t in tokens]
            if lengths != self._lengths:
                self._kept.clear()  # another list of prompts
                self._lengths = lengths
                self._groups = groups(lengths)
                self._of = _numbers(self._groups)
            g = self._of[index]
            runs = self._kept.get(g)
            hit = None if runs is None else runs.get(index)
            if hit is None or hit[1] != granularity or not torch.equal(hit[0], tokens[index]):
                members = self._groups[g]
                batch = [tokens[j] for j in members]
                computed = adapter.clean_runs(batch, granularity)
                runs = {
                    j: (tokens[j], granularity, c) for j, c in zip(members, computed, strict=True)
                }
                self._kept[g] = runs
            self._kept.move_to_end(g)
            while len(self._kept) > KEEP:
                self._kept.popitem(last=False)
            return runs.pop(index)[2]
