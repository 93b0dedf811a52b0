"""fx-surgery: parameter-efficient model surgery on PyTorch models, done as graph rewrites.

Passes (LoRA, IA³, bottleneck adapters, prefixes, merge) rewrite the adapted layers of a
model as small torch.fx graphs (site graphs) inside a weight-sharing copy of the model, which
stays the user's own model (same class, methods and inputs); the whole-model graph (the map)
is traced only where selection by role or a picture needs it. The audit says what trains;
``render_diff`` draws before and after::

    import surgery
    from surgery import apply_passes, audit, LoRAPass, IA3Pass, render_diff

    adapted = apply_passes(model, [LoRAPass(pattern="attn.*", rank=8, alpha=16), IA3Pass()])
    print(audit(adapted))
    render_diff(model, adapted, "out/")
    opt = torch.optim.AdamW(surgery.trainable_parameters(adapted), lr=1e-3)

Everything a user needs is importable from here.
"""

from __future__ import annotations

from typing import Any

from surgery.adapters.active import (
    active_adapters,
    adapter_names,
    disable_adapters,
    set_active,
    set_trainable,
)
from surgery.apply import (
    apply_passes,
    history,
    named_trainable_parameters,
    plan,
    trainable_parameters,
)
from surgery.audit.count import Audit, audit  # noqa: E402  (after the audit package)
from surgery.errors import (
    AdapterNotFoundError,
    AlreadyAdaptedError,
    CheckpointError,
    ConfigError,
    MergeError,
    NoMatchError,
    RenderError,
    SurgeryError,
    TraceError,
    UnsupportedSiteError,
)
from surgery.listing import Target, TargetList, list_targets
from surgery.map.roles import find_roles
from surgery.map.trace import SurgeryTracer, trace
from surgery.pass_base import Change, Pass, PassResult
from surgery.sites.marker import AdapterModule
from surgery.sites.site_graph import SiteGraph

__version__ = "0.1.0"

# Passes live in the ``passes`` package, which imports this core: they load on first use so
# that ``import passes.lora`` works before or after ``import surgery``.
_LAZY = {
    "LoRAPass": ("passes.lora", "LoRAPass"),
    "IA3Pass": ("passes.ia3", "IA3Pass"),
    "MergeLoRAPass": ("passes.merge", "MergeLoRAPass"),
    "UnmergeLoRAPass": ("passes.merge", "UnmergeLoRAPass"),
    "MergeIA3Pass": ("passes.merge", "MergeIA3Pass"),
    "UnmergeIA3Pass": ("passes.merge", "UnmergeIA3Pass"),
    "merged_adapters": ("surgery.adapters.merge_state", "merged_adapters"),
    "AdapterStack": ("passes.stack", "AdapterStack"),
    "SerialAdapterPass": ("passes.adapters", "SerialAdapterPass"),
    "PrefixPass": ("passes.prefix", "PrefixPass"),
    "EjectPrefixPass": ("passes.prefix", "EjectPrefixPass"),
    "ParallelAdapterPass": ("passes.adapters", "ParallelAdapterPass"),
    "TrainModulePass": ("passes.train_module", "TrainModulePass"),
    "route_samples": ("passes.stack", "route_samples"),
    "render": ("visualize", "render"),
    "render_diff": ("visualize", "render_diff"),
    "to_networkx": ("visualize", "to_networkx"),
    "RenderOptions": ("visualize", "RenderOptions"),
    "DiffReport": ("visualize", "DiffReport"),
    "load_model": ("surgery.zoo", "load_model"),
    "unload": ("surgery.adapters.unload", "unload"),
    "combine_adapters": ("surgery.adapters.combine", "combine_adapters"),
    "delete_adapter": ("surgery.adapters.delete", "delete_adapter"),
    "zoo": ("surgery.zoo", None),
    "export_peft": ("surgery.checkpoint.peft_export", "export_peft"),
    "import_peft": ("surgery.checkpoint.peft_import", "import_peft"),
    "save_adapters": ("surgery.checkpoint.save", "save_adapters"),
    "load_adapters": ("surgery.checkpoint.load", "load_adapters"),
}


def __getattr__(name: str) -> Any:
    """Import the audit, the renderer and the model zoo only when first used."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        imported = importlib.import_module(module)
        value = imported if attr is None else getattr(imported, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")


__all__ = [
    "AdapterModule",
    "AdapterStack",
    "AdapterNotFoundError",
    "AlreadyAdaptedError",
    "Audit",
    "CheckpointError",
    "Change",
    "EjectPrefixPass",
    "ConfigError",
    "DiffReport",
    "IA3Pass",
    "LoRAPass",
    "MergeIA3Pass",
    "MergeLoRAPass",
    "MergeError",
    "NoMatchError",
    "ParallelAdapterPass",
    "Pass",
    "PrefixPass",
    "PassResult",
    "RenderError",
    "RenderOptions",
    "SerialAdapterPass",
    "SiteGraph",
    "SurgeryError",
    "SurgeryTracer",
    "Target",
    "TargetList",
    "TraceError",
    "TrainModulePass",
    "UnmergeIA3Pass",
    "UnmergeLoRAPass",
    "UnsupportedSiteError",
    "active_adapters",
    "adapter_names",
    "apply_passes",
    "audit",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "export_peft",
    "find_roles",
    "history",
    "import_peft",
    "list_targets",
    "load_adapters",
    "load_model",
    "merged_adapters",
    "named_trainable_parameters",
    "plan",
    "render",
    "render_diff",
    "route_samples",
    "save_adapters",
    "set_active",
    "set_trainable",
    "to_networkx",
    "trace",
    "trainable_parameters",
    "unload",
    "zoo",
]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
