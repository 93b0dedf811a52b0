"""Tests of surgery/map/leaves.py: which modules the map keeps opaque, and which it traces
through (subclasses of leaf types with a forward of their own)."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from surgery import LoRAPass, UnsupportedSiteError, apply_passes, list_targets
from surgery.map.graphs import call_sites
from surgery.map.leaves import is_leaf_type, is_linear_like, runs_own_forward
from surgery.targets import model_map

from hf_families import adapted_sites, build


class ShiftedPositions(nn.Embedding):
    """Like OPT's learned positions: an embedding whose forward takes a mask, not ids."""

    def forward(self, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.cumsum(attention_mask, dim=1) * attention_mask - 1
        return super().forward(positions + 2)


class Plain(nn.Embedding):
    """A subclass that keeps torch's own forward."""


def test_a_subclass_with_its_own_forward_is_no_leaf() -> None:
    assert runs_own_forward(Plain(4, 2), (nn.Embedding,))
    assert not runs_own_forward(ShiftedPositions(4, 2), (nn.Embedding,))
    assert is_leaf_type(Plain(4, 2)) and is_leaf_type(nn.Embedding(4, 2))
    assert not is_leaf_type(ShiftedPositions(4, 2))
    assert not is_linear_like(ShiftedPositions(4, 2))
    mha = nn.MultiheadAttention(8, 2)
    assert is_leaf_type(mha) and not is_linear_like(mha)


def test_known_leaf_types_with_a_forward_of_their_own() -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.pytorch_utils import Conv1D

    assert is_linear_like(Conv1D(6, 4))  # stores (in, out)
    assert is_linear_like(FalconLinear(4, 6))  # x @ W.T + b, one input: a linear layer
    assert is_leaf_type(FalconLinear(4, 6))


@pytest.mark.parametrize(("family", "positions"), [
    ("opt", "model.decoder.embed_positions"),
    ("bart", "model.encoder.embed_positions"),
])
def test_learned_positions_are_traced_through(family: str, positions: str) -> None:
    model = build(family)
    assert isinstance(model.get_submodule(positions), nn.Embedding)
    called = call_sites(model_map(model))

    def callee(qname: str) -> nn.Module:
        (site,) = called[qname]
        return site.owner.get_submodule(str(site.node.target))

    # traced through (a graph of its own), not the real module called with one tensor
    assert isinstance(getattr(callee(positions), "graph", None), fx.Graph)
    tokens = positions.replace("embed_positions", "embed_tokens")
    if type(model.get_submodule(tokens)) is nn.Embedding:  # OPT's: a plain leaf
        assert type(callee(tokens)) is nn.Embedding
    else:  # BART's scales its output in a forward of its own
        assert isinstance(getattr(callee(tokens), "graph", None), fx.Graph)


@pytest.mark.parametrize("family", ["opt", "bart"])
def test_lora_by_pattern_and_by_role_on_learned_positions_models(family: str) -> None:
    model = build(family)
    ids = torch.tensor([[3, 4, 5, 6]])
    kwargs = {"decoder_input_ids": torch.tensor([[1, 3]])} if family == "bart" else {}
    with torch.no_grad():
        base = model(ids, **kwargs).logits
    by_pattern = apply_passes(model, [LoRAPass(pattern=["q_proj", "v_proj"], rank=2)])
    by_role = apply_passes(model, [LoRAPass(rank=2)])
    picked = adapted_sites(by_pattern, "lora")
    assert picked == adapted_sites(by_role, "lora")
    layers = 2 if family == "opt" else 6  # BART: encoder self, decoder self and cross
    assert len(picked) == 2 * layers
    assert all(q.endswith(("q_proj", "v_proj")) for q in picked)
    for adapted in (by_pattern, by_role):
        with torch.no_grad():
            assert torch.equal(adapted(ids, **kwargs).logits, base)  # identity at init
    with_inputs = apply_passes(model, [LoRAPass(rank=2)], example_inputs=(ids,),
                               example_kwargs=kwargs or None)
    assert adapted_sites(with_inputs, "lora") == picked


def test_learned_positions_are_not_offered_to_lora() -> None:
    model = build("opt")
    names = [t.qname for t in list_targets(model)]
    assert "model.decoder.embed_tokens" in names
    assert "model.decoder.embed_positions" not in names
    with pytest.raises(UnsupportedSiteError,
                       match=r"embed_positions, a OPTLearnedPositionalEmbedding"):
        apply_passes(model, [LoRAPass(pattern="embed_positions", rank=2)])
    plain = apply_passes(model, [LoRAPass(pattern="embed_tokens", rank=2)])
    assert adapted_sites(plain, "lora") == ["model.decoder.embed_tokens"]


def test_a_hand_written_model_with_an_own_forward_embedding() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(10, 8)
            self.positions = ShiftedPositions(12, 8)
            self.out = nn.Linear(8, 8)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.out(self.tokens(ids) + self.positions(mask))

    called = call_sites(model_map(Net()))
    assert sorted(called) == ["out", "tokens"]  # fx: ShiftedPositions traced through
