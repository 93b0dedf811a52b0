"""Task heads of transformers task models, and the note when one is left frozen.

A transformers ``*ForSequenceClassification``, ``*ForTokenClassification``,
``*ForQuestionAnswering``, ``*ForMultipleChoice`` or ``*ForImageClassification`` model is its
base model (``model.<base_model_prefix>``: ``bert``, ``model``, ``transformer``, ``vit``) plus
a small head beside it: ``classifier`` (BERT, ViT, RoBERTa's ``RobertaClassificationHead``),
``score`` (LLaMA, GPT-2 sequence classification), ``qa_outputs`` (question answering),
``pre_classifier`` and ``classifier`` (DistilBERT). ``from_pretrained`` of a base checkpoint
initialises that head at random; adapters alone leave it frozen at those values, so the model
learns its task through a random projection. PEFT's ``task_type="SEQ_CLS"`` trains
``classifier`` and ``score`` fully (``modules_to_save``); here that is
``TrainModulePass(pattern="classifier")``.

The head is found structurally, not by name: the model's class (or one it derives from) is
named ``*For<task>``, and the head is every direct child other than the base model that
holds parameters of its own (not shared with the base model).
"""

from __future__ import annotations

import warnings

from torch import nn

from surgery.sites.features import user_stacklevel
from surgery.sites.site_graph import base_module

__all__ = ["TASK_SUFFIXES", "task_heads", "frozen_head_notes", "note_frozen_heads"]

TASK_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                 "ForMultipleChoice", "ForImageClassification")
"""Class-name endings of transformers task models whose head is new at ``from_pretrained``."""

_NOTE_START = "the task head "


def _task_class(model: nn.Module) -> type | None:
    """The class in ``model``'s MRO named ``*For<task>``, or ``None``."""
    return next((c for c in type(model).__mro__ if c.__name__.endswith(TASK_SUFFIXES)), None)


def task_heads(model: nn.Module) -> list[str]:
    """Qualified names of the task head modules of a transformers task model.

    Args:
        model: any module; only a transformers task model (see :data:`TASK_SUFFIXES`)
            whose base model sits at ``model.<base_model_prefix>`` has a head.

    Returns:
        The names of the direct children that are not the base model and hold parameters
        not shared with it, in module order (``["classifier"]``, ``["score"]``,
        ``["pre_classifier", "classifier"]``); ``[]`` for any other model.
    """
    if _task_class(model) is None:
        return []
    prefix = getattr(type(model), "base_model_prefix", None)
    base = model._modules.get(prefix) if isinstance(prefix, str) and prefix else None
    if base is None:
        return []
    shared = {id(p) for p in base.parameters()}
    return [name for name, child in model.named_children()
            if child is not base and any(id(p) not in shared for p in child.parameters())]


def frozen_head_notes(model: nn.Module) -> dict[str, str]:
    """Head name -> a note saying it stays frozen at its initial values, for every task head
    (:func:`task_heads`) none of whose parameters trains (an adapter on the head, or the
    head trained fully, counts as training)."""
    owner = _task_class(model)
    notes = {}
    for name in task_heads(model):
        head = model.get_submodule(name)
        if any(p.requires_grad for p in head.parameters()):
            continue
        count = sum(p.numel() for p in head.parameters())
        notes[name] = (
            f"{_NOTE_START}{name} ({type(base_module(head)).__name__}, {count:,d} params) of "
            f"{owner.__name__} stays frozen at its initial values: transformers initialises it "
            f"at random when the checkpoint holds none (from_pretrained of a base model), and "
            f"no adapter or trained module reaches it. Way out: train it fully with "
            f"TrainModulePass(pattern={name!r}) (PEFT's modules_to_save).")
    return notes


def note_frozen_heads(model: nn.Module, notes: list[str]) -> None:
    """Bring ``notes`` (a :class:`~surgery.pass_base.SurgeryState`'s) up to date for the
    task heads of ``model``, and warn once for each head newly found frozen.

    A head's note is added (with one ``UserWarning`` naming every newly frozen head) the
    first time it is found frozen and kept while it stays so, so later calls on the same
    adapted model do not warn again; it is dropped once the head trains.

    Warns:
        UserWarning: a task head stays frozen at its initial values.
    """
    frozen = frozen_head_notes(model)
    heads = task_heads(model)
    kept = [n for n in notes if not any(n.startswith(f"{_NOTE_START}{h} (") for h in heads)
            or any(n.startswith(f"{_NOTE_START}{h} (") for h in frozen)]
    fresh = [note for head, note in frozen.items()
             if not any(n.startswith(f"{_NOTE_START}{head} (") for n in kept)]
    notes[:] = kept + fresh
    if fresh:
        warnings.warn(" ".join(n[0].upper() + n[1:] for n in fresh), UserWarning,
                      stacklevel=user_stacklevel())
