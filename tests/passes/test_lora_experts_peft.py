"""PEFT files of LoRA on fused expert weights (``target_parameters``), both ways:
``surgery.export_peft`` read by ``peft.PeftModel.from_pretrained``, and a directory PEFT's
``save_pretrained`` wrote read by ``surgery.import_peft``.

Logits are compared with ``atol=1e-5`` (PEFT folds the dense delta into the weight, we add
the low-rank term; seen: about 2e-7); a round trip through our own export and import is
bitwise.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import surgery
from surgery import LoRAPass, apply_passes
from surgery.errors import CheckpointError

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from moe_cases import FAMILIES, TARGETS, lora_state, moe_model, peft_twin, token_ids  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {f: moe_model(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_export_loads_in_peft_with_the_same_logits(models, family, target, tmp_path) -> None:
    model, ids = models[family], token_ids()
    ours = apply_passes(model, [LoRAPass(target_parameters=TARGETS[target], rank=4, alpha=8.0,
                                         init="random")])
    surgery.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert len(config["target_parameters"]) == 2 * len(TARGETS[target])  # per layer, by name
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert lora_state(theirs).keys() == lora_state(ours).keys()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)
    back = surgery.import_peft(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_import_of_a_peft_directory(models, family, tmp_path) -> None:
    model, ids = models[family], token_ids()
    theirs = peft_twin(model, TARGETS["both"], rank=4, alpha=16.0)
    theirs.save_pretrained(tmp_path)
    ours = surgery.import_peft(model, tmp_path, adapter_name="moe")
    assert {k.replace(".moe.", ".default.") for k in lora_state(ours)} == \
        set(lora_state(theirs))
    assert [n for n, _ in surgery.named_trainable_parameters(ours)] == list(lora_state(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)


def test_import_refuses_what_it_does_not_read(models, tmp_path) -> None:
    theirs = peft_twin(models["qwen3_moe"], TARGETS["down"])
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "rank_pattern": {"down_proj": 8}}))
    with pytest.raises(CheckpointError, match="rank_pattern"):
        surgery.import_peft(models["qwen3_moe"], tmp_path)


def test_export_refuses_layers_and_expert_weights_in_one_adapter(models, tmp_path) -> None:
    adapted = apply_passes(models["qwen3_moe"], [
        LoRAPass(pattern="q_proj", target_parameters=TARGETS["down"], rank=4)])
    with pytest.raises(CheckpointError, match="expert weights"):
        surgery.export_peft(adapted, tmp_path)
    assert not list(tmp_path.iterdir())


def test_rslora_alpha_crosses_to_peft(models, tmp_path) -> None:
    """With ``use_rslora`` the scaling is ``alpha / sqrt(r)``: the file keeps alpha and the
    flag, so PEFT rebuilds the same scaling (2 here, not alpha / r = 0.5)."""
    model, ids = models["qwen3_moe"], token_ids()
    ours = apply_passes(model, [LoRAPass(target_parameters=TARGETS["both"], rank=16,
                                         alpha=8.0, use_rslora=True, init="random")])
    surgery.export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (16, 8.0, True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits,
                                   atol=ATOL, rtol=0)
        back = surgery.import_peft(model, tmp_path)
        assert torch.equal(back(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.parametrize(("dtype", "ranks", "atol"), [
    (torch.float32, (1, 2, 3, 5, 6), ATOL),
    # bfloat16: PEFT rounds the merged W + delta, we the low-rank term; seen up to 0.03
    (torch.bfloat16, (1, 2, 4, 12), 0.1),
])
def test_any_rank_runs_and_matches_peft(models, dtype, ranks, atol) -> None:
    """The grouped matmul needs rows of 16 bytes: ranks that are not a multiple of 4
    (float32) or 8 (bfloat16) are padded with zeros inside the forward, the update unchanged."""
    model, ids = copy.deepcopy(models["qwen3_moe"]).to(dtype), token_ids()
    for rank in ranks:
        theirs = peft_twin(model, TARGETS["both"], rank=rank, alpha=2.0 * rank)
        ours = apply_passes(model, [LoRAPass(target_parameters=TARGETS["both"], rank=rank,
                                             alpha=2.0 * rank)])
        missing, unexpected = ours.load_state_dict(lora_state(theirs), strict=False)
        assert not unexpected and not [k for k in missing if ".lora_" in k]
        with torch.no_grad():
            want = theirs(input_ids=ids).logits.float()
        got = ours(input_ids=ids).logits
        torch.testing.assert_close(got.detach().float(), want, atol=atol, rtol=0)
        got.float().sum().backward()
        trained = [p for p in ours.parameters() if p.requires_grad]
        assert len(trained) == len(lora_state(ours))
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trained)
