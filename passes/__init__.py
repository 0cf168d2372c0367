"""Built-in passes, one module per family.  Importing this package registers them."""
from graphopt.registry import register_pipeline

from graphopt.passes import cleanup, folding, fusion, pruning, quantization, shapes, sharing, sparsity  # noqa: F401

register_pipeline(
    "simplify",
    "fixpoint{max-iterations=8}(infer-shapes,fold-constants,eliminate-identity,fuse-batchnorm,fuse-conv-affine,"
    "fuse-gemm,cse,eliminate-dead-code)",
    "the default: shape inference, folding, identity removal, fusion, CSE and DCE to a fixpoint",
)
