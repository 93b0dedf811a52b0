"""Tests of surgery/sites.py helpers: layer sizes whatever the weight layout, and the
warning for a LoRA rank above what a layer can hold."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from surgery import trace
from surgery.sites.resolve import layer_features, resolve_sites, warn_rank_exceeds
from surgery.map.trace import is_linear_like


def test_layer_features_read_in_then_out_for_every_layout() -> None:
    assert layer_features(nn.Linear(3, 5)) == (3, 5)
    assert layer_features(nn.Conv2d(3, 8, 3)) == (3, 8)
    assert layer_features(nn.ConvTranspose1d(4, 6, 2)) == (4, 6)  # weight (in, out, k)
    assert layer_features(nn.Embedding(100, 16)) == (100, 16)
    assert layer_features(nn.MultiheadAttention(16, 2)) == (16, 16)
    assert layer_features(nn.ReLU()) is None
    tf = pytest.importorskip("transformers")
    conv1d = tf.pytorch_utils.Conv1D(12, 4)  # nf=12 outputs, nx=4 inputs; weight (4, 12)
    assert tuple(conv1d.weight.shape) == (4, 12) and layer_features(conv1d) == (4, 12)


def test_a_rank_above_min_in_out_warns_naming_the_layers() -> None:
    model = trace(nn.Sequential(nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 32), nn.Linear(32, 32)))
    sites = resolve_sites(model, pass_name="LoRAPass", pattern="*", role=None, exclude=None,
                          default_roles=(), accept=is_linear_like, accepted_types="nn.Linear")
    with pytest.warns(UserWarning) as record:
        warn_rank_exceeds(sites, 8, pass_name="LoRAPass")
    assert [str(w.message) for w in record] == [
        "LoRAPass: rank 8 is larger than min(in_features, out_features) of 0 (Linear, 32 -> 4), "
        "2 (Linear, 4 -> 32); the update B A there cannot have a rank above that minimum, so the "
        "extra rank only adds parameters. Way out: a smaller rank, or exclude=... those layers."]
    assert record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_rank_exceeds(sites, 4, pass_name="LoRAPass")  # rank 4 fits every layer
