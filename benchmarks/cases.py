"""The models, inputs and ways to adapt them that the benchmark compares.

Transformers GPT-2, LLaMA and BERT configurations with random weights (width 256, 4 heads,
feed-forward 1024, vocab 4096; nothing is downloaded), float32 on the CPU. Each way to
adapt a model is a function ``(case, model) -> adapted model``; PEFT's change the model
they are given, ours never do.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import surgery
except ImportError:  # run from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import surgery
from surgery import LoRAPass
from surgery.sites.params import share_weights_copy

warnings.filterwarnings("ignore")
os.environ["HF_HUB_OFFLINE"] = "1"

import peft
import transformers

transformers.logging.set_verbosity_error()

RANK, ALPHA, PREFIX = 8, 16, 8
HIDDEN, HEADS, FFN, VOCAB = 256, 4, 1024, 4096
BATCH, SEQ = 4, 128
LR = 1e-4


@dataclass(frozen=True)
class Case:
    """One architecture at one depth, and the LoRA selection both libraries are given.

    Attributes:
        name: label in the report (``"LLaMA-32"``).
        family: ``"gpt2"``, ``"llama"`` or ``"bert"``.
        layers: number of transformer blocks.
        targets: the query and value projections by module name (GPT-2: the fused
            ``c_attn``): our ``pattern=`` and PEFT's ``target_modules``.
        fan_in_fan_out: weights stored ``(in, out)`` (transformers' ``Conv1D``).
        mask: the model takes ``attention_mask``.
        causal_lm: the model computes its own loss from ``labels=``.
    """

    name: str
    family: str
    layers: int
    targets: tuple[str, ...]
    fan_in_fan_out: bool
    mask: bool
    causal_lm: bool


def case(family: str, layers: int) -> Case:
    """The case for ``family`` (``"gpt2"``, ``"llama"``, ``"bert"``) at ``layers`` blocks."""
    label = {"gpt2": "GPT-2", "llama": "LLaMA", "bert": "BERT"}[family]
    if family == "gpt2":
        return Case(f"{label}-{layers}", family, layers, ("c_attn",), True, False, True)
    if family == "llama":
        return Case(f"{label}-{layers}", family, layers, ("q_proj", "v_proj"), False, True, True)
    return Case(f"{label}-{layers}", family, layers, ("query", "value"), False, True, False)


def _make(c: Case) -> nn.Module:
    if c.family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=512, n_embd=HIDDEN, n_layer=c.layers, n_head=HEADS,
            n_inner=FFN, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, attn_implementation="sdpa"))
    if c.family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
            num_hidden_layers=c.layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
            max_position_embeddings=512, use_cache=False, attn_implementation="sdpa"))
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=c.layers,
        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=512,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_cache=False,
        attn_implementation="sdpa"))


def build(c: Case) -> nn.Module:
    """A fresh model of case ``c`` in eval mode; the same weights every time (seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _make(c).eval()


def batch(c: Case) -> tuple[tuple[Tensor], dict[str, Tensor]]:
    """The fixed batch: ``((input_ids,), {"attention_mask": ...})``, int64 ``(BATCH, SEQ)``."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    return (ids,), ({"attention_mask": torch.ones_like(ids)} if c.mask else {})


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of ``model``."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------- adapting


def lora_pattern(c: Case, model: nn.Module) -> nn.Module:
    """Ours, selection by module name: no example inputs, no tracing."""
    return surgery.apply_passes(model, [LoRAPass(pattern=list(c.targets), rank=RANK, alpha=ALPHA)])


def lora_role(c: Case, model: nn.Module) -> nn.Module:
    """Ours, selection by structural role: finds roles on the map of the example inputs."""
    args, kwargs = batch(c)
    return surgery.apply_passes(model, [LoRAPass(role=["query", "value"], rank=RANK, alpha=ALPHA)],
                                example_inputs=args, example_kwargs=kwargs)


def prefix(c: Case, model: nn.Module) -> nn.Module:
    """Ours, ``PrefixPass(length=PREFIX)`` with the example inputs."""
    args, kwargs = batch(c)
    return surgery.apply_passes(model, [surgery.PrefixPass(length=PREFIX)],
                                example_inputs=args, example_kwargs=kwargs)


def roles_only(c: Case, model: nn.Module) -> Any:
    """Ours, the structural roles alone (``surgery.targets.model_roles``)."""
    args, kwargs = batch(c)
    return surgery.targets.model_roles(model, args, kwargs)


def trace_only(c: Case, model: nn.Module) -> nn.Module:
    """Ours, the whole map alone (``surgery.trace``)."""
    args, kwargs = batch(c)
    return surgery.trace(model, args, kwargs)


def copy_only(c: Case, model: nn.Module) -> nn.Module:
    """Ours, the weight-sharing copy alone (the first step of every ``apply_passes``)."""
    return share_weights_copy(model)


def merged(adapted: nn.Module) -> nn.Module:
    """Ours, the LoRA branches folded into the weights (a new model; ``adapted`` is kept)."""
    return surgery.apply_passes(adapted, [surgery.MergeLoRAPass()])


def peft_lora(c: Case, model: nn.Module) -> nn.Module:
    """PEFT's ``get_peft_model`` with the same LoRA configuration (changes ``model``)."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                             target_modules=list(c.targets), fan_in_fan_out=c.fan_in_fan_out)
    return peft.get_peft_model(model, config)


def peft_prefix(c: Case, model: nn.Module) -> nn.Module:
    """PEFT's prefix tuning with ``PREFIX`` virtual tokens (changes ``model``)."""
    config = peft.PrefixTuningConfig(num_virtual_tokens=PREFIX, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


@dataclass(frozen=True)
class Way:
    """One way to adapt a model: ``run(case, model)``; ``copies``: it changes the model it is
    given, so it gets a fresh copy each time (made untimed)."""

    label: str
    run: Callable[[Case, nn.Module], Any]
    copies: bool


WAYS = {
    "lora_pattern": Way("ours: LoRA by pattern", lora_pattern, False),
    "peft_lora": Way("PEFT: LoRA", peft_lora, True),
    "copy": Way("ours: weight-sharing copy alone", copy_only, False),
    "lora_role": Way("ours: LoRA by role", lora_role, False),
    "roles": Way("ours: roles alone", roles_only, False),
    "trace": Way("ours: map alone", trace_only, False),
    "prefix": Way(f"ours: prefix P={PREFIX}", prefix, False),
    "peft_prefix": Way(f"PEFT: prefix P={PREFIX}", peft_prefix, True),
}


def fresh_input(way: Way, model: nn.Module) -> nn.Module:
    """What ``way`` is handed: a copy of ``model`` for PEFT (which changes it), else ``model``."""
    return copy.deepcopy(model) if way.copies else model


# --------------------------------------------------------------------------- running


def output(model: nn.Module, c: Case) -> Tensor:
    """Logits (GPT-2, LLaMA) or last hidden state (BERT) on the fixed batch."""
    (ids,), kwargs = batch(c)
    return model(ids, **kwargs)[0]


def loss(model: nn.Module, c: Case) -> Tensor:
    """The training loss: the model's own next-token loss (``labels=``) for causal LMs, the
    mean of the last hidden state for BERT."""
    (ids,), kwargs = batch(c)
    if c.causal_lm:
        return model(ids, labels=ids, **kwargs).loss
    return model(ids, **kwargs)[0].float().mean()
