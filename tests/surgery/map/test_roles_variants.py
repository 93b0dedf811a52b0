"""Tests of surgery/map/roles.py and fused.py on attention variants of transformers
families: logit soft-capping, sliding windows, ALiBi, relative positions, fused q/k/v
layouts, and cross-attention in encoder-decoder models."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from surgery import LoRAPass, NoMatchError, apply_passes, list_targets
from surgery.map.roles import normalize_roles
from surgery.targets import model_roles

from hf_families import adapted_sites, build


def _with(roles, role: str) -> list[str]:
    """Modules of the first block of each stack playing ``role``."""
    return sorted(q for q in roles.with_role([role]) if re.search(r"\b(block|layers)\.0\.", q))


@pytest.mark.parametrize(("family", "prefix"), [
    ("gemma2", "model.layers.0.self_attn."),  # tanh soft-capping between q @ k^T and softmax
    ("mistral", "model.layers.0.self_attn."),  # sliding window
    ("falcon", "transformer.h.0.self_attention."),  # ALiBi
])
def test_query_and_value_survive_attention_variants(family: str, prefix: str) -> None:
    roles = model_roles(build(family))
    if family == "falcon":
        fused = roles.role_of(prefix + "query_key_value")
        assert fused.roles == {"query", "key", "value"}
        assert roles.role_of(prefix + "dense").roles == {"attn_out"}
        return
    for name, role in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                       ("o_proj", "attn_out")):
        assert roles.role_of(prefix + name).roles == {role}, name


def test_bloom_alibi_baddbmm_finds_the_query() -> None:
    roles = model_roles(build("bloom"))
    info = roles.role_of("transformer.h.0.self_attention.query_key_value")
    assert info.roles == {"query", "key", "value"}  # q and k are baddbmm's batch1, batch2
    assert info.is_fused and info.label == "qkv (fused)"


@pytest.mark.parametrize(("family", "qname", "slices"), [
    ("gpt2", "transformer.h.0.attn.c_attn",
     {"query": (0, 32), "key": (32, 64), "value": (64, 96)}),
    # grouped-query: 4 query heads, 2 key/value heads of 8
    ("phi3", "model.layers.0.self_attn.qkv_proj",
     {"query": (0, 32), "key": (32, 48), "value": (48, 64)}),
    # multi-query: view(b, s, heads + 2, hd) then split([4, 1, 1], dim=-2)
    ("falcon", "transformer.h.0.self_attention.query_key_value",
     {"query": (0, 32), "key": (32, 40), "value": (40, 48)}),
    # per-head [q, k, v] layouts: no contiguous slice per role
    ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value", {}),
    ("bloom", "transformer.h.0.self_attention.query_key_value", {}),
])
def test_fused_projection_slices(family: str, qname: str, slices: dict) -> None:
    info = model_roles(build(family)).role_of(qname)
    assert info.is_fused
    assert info.fused == slices


@pytest.mark.parametrize(("family", "self_q", "cross_q"), [
    ("t5", ["decoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.q"],
     ["decoder.block.0.layer.1.EncDecAttention.q"]),
    ("bart", ["model.decoder.layers.0.self_attn.q_proj", "model.encoder.layers.0.self_attn.q_proj"],
     ["model.decoder.layers.0.encoder_attn.q_proj"]),
    ("whisper", ["model.decoder.layers.0.self_attn.q_proj",
                 "model.encoder.layers.0.self_attn.q_proj"],
     ["model.decoder.layers.0.encoder_attn.q_proj"]),
])
def test_self_and_cross_attention_are_told_apart(family: str, self_q: list, cross_q: list
                                                 ) -> None:
    model = build(family)
    roles = model_roles(model)
    assert _with(roles, "query") == sorted(self_q + cross_q)  # PEFT's default: both
    assert _with(roles, "cross_query") == cross_q
    assert _with(roles, "self_query") == sorted(self_q)
    cross = roles.role_of(cross_q[0])
    assert cross.is_cross and cross.roles == {"query", "cross_query"}
    assert cross.label == "query (cross)"
    assert roles.role_of(self_q[0]).label == "query"
    ops = [op for op in roles.attention if op.query and op.query[0] in self_q + cross_q]
    assert sorted((op.query[0], op.cross) for op in ops) == sorted(
        [(q, False) for q in self_q] + [(q, True) for q in cross_q])
    # passes select with them
    only_cross = apply_passes(model, [LoRAPass(role="cross_value", rank=2)])
    sites = adapted_sites(only_cross, "lora")
    assert sites and all(("EncDecAttention" in q or "encoder_attn" in q) for q in sites)
    only_self = apply_passes(model, [LoRAPass(role=["self_query", "self_value"], rank=2)])
    assert not any(("EncDecAttention" in q or "encoder_attn" in q)
                   for q in adapted_sites(only_self, "lora"))
    labels = {t.qname: t.role for t in list_targets(model)}
    assert labels[cross_q[0]] == "query (cross)"


def test_cross_and_self_role_names() -> None:
    assert normalize_roles(["cross_query", "self_value"]) == ("cross_query", "self_value")


def test_t5_relative_positions_keep_roles_in_every_block() -> None:
    roles = model_roles(build("t5"))
    for block in ("encoder.block.0", "encoder.block.1"):  # block 0 holds the position bias
        assert roles.role_of(f"{block}.layer.0.SelfAttention.q").roles == {"query"}
        assert roles.role_of(f"{block}.layer.1.DenseReluDense.wo").roles == {"ffn_down"}


class NoAttention(nn.Module):
    """Two stacked projections: no attention op, no feed-forward block."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"wq": nn.Linear(8, 8), "wv": nn.Linear(8, 8)})
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["wv"](block["wq"](x))
        return x


def test_no_role_found_names_the_model_and_the_candidates() -> None:
    with pytest.raises(NoMatchError) as err:
        apply_passes(NoAttention(), [LoRAPass(rank=2)])
    message = str(err.value)
    assert "no nn.Linear / Conv1D module of this NoAttention plays default role(s)" in message
    assert "the candidate layers are blocks.*.wq, blocks.*.wv" in message
    assert "pattern=['wq', 'wv']" in message
