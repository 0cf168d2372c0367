"""Quantization passes: static QDQ, dynamic int8, weight-only, fp16."""

from graphopt.passes.quantization import dynamic, fp16, weights  # noqa: F401,E402
from graphopt.passes.quantization import static  # noqa: F401,E402
