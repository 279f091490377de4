"""Site names and the downstream rule of Eq 33 (docs/conventions.md, "Compensatory effect")."""

import pytest

from causalnet.errors import UnknownNodeError
from causalnet.sites import (
    Site,
    downstream_masks,
    downstream_mixer_mask,
    is_downstream,
    parse_site,
    parse_site_set,
    unit_sort_key,
)


def test_site_names_parse_to_kind_layer_head_numbered_from_zero():
    assert parse_site("embed") == Site("embed", "embed", -1)
    assert parse_site("attn.0") == Site("attn.0", "attn", 0)
    assert parse_site("mlp.29") == Site("mlp.29", "mlp", 29)
    assert parse_site("attn.12.h3") == Site("attn.12.h3", "head", 12, 3)


@pytest.mark.parametrize("bad", ["attn", "attn.-1", "mlp.1.h2", "resid.3", "attn.1.3", ""])
def test_malformed_site_names_raise_naming_the_site(bad):
    with pytest.raises(UnknownNodeError, match=repr(bad)):
        parse_site(bad)


def test_sequential_attention_ablation_has_its_own_layers_mlp_downstream():
    a = parse_site("attn.3")
    assert is_downstream(parse_site("mlp.3"), a, parallel_residual=False)
    assert not is_downstream(parse_site("attn.3"), a, parallel_residual=False)
    assert is_downstream(parse_site("attn.4"), a, parallel_residual=False)
    assert not is_downstream(parse_site("mlp.2"), a, parallel_residual=False)


def test_parallel_residual_attention_ablation_leaves_its_own_layers_mlp_upstream():
    a = parse_site("attn.3")
    assert not is_downstream(parse_site("mlp.3"), a, parallel_residual=True)
    assert is_downstream(parse_site("mlp.4"), a, parallel_residual=True)


def test_mlp_ablation_has_only_later_layers_downstream():
    m = parse_site("mlp.3")
    assert not is_downstream(parse_site("attn.3"), m, parallel_residual=False)
    assert not is_downstream(parse_site("mlp.3"), m, parallel_residual=False)
    assert is_downstream(parse_site("attn.4"), m, parallel_residual=False)
    assert is_downstream(parse_site("mlp.4"), m, parallel_residual=False)


def test_heads_of_the_same_layer_are_not_downstream_of_each_other():
    h = parse_site("attn.2.h0")
    assert not is_downstream(parse_site("attn.2.h1"), h, parallel_residual=False)
    assert is_downstream(parse_site("attn.3.h1"), h, parallel_residual=False)
    assert is_downstream(parse_site("mlp.2"), h, parallel_residual=False)


def test_embedding_is_never_downstream():
    for s in ["attn.0", "mlp.0", "attn.0.h0"]:
        assert not is_downstream(parse_site("embed"), parse_site(s), parallel_residual=False)


def test_downstream_masks_partition_readouts_into_attn_mlp_self_and_upstream():
    readouts = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1"]
    down_attn, down_mlp, self_mask = downstream_masks(["attn.0", "mlp.1"], readouts, False)
    assert down_attn.tolist() == [[False, False, False, True, False], [False] * 5]
    assert down_mlp.tolist() == [[False, False, True, False, True], [False] * 5]
    assert self_mask.tolist() == [
        [False, True, False, False, False],
        [False, False, False, False, True],
    ]
    assert not (down_attn & down_mlp).any() and not (down_attn & self_mask).any()


def test_mixer_sites_parse_and_sort_in_residual_order():
    assert parse_site("mixer.0") == Site("mixer.0", "mixer", 0)
    assert parse_site("mixer.17").layer == 17
    assert not parse_site("mixer.3").is_attention
    assert unit_sort_key("mixer.1") < unit_sort_key("mixer.2") < unit_sort_key("mixer.10")
    assert parse_site_set("mixer.3+mixer.1").name == "mixer.1+mixer.3"


@pytest.mark.parametrize("bad", ["mixer", "mixer.-1", "mixer.1.h0", "mixers.2"])
def test_malformed_mixer_names_raise_listing_the_mixer_form(bad):
    with pytest.raises(UnknownNodeError, match="'mixer.L'"):
        parse_site(bad)


def test_later_mixers_only_are_downstream_of_a_mixer_and_all_of_the_embedding():
    m = parse_site("mixer.2")
    assert is_downstream(parse_site("mixer.3"), m, parallel_residual=False)
    assert not is_downstream(parse_site("mixer.2"), m, parallel_residual=False)
    assert not is_downstream(parse_site("mixer.1"), m, parallel_residual=False)
    assert not is_downstream(parse_site("embed"), m, parallel_residual=False)
    e = parse_site("embed")
    assert all(is_downstream(parse_site(f"mixer.{i}"), e, False) for i in range(3))


def test_mixer_readouts_fall_in_the_mixer_mask_not_the_attention_or_mlp_masks():
    readouts = ["embed", "mixer.0", "mixer.1", "mixer.2"]
    down_attn, down_mlp, self_mask = downstream_masks(
        ["mixer.0", "mixer.1+mixer.2"], readouts, False
    )
    assert not down_attn.any() and not down_mlp.any()
    mixer = downstream_mixer_mask(["mixer.0", "mixer.1+mixer.2", "embed"], readouts, False)
    assert mixer.tolist() == [
        [False, False, True, True],
        [False, False, False, False],
        [False, True, True, True],
    ]
    assert self_mask.tolist() == [[False, True, False, False], [False, False, True, True]]
