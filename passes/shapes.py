"""Shape and type inference: annotate every tensor with what onnx can prove."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.ir import Model
from graphopt.pass_base import Pass, PassResult
from graphopt.registry import register_pass


def annotate_shapes(model: Model) -> int:
    """Run onnx shape inference (with data propagation) and copy the results
    onto the graph's tensors in place.  Returns how many tensors gained or
    refined a dtype or shape.

    Inference runs on an exported proto; lazy external weights are exported
    by reference, so this never reads weight data from disk.  Several passes
    ask for shapes at their start; the result is cached in ``model.analyses``
    until a pass changes the model (the manager clears it) or the node list
    changes within a pass.
    """
    key = (len(model.graph.nodes), hash(tuple(map(id, model.graph.nodes))))
    if model.analyses.get("shapes") == key:
        return 0
    model.analyses["shapes"] = key
    proto = model.to_analysis_proto()
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return 0
    infos = {vi.name: vi for vi in inferred.graph.value_info}
    infos.update({vi.name: vi for vi in inferred.graph.output})
    updated = 0
    for name, tensor in model.graph.tensors().items():
        if not isinstance(tensor, gs.Variable) or name not in infos:
            continue
        vi = infos[name]
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
        shape = None
        if tt.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        changed = False
        if dtype is not None and tensor.dtype is None:
            tensor.dtype = dtype
            changed = True
        if shape is not None and _more_precise(shape, tensor.shape):
            tensor.shape = shape
            changed = True
        updated += changed
    return updated


def refine_with_symbolic_inference(model: Model) -> int:
    """Fill in dims onnx inference left unknown with onnxruntime's symbolic
    shape inference, which follows shape arithmetic (Shape -> Gather -> Concat
    -> Reshape, as exporters write multi-head attention) that onnx's data
    propagation gives up on.  Only static dims are taken.  Returns how many
    tensors gained one; 0 when that inference fails on the model."""
    annotate_shapes(model)
    key = ("symbolic", model.analyses.get("shapes"))
    if model.analyses.get("symbolic-shapes") == key:
        return 0
    model.analyses["symbolic-shapes"] = key
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model.to_analysis_proto(), auto_merge=True)
    except Exception:  # unknown ops, contrib domains, its own asserts: keep what onnx proved
        return 0
    if inferred is None:
        return 0
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    updated = 0
    for name, tensor in model.graph.tensors().items():
        vi = infos.get(name)
        if not isinstance(tensor, gs.Variable) or vi is None or not vi.type.HasField("tensor_type"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        old = tensor.shape
        if old is None or len(old) != len(dims):
            continue
        new = [o if isinstance(o, int) or d is None else d for o, d in zip(old, dims)]
        if new != list(old):
            tensor.shape = new
            updated += 1
    return updated


def _more_precise(new: list, old: list | None) -> bool:
    if old is None:
        return True
    if len(new) != len(old):
        return False
    return any(isinstance(n, int) and not isinstance(o, int) for n, o in zip(new, old))


@register_pass("infer-shapes")
class InferShapes(Pass):
    """Annotate tensors with dtypes and shapes from onnx shape inference (data propagation on)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        n = annotate_shapes(model)
        # Annotations do not change what the model computes; report them as a
        # change only the first time so fixpoints do not loop on them.
        return PassResult(changed=n > 0, stats={"annotated": n},
                          reason="every tensor already carries the dtype and shape inference finds")
