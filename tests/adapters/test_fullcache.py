"""A model whose own cache decodes off its own forward is replayed from a plain cache
(causalnet.adapters.fullcache): Moshi's config has a sliding window its forward does not use."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from causalnet.adapters import adapt
from causalnet.adapters.finalrows import cached_step_error
from causalnet.adapters.fullcache import cache_kwargs, mark, marked
from causalnet.adapters.tiny_configs import probe_tokens, tiny_model
from causalnet.adapters.verify import check_patching


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_a_model_off_its_own_cache_is_patched_fast_from_a_plain_cache(dtype, atol):
    model = tiny_model("moshi").to(dtype)
    tokens = probe_tokens(model.config.vocab_size, 9, seed=3)
    # transformers 5.24: the window-4 cache its config makes decodes far off its forward
    assert cached_step_error(model, tokens) > 0.1
    adapter = adapt(model)
    assert marked(model) and "plain DynamicCache" in adapter.cache_note
    assert cached_step_error(model, tokens) < atol  # its cached forwards now keep every key
    assert adapter.fast_refusal is None
    # patches against one hooked full forward per row (the model's own logits, no cache)
    assert check_patching(adapter, tokens, granularity="layer", n_patches=2) < atol


def test_a_model_whose_own_cache_decodes_its_forward_keeps_it():
    model = tiny_model("mistral", sliding_window=4)  # a window its forward does use
    adapter = adapt(model, generic=True)
    assert adapter.cache_note is None and not marked(model)
    kwargs = {"use_cache": True}
    assert cache_kwargs(model, kwargs) == {}


def test_only_a_marked_model_keeping_a_cache_without_one_gets_a_plain_cache():
    model = tiny_model("llama")
    assert cache_kwargs(model, {"use_cache": True}) == {}
    mark(model)
    assert cache_kwargs(model, {"use_cache": False}) == {}
    given = DynamicCache()
    for key in ("past_key_values", "cache"):
        assert cache_kwargs(model, {"use_cache": True, key: given}) == {}
    added = cache_kwargs(model, {"use_cache": True})
    assert list(added) in (["cache"], ["past_key_values"])
    (cache,) = added.values()
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 0
