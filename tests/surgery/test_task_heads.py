"""Tests of surgery/task_heads.py and its use in ``apply_passes``: the head of a transformers task
model is found structurally, and a head left frozen at its initial values gets one warning and a
note the audit prints; a trained head, or a model without a head, gets neither."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
from torch import nn

from surgery import LoRAPass, TrainModulePass, apply_passes, audit
from surgery.task_heads import task_heads

tf = pytest.importorskip("transformers")

SMALL = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def _bert() -> object:
    return tf.BertConfig(vocab_size=64, hidden_size=16, max_position_embeddings=32, **SMALL)


def _llama() -> object:
    return tf.LlamaConfig(vocab_size=64, hidden_size=16, num_key_value_heads=1,
                          max_position_embeddings=32, **SMALL)


def _gpt2() -> object:
    return tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                         bos_token_id=63, eos_token_id=63)


def _vit() -> object:
    return tf.ViTConfig(image_size=16, patch_size=8, hidden_size=16, **SMALL)


def _roberta() -> object:
    return tf.RobertaConfig(vocab_size=64, hidden_size=16, max_position_embeddings=40, **SMALL)


def _distilbert() -> object:
    return tf.DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                               max_position_embeddings=32)


HEADS: list[tuple[str, Callable[[], object], list[str]]] = [
    ("BertForSequenceClassification", _bert, ["classifier"]),
    ("BertForTokenClassification", _bert, ["classifier"]),
    ("BertForQuestionAnswering", _bert, ["qa_outputs"]),
    ("BertForMultipleChoice", _bert, ["classifier"]),
    ("LlamaForSequenceClassification", _llama, ["score"]),
    ("LlamaForTokenClassification", _llama, ["score"]),
    ("LlamaForQuestionAnswering", _llama, ["qa_outputs"]),
    ("GPT2ForSequenceClassification", _gpt2, ["score"]),
    ("GPT2ForTokenClassification", _gpt2, ["classifier"]),
    ("ViTForImageClassification", _vit, ["classifier"]),
    ("RobertaForSequenceClassification", _roberta, ["classifier"]),  # a head with two layers
    ("DistilBertForSequenceClassification", _distilbert, ["pre_classifier", "classifier"]),
    # models whose last layer is pretrained (or tied to the embeddings): no task head
    ("BertModel", _bert, []),
    ("BertForMaskedLM", _bert, []),
    ("LlamaForCausalLM", _llama, []),
    ("GPT2LMHeadModel", _gpt2, []),
]


@pytest.mark.parametrize("cls,config,heads", HEADS, ids=[h[0] for h in HEADS])
def test_task_heads_are_found_structurally(cls: str, config: Callable[[], object],
                                           heads: list[str]) -> None:
    model = getattr(tf, cls)(config())
    assert task_heads(model) == heads

    class Mine(type(model)):  # a user's subclass keeps the head
        pass

    assert task_heads(Mine(config())) == heads


def test_task_heads_of_other_models(zoo) -> None:
    assert task_heads(zoo.spec("builtin:tiny").model) == []
    assert task_heads(nn.Linear(2, 2)) == []


def _frozen_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "stays frozen at its initial values" in str(w.message)]


@pytest.mark.parametrize("cls,config,head", [
    ("BertForSequenceClassification", _bert, "classifier"),
    ("LlamaForSequenceClassification", _llama, "score"),
    ("ViTForImageClassification", _vit, "classifier"),
])
def test_a_frozen_head_warns_once_and_is_noted(cls: str, config: Callable[[], object],
                                               head: str) -> None:
    model = getattr(tf, cls)(config())
    sites = "query" if cls.startswith("Bert") else "q_proj"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        adapted = apply_passes(model, [LoRAPass(pattern=sites, rank=2)])
    messages = _frozen_warnings(record)
    assert len(messages) == 1 and [w.category for w in record
                                   if str(w.message) == messages[0]] == [UserWarning]
    assert messages[0].startswith(f"The task head {head} (Linear, ")
    assert f"of {cls} stays frozen at its initial values" in messages[0]
    assert f"Way out: train it fully with TrainModulePass(pattern='{head}')" in messages[0]
    assert [w.filename for w in record if str(w.message) == messages[0]] == [__file__]
    notes = [n for n in adapted._surgery.notes if n.startswith("the task head")]
    assert len(notes) == 1 and notes[0][1:] == messages[0][1:]
    assert f"note: {notes[0]}" in str(audit(adapted)).splitlines()
    assert audit(adapted).to_dict()["notes"] == adapted._surgery.notes

    # once: a later call on the adapted model (still frozen) says nothing new
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        again = apply_passes(adapted, [LoRAPass(pattern=sites, rank=2, name="b")])
    assert _frozen_warnings(record) == [] and again._surgery.notes == adapted._surgery.notes
    # training the head later drops the note
    trained = apply_passes(again, [TrainModulePass(pattern=head)])
    assert not any(n.startswith("the task head") for n in trained._surgery.notes)
    assert "stays frozen" not in str(audit(trained))


def test_several_frozen_heads_share_one_warning() -> None:
    model = tf.DistilBertForSequenceClassification(_distilbert())
    with pytest.warns(UserWarning, match=r"The task head pre_classifier \(Linear, .*"
                                         r"TrainModulePass\(pattern='pre_classifier'\).* The task "
                                         r"head classifier \(Linear, ") as record:
        adapted = apply_passes(model, [LoRAPass(pattern="q_lin", rank=2)])
    assert len(_frozen_warnings(record)) == 1
    assert len([n for n in adapted._surgery.notes if n.startswith("the task head")]) == 2


@pytest.mark.parametrize("passes,kwargs", [
    ([LoRAPass(pattern="query", rank=2), TrainModulePass(pattern="classifier")], {}),
    ([LoRAPass(pattern=["query", "classifier"], rank=2)], {}),  # adapters on the head train
    ([LoRAPass(pattern="query", rank=2)], {"freeze": False}),
])
def test_no_warning_when_the_head_trains(passes: list, kwargs: dict) -> None:
    model = tf.BertForSequenceClassification(_bert())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted = apply_passes(model, passes, **kwargs)
    assert adapted._surgery.notes == []
    assert "note:" not in str(audit(adapted))


def test_no_warning_without_a_task_head(zoo) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, pattern in (("hf:gpt2", "c_attn"), ("hf:bert", "query"), ("builtin:tiny", "q_proj")):
            adapted = apply_passes(zoo.spec(name).model, [LoRAPass(pattern=pattern, rank=2)])
            assert adapted._surgery.notes == []
