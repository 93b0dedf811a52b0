"""Tests of surgery/select.py: the one selection dialect every pass speaks."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surgery import ConfigError, LoRAPass, NoMatchError, apply_passes, history
from surgery.select import as_patterns, matches, select_names

NAMES = [
    "embed",
    "layers.0.attn.q_proj",
    "layers.0.attn.k_proj",
    "layers.0.xattn.q_proj",
    "layers.0.mlp.up_proj",
    "layers.12.attn.q_proj",
    "lm_head",
]


@pytest.mark.parametrize("pattern,name,expected", [
    # suffix match, at a '.' boundary only
    ("attn.*", "layers.3.attn.q_proj", True),
    ("attn.*", "layers.3.xattn.q_proj", False),
    ("q_proj", "layers.0.attn.q_proj", True),
    ("proj", "layers.0.attn.q_proj", False),
    ("attn.q_proj", "layers.0.attn.q_proj", True),
    ("0.attn.q_proj", "layers.10.attn.q_proj", False),
    ("layers.3.attn.q_proj", "layers.3.attn.q_proj", True),
    # '*' and '?' stay inside one segment
    ("layers.*.q_proj", "layers.3.attn.q_proj", False),
    ("layers.*.attn.q_proj", "layers.3.attn.q_proj", True),
    ("*proj", "layers.0.attn.q_proj", True),
    ("attn.*", "layers.3.attn.q_proj.lora_A", False),
    ("layers.?.attn", "layers.1.attn", True),
    ("layers.?.attn", "layers.12.attn", False),
    # '**' spans segments; as a whole segment it may stand for none
    ("layers.**.q_proj", "layers.3.attn.q_proj", True),
    ("layers.**", "layers.3.attn.q_proj", True),
    ("layers.**", "layers", False),
    ("a.**.b", "a.b", True),
    ("a.**.b", "a.x.y.b", True),
    ("**.q_proj", "q_proj", True),
    ("**", "layers.0.attn.q_proj", True),
    ("lay**proj", "layers.0.attn.q_proj", True),
    ("attention.**", "encoder.layer.0.attention.self.query", True),
    # re: is a Python regex matched with fullmatch against the whole name
    ("re:.*q_proj", "layers.0.attn.q_proj", True),
    ("re:q_proj", "layers.0.attn.q_proj", False),
    (r"re:layers\.\d+\.attn\.(q|v)_proj", "layers.11.attn.v_proj", True),
    (r"re:layers\.\d+\.attn\.(q|v)_proj", "layers.11.attn.v_proj_extra", False),
    ("re:attn", "layers.0.attn", False),
    # special characters are literal in a glob
    ("a+b", "x.a+b", True),
    ("a+b", "x.aab", False),
])
def test_glob_and_regex_rules(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


def test_list_means_any_and_keeps_input_order() -> None:
    got = select_names(NAMES, ["up_proj", "re:layers\\.0\\.attn\\..*"])
    assert got == ["layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.mlp.up_proj"]


def test_none_selects_every_candidate_and_exclude_removes() -> None:
    assert select_names(NAMES, None) == NAMES
    got = select_names(NAMES, "q_proj", exclude=["xattn.*", "layers.12.**"])
    assert got == ["layers.0.attn.q_proj"]


def test_a_pattern_in_a_list_that_matches_nothing_raises_even_if_others_match() -> None:
    with pytest.raises(NoMatchError, match=r"LoRAPass: pattern 'atn\.\*' matches no module"):
        select_names(NAMES, ["attn.*", "atn.*"], pass_name="LoRAPass")


def test_an_exclude_pattern_that_matches_nothing_raises() -> None:
    with pytest.raises(NoMatchError, match=r"exclude pattern 'v_proj' matches no module"):
        select_names(NAMES, "attn.*", exclude="v_proj")


def test_no_match_lists_the_five_nearest_names() -> None:
    with pytest.raises(NoMatchError) as info:
        select_names(NAMES, "attn.qproj", pass_name="LoRAPass")
    msg = str(info.value)
    near = msg.split("Nearest candidates: ", 1)[1].split(". ", 1)[0].split(", ")
    assert len(near) == 5
    assert near[0] == "layers.0.attn.q_proj"
    assert set(near) <= set(NAMES)
    assert "surgery.list_targets(model)" in msg
    assert isinstance(info.value, ValueError)


def test_a_regex_without_its_prefix_is_answered_with_re() -> None:
    with pytest.raises(NoMatchError) as info:
        select_names(NAMES, r".*\.(q|k)_proj", pass_name="LoRAPass")
    assert ("The pattern contains regex syntax but is read as a glob: did you mean "
            "'re:.*\\.(q|k)_proj' (a regex, matched against the whole name); as a regex it "
            "matches 4 module(s) it can adapt?") in str(info.value)
    assert select_names(NAMES, r"re:.*\.(q|k)_proj") == [n for n in NAMES if "_proj" in n
                                                          and "up" not in n]


@pytest.mark.parametrize("pattern", ["atn.*", "layers.*.v_proj", "**.v_proj", "v_proj"])
def test_a_glob_that_matches_nothing_gets_no_regex_hint(pattern: str) -> None:
    with pytest.raises(NoMatchError) as info:
        select_names(NAMES, pattern, pass_name="LoRAPass")
    assert "re:" not in str(info.value).split("Way out")[0]


def test_no_match_mentions_modules_of_other_types() -> None:
    with pytest.raises(NoMatchError, match=r"matches only 1 module\(s\) that LoRAPass cannot "
                                           r"adapt: layers.0.ln \(the layers inside them: 'ln.\*\*'\)"):
        select_names(NAMES, "ln", pass_name="LoRAPass", all_names=NAMES + ["layers.0.ln"])


def test_no_match_on_a_real_model_names_nearest_sites(zoo) -> None:
    with pytest.raises(NoMatchError) as info:
        apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(pattern=["attn.q_proj", "attn.qproj"])])
    msg = str(info.value)
    assert "'attn.qproj'" in msg and "'attn.q_proj'" not in msg
    near = msg.split("Nearest candidates: ", 1)[1].split(". ", 1)[0].split(", ")
    assert len(near) == 5 and "layers.0.attn.q_proj" in near


@pytest.mark.parametrize("bad", ["", 3, None])
def test_patterns_must_be_non_empty_strings(bad: object) -> None:
    with pytest.raises(ConfigError, match="a pattern must be a non-empty string"):
        as_patterns(["attn.*", bad])  # type: ignore[list-item]


def test_excluding_the_whole_selection_says_so(zoo) -> None:
    with pytest.raises(NoMatchError) as info:
        apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(pattern="attn.*", exclude="attn.*")])
    assert str(info.value).startswith(
        "LoRAPass: the selection is empty after exclude='attn.*': it removed every module that "
        "pattern 'attn.*' selected (layers.0.attn.q_proj, layers.0.attn.k_proj, "
        "layers.0.attn.v_proj, layers.0.attn.o_proj, layers.1.attn.q_proj, ... (8 in all)).")
    with pytest.raises(NoMatchError, match=r"empty after exclude=\['q_proj', 'v_proj'\]: it "
                                           r"removed every module that was selected \(layers.0.attn.q_proj, "):
        apply_passes(zoo.spec("builtin:tiny").model, [LoRAPass(exclude=["q_proj", "v_proj"])])


@pytest.mark.parametrize("kwargs,message", [
    ({"pattern": []}, "a pattern list must hold at least one pattern, got an empty list"),
    ({"exclude": ()}, "a pattern list must hold at least one pattern, got an empty list"),
    ({"pattern": 3}, r"a pattern must be a string or a list of strings, got 3 \(int\)"),
    ({"pattern": True}, r"a pattern must be a string or a list of strings, got True \(bool\)"),
])
def test_empty_lists_and_non_strings_are_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LoRAPass(**kwargs)


def test_ia3_feedforward_must_be_patterns() -> None:
    from surgery import IA3Pass

    with pytest.raises(ConfigError, match=r"got True \(bool\)"):
        IA3Pass(feedforward=True)


def test_each_role_of_a_list_must_match(zoo) -> None:
    traced = zoo.spec("builtin:tiny").model  # no gated feed-forward: no ffn_gate
    with pytest.raises(NoMatchError, match=r"LoRAPass: role 'ffn_gate' \(of role=\['query', "
                                           r"'ffn_gate'\]\) matches no nn.Linear / Conv1D module. "
                                           r"Roles found in this model: .*Way out: drop 'ffn_gate'"):
        apply_passes(traced, [LoRAPass(role=["query", "ffn_gate"])])
    with pytest.raises(NoMatchError, match=r"role 'value' matches no module selected by pattern "
                                           r"'q_proj'"):
        apply_passes(traced, [LoRAPass(role=["query", "value"], pattern="q_proj")])
    with pytest.raises(ConfigError, match=r"role=\[\] names no role"):
        apply_passes(traced, [LoRAPass(role=[])])
    adapted = apply_passes(traced, [LoRAPass(role=["query", "value"])])
    assert history(adapted)[0].sites == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]


def test_invalid_regex_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"invalid regular expression in pattern 're:\(q'"):
        matches("re:(q", "q")


# ---- properties ------------------------------------------------------------------------------

segment = st.from_regex(r"[a-z_][a-z0-9_]{0,5}|[0-9]{1,2}", fullmatch=True)
name = st.lists(segment, min_size=1, max_size=5).map(".".join)


@settings(max_examples=50, deadline=None)
@given(name)
def test_a_literal_full_name_matches_itself_and_its_dotted_suffixes(qname: str) -> None:
    assert matches(qname, qname)
    parts = qname.split(".")
    for i in range(len(parts)):
        assert matches(".".join(parts[i:]), qname)
    assert matches("re:" + re.escape(qname), qname)


@settings(max_examples=50, deadline=None)
@given(name, name)
def test_a_literal_never_matches_inside_a_segment(qname: str, other: str) -> None:
    """A literal selects a name only when it is the whole name or a dotted suffix of it."""
    expected = qname == other or other.endswith("." + qname)
    assert matches(qname, other) is expected


@settings(max_examples=50, deadline=None)
@given(st.lists(name, min_size=1, max_size=8, unique=True), st.data())
def test_excluding_everything_selected_is_an_error(names: list[str], data: st.DataObject) -> None:
    pattern = data.draw(st.sampled_from(names))
    selected = select_names(names, pattern)
    assert pattern in selected and selected == [n for n in names if n in set(selected)]
    with pytest.raises(NoMatchError, match="the selection is empty after exclude="):
        select_names(names, pattern, exclude=pattern)
    with pytest.raises(NoMatchError, match="the selection is empty after exclude='\\*\\*'"):
        select_names(names, None, exclude="**")


@settings(max_examples=50, deadline=None)
@given(name, st.integers(min_value=1, max_value=6))
def test_each_star_covers_exactly_one_segment(qname: str, k: int) -> None:
    """``*.*`` (k stars) selects a name iff it has at least k segments (suffix matching)."""
    assert matches(".".join(["*"] * k), qname) is (len(qname.split(".")) >= k)
    assert matches("**", qname)
