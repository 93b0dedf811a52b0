"""Parity with HF PEFT: the LoRA and IA³ cases of PEFT's custom-model tests, run on the same
weights through PEFT and through fx-surgery."""
