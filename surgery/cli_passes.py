"""The pass options of the ``surgery`` command, shared by ``apply`` and ``report``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from surgery.errors import ConfigError

if TYPE_CHECKING:
    from surgery.pass_base import Pass

__all__ = ["add_pass_arguments", "passes_from_args"]


def add_pass_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the LoRA, IA3, adapter and prefix options (and ``--name``) to ``parser``."""
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora", action="append", metavar="PATTERN",
                      help="layers to adapt, in the selection language ('attn.*', "
                           "'re:.*\\.(q|v)_proj'); repeat for several")
    lora.add_argument("--lora-role", action="append", metavar="ROLE",
                      help="select layers by structural role (query, key, value, attn_out, "
                           "ffn_up, ffn_gate, ffn_down); repeat or comma-separate for several")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    lora.add_argument("--alpha", type=float, default=16.0,
                      help="LoRA alpha; scaling = alpha / r (default 16)")
    lora.add_argument("--dropout", type=float, default=0.0,
                      help="dropout on the LoRA branch input (default 0)")
    lora.add_argument("--rslora", action="store_true", help="scaling = alpha / sqrt(r)")
    parser.add_argument("--ia3", nargs="?", const="", default=None, metavar="PATTERN",
                        help="add IA3 vectors; without PATTERN, to keys, values and "
                             "feed-forward down projections (found by role)")
    adapters = parser.add_argument_group("bottleneck adapters and prefixes")
    adapters.add_argument("--adapter", choices=("houlsby", "pfeiffer"), default=None,
                          help="serial bottleneck adapters h + up(act(down(h))): houlsby = after "
                               "every attention output and feed-forward down projection, "
                               "pfeiffer = after the feed-forward only")
    adapters.add_argument("--parallel", action="store_true",
                          help="parallel adapters (He et al.): ffn(x) + 4 * up(act(down(x))) on "
                               "every feed-forward block")
    adapters.add_argument("--bottleneck", type=int, default=None, metavar="N",
                          help="bottleneck width of --adapter / --parallel (default: the "
                               "layer's width // 16)")
    adapters.add_argument("--prefix", type=int, default=None, metavar="P",
                          help="learned prefix of P keys and values before every attention op")
    adapters.add_argument("--prefix-gate", choices=("zero",), default=None,
                          help="zero: LLaMA-Adapter's zero-init gate on the prefix (identity "
                               "at init)")
    parser.add_argument("--name", default="default", metavar="NAME",
                        help="adapter name given to every pass of this call (default: default)")


def passes_from_args(args: argparse.Namespace, command: str) -> list[Pass]:
    """The passes the flags of :func:`add_pass_arguments` ask for, in a fixed order: LoRA,
    IA3, serial adapter, parallel adapter, prefix. Pass modules are imported only when asked
    for.

    Args:
        args: the parsed arguments.
        command: the subcommand, named in the errors (``"apply"``).

    Raises:
        ConfigError: no pass asked for, or an option given without the one it needs.
    """
    roles = [r.strip() for item in args.lora_role or () for r in item.split(",") if r.strip()]
    name = args.name
    passes: list[Pass] = []
    if args.lora or roles:
        from passes.lora import LoRAPass

        passes.append(LoRAPass(pattern=list(args.lora) if args.lora else None,
                               role=roles or None, rank=args.rank, alpha=args.alpha,
                               dropout=args.dropout, use_rslora=args.rslora, name=name))
    if args.ia3 is not None:
        from passes.ia3 import IA3Pass

        passes.append(IA3Pass(pattern=args.ia3 or None, name=name))
    if args.bottleneck is not None and args.adapter is None and not args.parallel:
        raise ConfigError(f"{command}: --bottleneck sets the width of --adapter / --parallel; "
                          "give one of them too")
    if args.prefix_gate is not None and args.prefix is None:
        raise ConfigError(f"{command}: --prefix-gate needs --prefix P (the prefix length)")
    if args.adapter is not None:
        from passes.adapters import SerialAdapterPass

        passes.append(SerialAdapterPass(placement=args.adapter, bottleneck=args.bottleneck,
                                        name=name))
    if args.parallel:
        from passes.adapters import ParallelAdapterPass

        passes.append(ParallelAdapterPass(bottleneck=args.bottleneck, name=name))
    if args.prefix is not None:
        from passes.prefix import PrefixPass

        passes.append(PrefixPass(length=args.prefix, gate=args.prefix_gate, name=name))
    if not passes:
        raise ConfigError(f"{command}: nothing to apply; give --lora PATTERN, --lora-role ROLE, "
                          "--ia3, --adapter houlsby|pfeiffer, --parallel and/or --prefix P "
                          f"(see surgery {command} --help)")
    return passes
