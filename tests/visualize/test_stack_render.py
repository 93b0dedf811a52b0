"""Drawing a stack of named adapters: every adapter's nodes say its name, and the nodes of
switched-off adapters (``surgery.adapters.active.set_active``) are greyed out with a dashed border."""

from __future__ import annotations

import re

import pytest
from torch import nn

from surgery import IA3Pass, LoRAPass, apply_passes
from surgery.adapters.active import disable_adapters, set_active
from surgery.zoo import load_model
from visualize import Palette, to_dot, to_networkx
from visualize.dot import quote
from visualize.style import INACTIVE_BORDER, INACTIVE_FILL, node_style


@pytest.fixture(scope="module")
def stacked() -> nn.Module:
    spec = load_model("builtin")
    return apply_passes(spec.model, [LoRAPass(pattern="q_proj", rank=2, name="sst2"),
                                     LoRAPass(pattern="q_proj", rank=2, name="mnli"),
                                     IA3Pass(pattern="k_proj", name="mnli")])


def _adapter_nodes(graph, name: str) -> dict[str, dict]:
    return {nid: a for nid, a in graph.nodes(data=True)
            if (a.get("provenance") or {}).get("adapter") == name}


def _attrs_of(dot: str, node_id: str) -> str:
    match = re.search(rf"^\s*{re.escape(quote(node_id))} \[(.*)\];$", dot, re.M)
    assert match, f"no node {node_id} in DOT"
    return match.group(1)


def test_inactive_adapter_nodes_are_greyed_and_named(stacked: nn.Module) -> None:
    all_on = to_dot(to_networkx(stacked))
    set_active(stacked, "sst2")
    try:
        graph = to_networkx(stacked)
        dot = to_dot(graph)
    finally:
        set_active(stacked, None)
    mnli, sst2 = _adapter_nodes(graph, "mnli"), _adapter_nodes(graph, "sst2")
    # per q_proj call: dropout, A, B, scale, add; per k_proj: IA3's vector l and its scaling
    assert len(sst2) == 2 * 5 and len(mnli) == 2 * 5 + 2 * 2
    assert all(a["provenance"]["active"] is False for a in mnli.values())
    assert all("active" not in a["provenance"] for a in sst2.values())
    for nid, attrs in mnli.items():
        text = _attrs_of(dot, nid)
        assert f'fillcolor="{INACTIVE_FILL}"' in text and f'color="{INACTIVE_BORDER}"' in text
        assert re.search(r'style="[^"]*dashed', text)
        assert "mnli" in text.split("shape=")[0]  # the adapter's name is in the label
    for nid in sst2:
        text = _attrs_of(dot, nid)
        assert INACTIVE_FILL not in text and "dashed" not in text and "sst2" in text
    assert to_dot(to_networkx(stacked)) == all_on  # switching back leaves no trace


def test_disabled_adapters_are_drawn_inactive_only_inside_the_block(stacked: nn.Module) -> None:
    with disable_adapters(stacked):
        inside = to_networkx(stacked)
    after = to_networkx(stacked)
    inserted = [a for _, a in inside.nodes(data=True) if a.get("provenance")]
    assert inserted and all(a["provenance"].get("active") is False for a in inserted)
    assert not any((a.get("provenance") or {}).get("active") is False
                   for _, a in after.nodes(data=True))


def test_style_rule() -> None:
    attrs = {"op": "call_module", "pass_name": "lora", "provenance": {"active": False}}
    style = node_style(attrs, Palette())
    assert (style.category, style.fill, style.border, style.style) == (
        "pass:lora", INACTIVE_FILL, INACTIVE_BORDER, "rounded,filled,dashed")
    attrs["provenance"] = {"adapter": "x"}
    assert node_style(attrs, Palette()).fill == Palette().for_pass("lora")[0]
