"""Structured pruning: channels, attention heads, FFN neurons and whole blocks
removed for real, with every coupled tensor kept consistent."""
from graphopt.passes.pruning import blocks, channels, transformer  # noqa: F401
