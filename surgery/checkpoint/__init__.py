"""Adapter checkpoints: our own files (safetensors + a JSON recipe) and PEFT's, in and out."""
