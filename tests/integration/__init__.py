"""Adapted models in real training setups: DDP, FSDP2, activation checkpointing,
``torch.compile``, dtype and device moves, many optimizer steps."""
