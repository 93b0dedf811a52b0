"""The checks of :mod:`checks` that do not work on an architecture of
:mod:`surgery.zoo.hf_tiny`: the error each raises, a regex its message matches, and why.

``test_hf_zoo.py`` asserts the error of every listed case (so it fails as soon as a case
starts working: move it out of the table then), and ``support_table.py`` gives the reason as
the footnote of the README cell.
"""

from __future__ import annotations

from typing import NamedTuple

from surgery.errors import NoMatchError, UnsupportedSiteError


class Known(NamedTuple):
    """A check that does not work on an architecture: the error it raises, a regex its
    message matches, and why."""

    error: type[BaseException]
    match: str
    reason: str


_PREFIX_BMM = Known(
    UnsupportedSiteError, r"a prefix needs \(batch, heads, seq, head_dim\)",
    "attention multiplies merged (batch*heads, seq, head_dim) tensors with bmm, so there is "
    "no per-head key/value input to extend; the error names mode='sequence' as the way out")

_PREFIX_UNTRACEABLE = (
    UnsupportedSiteError, r"cannot be turned into a site graph: torch.fx cannot trace",
    "the attention module computes attention in its own forward (not through transformers' "
    "attention interface), and torch.fx cannot trace that forward ({why}), so the op cannot "
    "be rewritten; the error names the layers inside as the way out")
_NO_ATTENTION = "the model has no attention"

KNOWN_FAILURES: dict[tuple[str, str], Known] = {
    ("bloom", "prefix"): _PREFIX_BMM,
    ("deberta-v2", "prefix"): _PREFIX_BMM,
    ("gpt_neo", "prefix"): Known(*_PREFIX_UNTRACEABLE[:2], _PREFIX_UNTRACEABLE[2].format(
        why="a slice bound computed from a tensor")),
    ("mpt", "prefix"): Known(*_PREFIX_UNTRACEABLE[:2], _PREFIX_UNTRACEABLE[2].format(
        why="'co_varnames is too small'")),
    ("deberta", "prefix"): Known(*_PREFIX_UNTRACEABLE[:2], _PREFIX_UNTRACEABLE[2].format(
        why="relative-position code that reads a tensor attribute fx proxies lack")),
    ("rwkv", "lora_default"): Known(
        NoMatchError, r"plays default role\(s\) \['query', 'value'\]",
        f"{_NO_ATTENTION} (RWKV is recurrent: no query or value projection for the default "
        f"roles); PEFT's targets by name work"),
    ("rwkv", "prefix"): Known(
        NoMatchError, "no attention op found",
        f"{_NO_ATTENTION} (RWKV's time mixing has no keys and values to extend)"),
    ("convnext", "lora_default"): Known(
        NoMatchError, r"plays default role\(s\) \['query', 'value'\]",
        f"{_NO_ATTENTION} (a convolutional network: no query or value projection)"),
    ("convnext", "prefix"): Known(
        NoMatchError, "no attention op found",
        f"{_NO_ATTENTION} (a convolutional network)"),
    ("blip-2", "lora"): Known(
        NoMatchError, r"pattern 'q' matches no module it can adapt",
        "PEFT's targets for blip-2 are ['q', 'v', 'q_proj', 'v_proj'], and no layer of "
        "BLIP-2 is named 'q' or 'v'; PEFT accepts a list as long as one entry matches, our "
        "selection refuses every entry that matches nothing and names the nearest layers "
        "(PEFT parity on the layers that match holds: see generate)"),
    ("llama4", "lora_experts"): Known(
        NoMatchError, r"'feed_forward.experts.gate_up_proj' matches no parameter it can adapt",
        "Llama 4's experts module (Llama4TextExperts) multiplies its 3-D weights with bmm in "
        "its own forward, not through transformers' experts implementations, so expert LoRA "
        "has no grouped product to add to; the error names the weights it saw (PEFT wraps "
        "the parameter itself)"),
}
"""(model_type, check) -> the error the check raises there, and why."""
