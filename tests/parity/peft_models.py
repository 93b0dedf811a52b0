"""The small models of PEFT's custom-model tests, rebuilt from their description.

Each takes the same input, ``X = arange(90).view(9, 10)`` (int64, :func:`example_input`),
and returns float32 log-probabilities ``(batch, 2)``. Layer names, sizes and the order of
operations follow the models PEFT's tests use (so that a case's ``target_modules`` select
the same layers); :func:`build` seeds ``torch.manual_seed(0)`` before construction as those
tests do, so every call gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """``lin0`` Linear(10, 20) -> ReLU -> Dropout(0.5) -> ``lin1`` Linear(20, 2) -> LogSoftmax.

    Input ``(batch, 10)`` of any numeric dtype (cast to float32); output ``(batch, 2)``.
    """

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(self.relu(self.lin0(X.float())))
        return self.sm(self.lin1(hidden))


class EmbConv1D(nn.Module):
    """``emb`` Embedding(100, 5) -> ``conv1d`` transformers Conv1D(nf=1, nx=5) -> ReLU ->
    flatten -> ``lin0`` Linear(10, 2) -> LogSoftmax.

    Input: int64 ids ``(batch, 10)`` below 100; output ``(batch, 2)``.
    """

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = self.flat(self.relu(self.conv1d(self.emb(X))))
        return self.sm(self.lin0(hidden))


class Conv1dModel(nn.Module):
    """Input reshaped to ``(batch, 1, 10)`` -> ``conv1d`` Conv1d(1, 1, 2) -> ReLU -> flatten
    -> ``lin0`` Linear(9, 2) -> LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = self.flat(self.relu(self.conv1d(X.float().reshape(-1, 1, 10))))
        return self.sm(self.lin0(hidden))


class Conv2dModel(nn.Module):
    """Input reshaped to ``(batch, 5, 3, 3)`` (a batch of 10-wide rows regrouped: 9 rows give
    2 images) -> ``conv2d`` Conv2d(5, 10, 3) -> ReLU -> flatten -> ``lin0`` Linear(10, 2) ->
    LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = self.flat(self.relu(self.conv2d(X.float().reshape(-1, 5, 3, 3))))
        return self.sm(self.lin0(hidden))


class Conv2dGroupsModel(nn.Module):
    """The whole input flattened (90 values) -> ``lin0`` Linear(90, 288) -> reshaped to
    ``(2, 16, 3, 3)`` -> ``conv2d`` Conv2d(16, 16, 3, groups=8) -> ReLU -> flatten ->
    ``lin1`` Linear(16, 2) -> LogSoftmax. Output ``(2, 2)`` whatever the batch (needs 90
    input values)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = self.lin0(X.float().flatten()).reshape(2, 16, 3, 3)
        hidden = self.flat(self.relu(self.conv2d(hidden)))
        return self.sm(self.lin1(hidden))


class Conv2dGroups2Model(nn.Module):
    """Ignores its input: a fixed ``arange`` image batch ``(9, 16, 20, 20)`` -> ``conv2d``
    Conv2d(16, 32, 3, padding=1, groups=2) -> ReLU -> flatten -> ``lin0`` Linear(12800, 2)
    -> LogSoftmax. Output ``(9, 2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        images = torch.arange(9 * 16 * 20 * 20, device=self.conv2d.weight.device)
        images = images.view(9, 16, 20, 20).float()
        hidden = self.flat(self.relu(self.conv2d(images)))
        return self.sm(self.lin0(hidden))


class Conv3dModel(nn.Module):
    """A 2-D input stacked three times along a new last axis, reshaped to
    ``(batch, 5, 3, 3, 3)`` (9 rows give 2 volumes) -> ``conv3d`` Conv3d(5, 10, 3) -> ReLU
    -> flatten -> ``lin0`` Linear(10, 2) -> LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float()
        if X.dim() == 2:
            X = torch.stack([X, X, X], dim=-1)
        hidden = self.flat(self.relu(self.conv3d(X.reshape(-1, 5, 3, 3, 3))))
        return self.sm(self.lin0(hidden))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": EmbConv1D,
    "Conv1d": Conv1dModel,
    "Conv2d": Conv2dModel,
    "Conv2dGroups": Conv2dGroupsModel,
    "Conv2dGroups2": Conv2dGroups2Model,
    "Conv3d": Conv3dModel,
}
"""PEFT's model ids -> our rebuilt models (the ids PEFT's cases name; models only unsupported
cases use, such as ``MHA``, are not rebuilt)."""


def build(model_id: str) -> nn.Module:
    """A fresh model ``model_id`` with the weights of ``torch.manual_seed(0)``, in eval mode.

    Raises:
        KeyError: ``model_id`` is not in :data:`MODELS`.
    """
    torch.manual_seed(0)
    return MODELS[model_id]().eval()


def example_input() -> torch.Tensor:
    """``arange(90).view(9, 10)``, int64: the input of every case."""
    return torch.arange(90).view(9, 10)
