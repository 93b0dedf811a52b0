"""Adapter names: the one rule every pass and adapter operation checks, and the
identifier-safe form of a name where one is needed.

Adapter names are free strings, as in PEFT: ``"default"``, ``"sst2"``, ``"test-adapter"``,
``"my adapter"``, ``"über"`` are all fine. The user's name is kept verbatim everywhere the
user reads it: state-dict keys (``layers.0.attn.q_proj.lora_A.test-adapter.weight``, the
``ModuleDict`` entry the adapter's module is registered under, as PEFT's keys read),
:func:`surgery.adapter_names`, the audit, diagrams, adapter files and PEFT directories.

What a name cannot be (it becomes one segment of qualified module names, and a part of
the code torch.fx generates):

* empty, or containing ``"."`` (``"a.b"`` would read as two levels of the module tree;
  ``torch.nn.ModuleDict``, and so PEFT, refuses it too);
* the name of an attribute of ``nn.ModuleDict`` (``"keys"``, ``"forward"``,
  ``"training"``): ``ModuleDict`` cannot hold an entry of that name;
* a Python keyword (``"None"``, ``"class"``, ``"if"``): torch.fx writes a module path part
  that is an identifier as an attribute (``self.lora_A.None``), which a keyword cannot be;
* a name holding ``"``, ``\\`` or a character that does not print (a newline, a tab):
  torch.fx writes a module path part that is not an identifier into the site graph's code
  as ``getattr(self.lora_A, "<name>")`` without escaping it, so such a name would break the
  generated code. (PEFT takes these; no model name seen in practice holds them.)

Where a name must become a Python identifier (an fx node name, a generated attribute), use
:func:`identifier_part`; torch.fx itself writes ``getattr(self.lora_A, "test-adapter")``
for module paths whose parts are not identifiers.
"""

from __future__ import annotations

import keyword
import re
from typing import Any

from torch import nn

from surgery.errors import ConfigError

__all__ = ["check_adapter_name", "identifier_part"]

_NOT_IDENTIFIER = re.compile(r"[^0-9a-zA-Z_]+")
_TAKEN = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(who: str, name: Any, *, field: str = "name") -> str:
    """Check one adapter name against the rule above and return it unchanged.

    Args:
        who: the pass or function asking (``"LoRAPass"``, ``"import_peft"``), for messages.
        name: the name given.
        field: the argument that carried it (``"name"``, ``"adapter_name"``), for messages.

    Returns:
        ``name`` itself (a non-empty ``str`` without ``"."``).

    Raises:
        ConfigError: ``name`` is not a ``str``, is empty, contains ``"."``, ``"``,
            ``\\`` or a character that does not print, is a Python keyword, or is an
            attribute of ``nn.ModuleDict``; the message names ``who``, the name and the way out.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{who}: {field} must be a str (an adapter name such as 'default' or "
                          f"'test-adapter'), got {name!r} of type {type(name).__name__}. "
                          f"Way out: {field}=str(...).")
    if not name:
        raise ConfigError(f"{who}: {field} must be a non-empty str, got ''. Way out: leave "
                          f"{field} out for 'default', or give a name.")
    if "." in name:
        fixed = name.replace(".", "_").strip("_") or "default"
        raise ConfigError(f"{who}: {field} {name!r} contains '.', which would split the "
                          f"adapter's parameter names (<site>.<slot>.<name>, as "
                          f"q_proj.lora_A.<name>.weight) into extra "
                          f"levels. Way out: {field}={fixed!r} (name.replace('.', '_')).")
    bad = next((c for c in name if c in '"\\' or not c.isprintable()), None)
    if bad is not None:
        fixed = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in name)
        raise ConfigError(f"{who}: {field} {name!r} holds {bad!r}, which torch.fx cannot write "
                          f"into the code of a site graph (it quotes module names without "
                          f"escaping). Way out: {field}={fixed!r}.")
    if keyword.iskeyword(name):
        raise ConfigError(f"{who}: {field} {name!r} is a Python keyword, which torch.fx would "
                          f"write into the code of a site graph as an attribute "
                          f"(self.lora_A.{name}), which Python cannot parse. Way out: "
                          f"{field}={name + '_'!r} or another name.")
    if name in _TAKEN:
        raise ConfigError(f"{who}: {field} {name!r} is an attribute of nn.ModuleDict, which "
                          f"holds the adapter's modules, so no adapter can take it. Way out: "
                          f"{field}={name + '_adapter'!r} or another name.")
    return name


def identifier_part(name: str) -> str:
    """An identifier-safe form of an adapter name, for fx node names and generated
    attributes: every run of characters outside ``[0-9a-zA-Z_]`` becomes ``_``
    (``"test-adapter"`` → ``"test_adapter"``, ``"über"`` → ``"_ber"``), as torch.fx
    sanitises node names. Not one-to-one (``"a+b"`` and ``"a-b"`` both give ``"a_b"``), so
    never use it as a key: fx makes node names unique itself, keys keep the user's name.
    """
    out = _NOT_IDENTIFIER.sub("_", name)
    return f"_{out}" if out[:1].isdigit() else (out or "_")
