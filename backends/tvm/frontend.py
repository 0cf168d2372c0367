"""ONNX to Relax through TVM's ONNX frontend, with static input shapes.

Ops the frontend has no converter for are found before converting, so the
error names the node instead of failing somewhere inside the importer.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from typing import Any, Iterator

import onnx

from graphopt.backends.base import CompileError, TensorSpec

# Handled by the importer itself rather than by a converter.
_DIRECT_OPS = {"If", "Constant"}


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence TVM's C++ log lines (they go to fd 2, past Python's sys.stderr)."""
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def full_proto(model: Any) -> onnx.ModelProto:
    """The model as a proto with every weight inline (the importer reads values)."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    proto = model.to_proto()
    if model.source_dir is not None and any(uses_external_data(t) for t in proto.graph.initializer):
        load_external_data_for_model(proto, str(model.source_dir))
    return proto


def prepare(model: Any, inputs: list[TensorSpec]) -> onnx.ModelProto:
    """The model with the static input shapes written into its inputs and
    ``simplify`` run over it (exact passes), weights inline.  The frontend
    needs shape computations (Shape -> Gather -> Concat -> Reshape, common in
    exported models) folded to constants; pinning the inputs lets them fold."""
    import graphopt
    from graphopt.ir import Model

    proto = model.to_proto()
    static = {s.name: s.shape for s in inputs}
    for vi in proto.graph.input:
        shape = static.get(vi.name)
        if shape is None or not vi.type.tensor_type.HasField("shape"):
            continue
        for dim, value in zip(vi.type.tensor_type.shape.dim, shape):
            dim.Clear()
            dim.dim_value = int(value)
    pinned = Model.from_proto(proto, source_dir=model.source_dir)
    graphopt.optimize(pinned, "simplify")
    proto = full_proto(pinned)
    _sums_as_adds(proto.graph)
    return proto


def _sums_as_adds(graph: onnx.GraphProto) -> None:
    """Every ``Sum`` of several inputs as a chain of ``Add`` (the same
    broadcasting): the frontend converts ``Sum`` to a stack and a reduction,
    which no kernel rule fuses (ResNet's residual adds ran 4x slower)."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _sums_as_adds(sub)
        if node.op_type != "Sum" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            nodes.append(node)
            continue
        acc = node.input[0]
        for i, operand in enumerate(node.input[1:], start=1):
            out = node.output[0] if i == len(node.input) - 1 else f"{node.output[0]}__sum{i}"
            nodes.append(onnx.helper.make_node("Add", [acc, operand], [out], name=f"{node.name}__add{i}"))
            acc = out
    del graph.node[:]
    graph.node.extend(nodes)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def check_supported(proto: onnx.ModelProto) -> None:
    """The first node whose op the frontend cannot import, as a CompileError."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | _DIRECT_OPS
    for i, node in enumerate(_nodes(proto.graph)):
        if node.op_type not in known:
            domain = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
            raise CompileError(f"node '{node.name or f'#{i}'}' ({domain}{node.op_type}): op not supported by "
                               "TVM's Relax ONNX frontend")


def import_onnx(proto: onnx.ModelProto, inputs: list[TensorSpec]) -> Any:
    """The Relax module of ``proto`` with the given static input shapes;
    weights become constants of the module."""
    from tvm.relax.frontend.onnx import from_onnx

    check_supported(proto)
    printed = io.StringIO()
    try:
        # The frontend warns about checker findings and prints the op it failed on.
        with warnings.catch_warnings(), contextlib.redirect_stdout(printed), quiet_native_stderr():
            warnings.simplefilter("ignore")
            return from_onnx(
                proto,
                shape_dict={s.name: list(s.shape) for s in inputs},
                dtype_dict={s.name: s.dtype for s in inputs},
                keep_params_in_input=False,
            )
    except Exception as exc:
        where = ""
        match = re.search(r"Error converting operator (\S+?),", printed.getvalue())
        if match:
            op = match.group(1)
            node = next((n for n in _nodes(proto.graph) if n.op_type == op), None)
            where = f" at op {op}" + (f" (first such node '{node.name}')" if node is not None and node.name else "")
        raise CompileError(f"TVM's ONNX frontend failed{where}: {_message(exc)}") from None


def output_specs(mod: Any, names: list[str]) -> list[TensorSpec]:
    """Output shapes and dtypes from the Relax function's return type."""
    from tvm import relax

    ret = mod["main"].ret_ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(fields) != len(names):
        raise CompileError(f"TVM's module returns {len(fields)} values for {len(names)} model outputs")
    specs = []
    for name, info in zip(names, fields):
        if not isinstance(info, relax.TensorType):
            raise CompileError(f"output '{name}': not a tensor after import ({type(info).__name__})")
        shape = None
        if info.shape is not None and hasattr(info.shape, "values"):  # a ShapeExpr; else unknown
            shape = tuple(int(d) if _is_int(d) else str(d) for d in info.shape.values)
        specs.append(TensorSpec(name, shape, str(info.dtype)))
    return specs


def _is_int(dim: Any) -> bool:
    try:
        int(dim)
        return True
    except (TypeError, ValueError):
        return False


def _message(exc: BaseException) -> str:
    from graphopt.errors import first_line

    # TVM errors put a traceback header first; the reason is the last line.
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln for ln in reversed(lines) if not ln.startswith(("File ", "at ", "^"))), "") if lines else ""
    return first_line(Exception(text), default=type(exc).__name__)
