"""Tests of surgery/targets.py: candidates and selection over the user's module tree (no
tracing for names), layer sizes whatever the weight layout, and the warning for a LoRA rank
above what a layer can hold."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from surgery import (
    LoRAPass,
    NoMatchError,
    UnsupportedSiteError,
    apply_passes,
    list_targets,
)
from surgery.map.leaves import is_linear_like
from surgery.sites.features import layer_features, warn_rank_exceeds
from surgery.targets import candidate_sites, resolve_sites


def test_layer_features_read_in_then_out_for_every_layout() -> None:
    assert layer_features(nn.Linear(3, 5)) == (3, 5)
    assert layer_features(nn.Conv2d(3, 8, 3)) == (3, 8)
    assert layer_features(nn.ConvTranspose1d(4, 6, 2)) == (4, 6)  # weight (in, out, k)
    assert layer_features(nn.Embedding(100, 16)) == (100, 16)
    assert layer_features(nn.MultiheadAttention(16, 2)) == (16, 16)
    assert layer_features(nn.ReLU()) is None
    tf = pytest.importorskip("transformers")
    conv1d = tf.pytorch_utils.Conv1D(12, 4)  # nf=12 outputs, nx=4 inputs; weight (4, 12)
    assert tuple(conv1d.weight.shape) == (4, 12) and layer_features(conv1d) == (4, 12)


def test_a_rank_above_min_in_out_warns_naming_the_layers() -> None:
    model = nn.Sequential(nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 32), nn.Linear(32, 32))
    sites = resolve_sites(model, pass_name="LoRAPass", pattern="*", role=None, exclude=None,
                          default_roles=(), accept=is_linear_like, accepted_types="nn.Linear")
    with pytest.warns(UserWarning) as record:
        warn_rank_exceeds(sites, 8, pass_name="LoRAPass")
    assert [str(w.message) for w in record] == [
        "LoRAPass: rank 8 is larger than min(in_features, out_features) of 0 (Linear, 32 -> 4), "
        "2 (Linear, 4 -> 32); the update B A there cannot have a rank above that minimum, so the "
        "extra rank only adds parameters. Way out: a smaller rank, or exclude=... those layers."]
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_rank_exceeds(sites, 4, pass_name="LoRAPass")  # rank 4 fits every layer


class Tied(nn.Module):
    """One ``nn.Linear`` object under two names, called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = self.first
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(x)))


def test_a_shared_module_is_one_candidate_with_every_name() -> None:
    sites = candidate_sites(Tied(), is_linear_like)
    assert list(sites) == ["first", "head"]
    assert sites["first"].aliases == ("first", "second")


def test_a_shared_module_gets_one_adapter_used_at_every_call() -> None:
    model = Tied()
    adapted = apply_passes(model, [LoRAPass(pattern="second", rank=2)])
    assert adapted.first is adapted.second, "one site graph under both names"
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == [
        "first.lora_A.default.weight", "first.lora_B.default.weight"]
    with torch.no_grad():
        adapted.first.lora_B.default.weight.fill_(0.1)
    site = adapted.first
    x = torch.randn(3, 6)

    def lora(v: torch.Tensor) -> torch.Tensor:  # scaling = alpha / rank = 8 / 2
        return model.first(v) + site.lora_B.default(site.lora_A.default(v)) * 4.0

    with torch.no_grad():
        assert torch.equal(adapted(x), model.head(lora(lora(x)))), "both calls adapted"
        assert not torch.equal(adapted(x), model(x))


def test_the_model_itself_is_a_candidate_when_it_is_one_layer() -> None:
    assert list(candidate_sites(nn.Linear(4, 4), is_linear_like)) == [""]
    assert [t.qname for t in list_targets(nn.Linear(4, 4))] == [""]


def test_selection_by_name_never_traces_and_names_near_misses() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(NoMatchError, match="'3'"):
        apply_passes(model, [LoRAPass(pattern="3")])
    with pytest.raises(UnsupportedSiteError, match=r"pattern '1' selects 1, a ReLU; LoRAPass adapts"):
        apply_passes(model, [LoRAPass(pattern="1")])


def test_layers_inside_multihead_attention_are_refused_by_name() -> None:
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(UnsupportedSiteError, match=r"selects self_attn.out_proj \(inside self_attn\), "
                                                   r"part of an nn.MultiheadAttention"):
        apply_passes(model, [LoRAPass(pattern="out_proj")])


def test_a_pattern_that_misses_a_one_layer_model_says_how_to_select_it() -> None:
    with pytest.raises(NoMatchError, match=r"The only candidate is the model itself, a single "
                                           r"layer: select it with pattern='\*'"):
        apply_passes(nn.Linear(4, 4), [LoRAPass(pattern="q_proj")])
