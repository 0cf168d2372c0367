"""Quantization passes: static QDQ, dynamic int8, weight-only, fp16."""
