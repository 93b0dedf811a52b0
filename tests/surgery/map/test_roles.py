"""Tests of surgery/roles.py: structural roles found from the graph, on every front end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery import ConfigError, find_roles, trace
from surgery.map.roles import normalize_roles

ATTN = ("query", "key", "value", "attn_out")


def _roles(model_roles, qname: str) -> set[str]:
    info = model_roles.role_of(qname)
    return set(info.roles) if info else set()


class EagerAttention(nn.Module):
    """Hand-written attention: ``softmax(q @ k^T / sqrt(d) + mask) @ v``, then ``out``."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.wq, self.wk, self.wv, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones_like(scores, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = F.softmax(scores, dim=-1)
        y = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, d)
        return self.out(y)


class GatedFFN(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.w2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class EagerBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = EagerAttention()
        self.ffn = GatedFFN()
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return self.head(x + self.ffn(x))


def test_hand_written_eager_attention_on_fx() -> None:
    traced = trace(EagerBlock())
    assert traced._surgery_map.frontend == "fx"
    roles = find_roles(traced)
    assert [op.kind for op in roles.attention] == ["eager"]
    op = roles.attention[0]
    assert (op.query, op.key, op.value, op.out) == (["attn.wq"], ["attn.wk"], ["attn.wv"], ["attn.out"])
    for qname, role in zip(("attn.wq", "attn.wk", "attn.wv", "attn.out"), ATTN):
        assert _roles(roles, qname) == {role}
    assert _roles(roles, "ffn.w1") == {"ffn_gate"}
    assert _roles(roles, "ffn.w3") == {"ffn_up"}
    assert _roles(roles, "ffn.w2") == {"ffn_down"}
    assert roles.role_of("head") is None
    assert roles.with_role(["key", "ffn_down"]) == ["attn.wk", "ffn.w2"]


def test_tiny_transformer(zoo) -> None:
    roles = find_roles(zoo.traced("builtin:tiny"))
    assert [op.kind for op in roles.attention] == ["sdpa", "sdpa"]
    for i in range(2):
        for proj, role in zip(("q_proj", "k_proj", "v_proj", "o_proj"), ATTN):
            assert _roles(roles, f"layers.{i}.attn.{proj}") == {role}
        assert _roles(roles, f"layers.{i}.mlp.up_proj") == {"ffn_up"}
        assert _roles(roles, f"layers.{i}.mlp.down_proj") == {"ffn_down"}
    assert roles.role_of("lm_head") is None and roles.role_of("embed") is None


def test_gpt2_fused_qkv_with_slices(zoo) -> None:
    roles = find_roles(zoo.traced("hf:gpt2"))
    assert [op.kind for op in roles.attention] == ["sdpa", "sdpa"]
    for i in range(2):
        info = roles.role_of(f"transformer.h.{i}.attn.c_attn")
        assert info.roles == {"query", "key", "value"} and info.is_fused
        assert info.fused == {"query": (0, 64), "key": (64, 128), "value": (128, 192)}
        assert info.label == "qkv (fused)"
        assert _roles(roles, f"transformer.h.{i}.attn.c_proj") == {"attn_out"}
        assert _roles(roles, f"transformer.h.{i}.mlp.c_fc") == {"ffn_up"}
        assert _roles(roles, f"transformer.h.{i}.mlp.c_proj") == {"ffn_down"}
    assert roles.role_of("lm_head") is None


def test_llama_projections_and_gated_ffn(zoo) -> None:
    roles = find_roles(zoo.traced("hf:llama"))
    assert [op.kind for op in roles.attention] == ["sdpa", "sdpa"]
    for i in range(2):
        pre = f"model.layers.{i}"
        for proj, role in zip(("q_proj", "k_proj", "v_proj", "o_proj"), ATTN):
            assert _roles(roles, f"{pre}.self_attn.{proj}") == {role}
        assert _roles(roles, f"{pre}.mlp.gate_proj") == {"ffn_gate"}
        assert _roles(roles, f"{pre}.mlp.up_proj") == {"ffn_up"}
        assert _roles(roles, f"{pre}.mlp.down_proj") == {"ffn_down"}
        assert not roles.role_of(f"{pre}.self_attn.k_proj").is_fused


def _check_bert(roles, kind: str) -> None:
    assert [op.kind for op in roles.attention] == [kind, kind]
    for i in range(2):
        pre = f"encoder.layer.{i}"
        for proj, role in zip(("self.query", "self.key", "self.value", "output.dense"), ATTN):
            assert _roles(roles, f"{pre}.attention.{proj}") == {role}
        assert _roles(roles, f"{pre}.intermediate.dense") == {"ffn_up"}
        assert _roles(roles, f"{pre}.output.dense") == {"ffn_down"}
    assert roles.role_of("pooler.dense") is None


def test_bert_sdpa(zoo) -> None:
    _check_bert(find_roles(zoo.traced("hf:bert")), "sdpa")


def test_bert_eager_attention() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 128, (2, 8))
    traced = trace(model, (ids,), {"attention_mask": torch.ones_like(ids)})
    _check_bert(find_roles(traced), "eager")


def test_multihead_attention_plays_attention(zoo) -> None:
    roles = find_roles(zoo.traced("builtin:encoder"))
    assert [op.kind for op in roles.attention] == ["mha", "mha"]
    for i in range(2):
        assert _roles(roles, f"layers.{i}.self_attn") == {"attention"}
        assert _roles(roles, f"layers.{i}.linear1") == {"ffn_up"}
        assert _roles(roles, f"layers.{i}.linear2") == {"ffn_down"}
        assert roles.role_of(f"layers.{i}.self_attn.out_proj") is None


def test_a_classification_head_is_not_a_feed_forward_block(zoo) -> None:
    """Linear, activation, linear that ends at another width (a classifier head: pooler →
    labels) plays no feed-forward role; a transformer's feed-forward block maps its width to
    itself."""
    roles = find_roles(zoo.traced("builtin:convnet"))
    assert roles.attention == [] and roles.modules == {}
    tf = pytest.importorskip("transformers")
    config = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, num_labels=3)
    model = tf.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 128, (2, 7))
    found = find_roles(trace(model, (ids,)))
    assert found.role_of("bert.pooler.dense") is None and found.role_of("classifier") is None
    assert _roles(found, "bert.encoder.layer.1.output.dense") == {"ffn_down"}
    assert _roles(found, "bert.encoder.layer.1.intermediate.dense") == {"ffn_up"}


def test_roles_of_an_adapted_model_are_those_of_its_layers(zoo) -> None:
    from surgery import IA3Pass, LoRAPass, apply_passes
    from surgery.targets import model_roles

    adapted = apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(pattern="attn.*"), IA3Pass()])
    roles = model_roles(adapted)  # the map of an adapted model reads site graphs as their layers
    assert _roles(roles, "layers.0.attn.q_proj") == {"query"}
    assert _roles(roles, "layers.1.attn.v_proj") == {"value"}
    assert _roles(roles, "layers.1.attn.o_proj") == {"attn_out"}
    assert _roles(roles, "layers.1.mlp.down_proj") == {"ffn_down"}
    assert not any("lora" in q or "ia3" in q for q in roles.modules)


def test_role_aliases_and_unknown_roles() -> None:
    assert normalize_roles(["q", "v", "value", "down", "o"]) == ("query", "value", "ffn_down", "attn_out")
    assert normalize_roles(None) == ()
    with pytest.raises(ConfigError, match=r"unknown role 'qeury'; nearest valid roles: query"):
        normalize_roles("qeury")
