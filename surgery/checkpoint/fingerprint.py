"""The fingerprint of a base architecture: module names and types, parameter names and shapes.

An adapter checkpoint fits only the architecture it was trained on. The fingerprint is read
from the model as it was before surgery (each site graph reads as the module it replaced;
inserted adapter modules, and containers holding nothing but adapter modules, such as the
``prefix`` dictionary a prefix adds to a transformers attention module, are left out), so
an adapted model and its plain base give the same fingerprint. Dtypes and devices are not
part of it: the same adapters load onto a base cast to another dtype.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from surgery.errors import few
from surgery.sites.marker import AdapterModule, AdapterParameters
from surgery.sites.site_graph import plain_weight_free

__all__ = ["fingerprint", "fingerprint_differences"]


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of ``model``'s base architecture.

    Returns:
        ``{"class": str, "modules": {qname: type name}, "parameters": {qname: [shape]},
        "digest": sha256 hex of the rest}``; tied parameters are listed under every name.
    """
    plain = plain_weight_free(model)
    modules: dict[str, str] = {}
    skip: list[str] = []
    for qname, mod in plain.named_modules(remove_duplicate=False):
        if any(qname == s or qname.startswith(s + ".") for s in skip):
            continue
        if _adapter_only(mod):
            skip.append(qname)
            continue
        modules[qname] = type(mod).__name__
    params = {name: list(p.shape) for name, p in plain.named_parameters(remove_duplicate=False)
              if not any(name.startswith(s + ".") for s in skip)}
    body = {"class": type(plain).__name__, "modules": modules, "parameters": params}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {**body, "digest": digest}


def _adapter_only(module: nn.Module) -> bool:
    """True for an adapter module, or a container holding nothing but adapter modules (no
    tensors of its own): the things surgery inserted, found by type."""
    if isinstance(module, (AdapterModule, AdapterParameters)):
        return True
    children = [m for m in module._modules.values() if m is not None]
    return (bool(children) and not module._parameters and not module._buffers
            and all(_adapter_only(m) for m in children))


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one sentence per difference (empty: none)."""
    if saved.get("digest") == current.get("digest"):
        return []
    out = []
    if saved.get("class") != current.get("class"):
        out.append(f"the model class is {current.get('class')}, the checkpoint's base was "
                   f"{saved.get('class')}")
    for what, label in (("modules", "module"), ("parameters", "parameter")):
        old, new = saved.get(what, {}), current.get(what, {})
        missing = [k for k in old if k not in new]
        extra = [k for k in new if k not in old]
        changed = [k for k in old if k and k in new and old[k] != new[k]]  # root: the class
        if missing:
            out.append(f"{len(missing)} {label}(s) of the checkpoint's base are not in this "
                       f"model: {few(missing)}")
        if extra:
            out.append(f"{len(extra)} {label}(s) of this model were not in the checkpoint's "
                       f"base: {few(extra)}")
        if changed:
            word = "type" if what == "modules" else "shape"
            out.append(f"{len(changed)} {label}(s) differ in {word}: " + few(
                [f"{k} ({new[k]} here, {old[k]} in the checkpoint)" for k in changed]))
    return out or ["the fingerprints differ"]
