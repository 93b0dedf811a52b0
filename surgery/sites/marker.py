"""The marker type every module inserted by a pass derives from.

Adapters are found structurally, by this type, never by a substring of a parameter name:
``trainable_parameters``, the audit and the renderer all ask ``isinstance(m, AdapterModule)``.
"""

from __future__ import annotations

from torch import nn

__all__ = ["AdapterModule"]


class AdapterModule(nn.Module):
    """Base class of modules that passes insert (LoRA branches, IA³ vectors, ...).

    Attributes:
        pass_name: stable name of the pass that inserts this kind of module.
        site: qualified name of the module this adapter adapts.
        adapter_name: the adapter's name (``"default"`` unless the pass was given ``name=``).
        role: structural role of the site, if known.
    """

    pass_name: str = "adapter"  # a class default; modules shared by two passes set it per instance

    def __init__(self, *, site: str, adapter_name: str, role: str | None = None) -> None:
        super().__init__()
        self.site = site
        self.adapter_name = adapter_name
        self.role = role
        self.active = True

    def extra_repr(self) -> str:
        return f"site={self.site!r}, adapter={self.adapter_name!r}"
