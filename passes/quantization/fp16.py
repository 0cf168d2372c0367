"""float16 weights and compute, with the model's interface kept as it was.

Every node that is not kept in float32 computes in float16: its float32
constants become float16 (values outside float16's range are clipped, with a
note), its float32 outputs become float16, and Casts are inserted where a
float16 value meets a float32 reader (graph outputs, kept nodes) or a float32
value (graph inputs, kept nodes' outputs) meets a float16 node.  Graph inputs
and outputs keep their names and types.

Kept in float32 (``keep-ops``, default :data:`DEFAULT_KEEP_OPS`): ops with
fixed float32 inputs or dtype attributes (Resize/Upsample scales, Range,
random generators, quantization ops), ops whose float16 result is unreliable
(CumSum, TopK/NonMaxSuppression/RoiAlign tie-breaking and boxes, Pow and the
square/exp reductions that overflow 65504), onnxconverter-common's list of ML
ops, plus every custom-domain op and every node with a subgraph.  LayerNorm,
Softmax, MatMul, Conv, GELU's Erf are converted: the fp16 kernels of GPU
runtimes accumulate them in float32.

onnxruntime's CPU provider has few float16 kernels on x86: it runs a float16
node without one in float32 behind Casts of its own.  ``keep-cpu-fallbacks``
asks onnxruntime which nodes those are and keeps them in float32 here, so the
model has no hidden cast ping-pong on CPU (on x86 this keeps most compute in
float32: the gain is then weight size only).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.errors import PassError
from graphopt.ir import Model, iter_graphs
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import STANDARD_DOMAINS, fresh_name, is_graph_output
from graphopt.passes.shapes import annotate_shapes

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
F16_MAX = float(np.finfo(np.float16).max)

DEFAULT_KEEP_OPS = (
    # fixed float32 inputs / dtype attributes / no fp16 definition
    "Range", "Resize", "Upsample", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Multinomial", "Bernoulli", "EyeLike", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
    # results that fp16 makes unreliable
    "CumSum", "TopK", "NonMaxSuppression", "RoiAlign", "Min", "Max", "Pow",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd",
    # onnxconverter-common's ML ops
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier", "TreeEnsembleRegressor", "ZipMap",
)


def _dtype(t: gs.Tensor):
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        return None


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


class _Converter:
    def __init__(self, model: Model, keep_ops: set[str], keep_nodes: set[str], keep_outputs: set[str] = frozenset()):
        self.model = model
        self.keep_outputs = keep_outputs
        self.graph = model.graph
        self.keep_ops = keep_ops
        self.keep_nodes = keep_nodes
        self.names = {name for g in iter_graphs(model.graph) for name in g.tensors()}
        self.names.update(n.name for n in model.graph.nodes if n.name)
        self.overridable = model.overridable
        self.casts: dict[tuple[int, str], gs.Variable] = {}
        self.const16: dict[int, gs.Constant] = {}
        self.new_nodes: list[gs.Node] = []
        self.clipped: list[str] = []
        self.converted = 0
        self.kept: dict[str, int] = {}

    def kept_node(self, node: gs.Node) -> bool:
        if node.domain not in STANDARD_DOMAINS or _has_subgraph(node) or node.op in self.keep_ops:
            return True
        if node.name and node.name in self.keep_nodes or any(o.name in self.keep_outputs for o in node.outputs):
            return True
        # a float value of unknown type: do not guess
        return any(isinstance(t, gs.Variable) and t.name and _dtype(t) is None for t in list(node.inputs) + list(node.outputs))

    def cast(self, t: gs.Tensor, to: np.dtype) -> gs.Variable:
        key = (id(t), to.name)
        if key not in self.casts:
            out = gs.Variable(fresh_name(self.names, f"{t.name}_{'fp16' if to == F16 else 'fp32'}"), dtype=to,
                              shape=getattr(t, "shape", None))
            to_enum = onnx.TensorProto.FLOAT16 if to == F16 else onnx.TensorProto.FLOAT
            self.new_nodes.append(gs.Node("Cast", name=fresh_name(self.names, f"{t.name}_cast_{to.name}"),
                                          attrs={"to": to_enum}, inputs=[t], outputs=[out]))
            self.casts[key] = out
        return self.casts[key]

    def to_half(self, c: gs.Constant) -> gs.Constant:
        if id(c) not in self.const16:
            v = np.asarray(c.values, dtype=np.float32)
            finite = v[np.isfinite(v)]
            if finite.size and np.abs(finite).max() > F16_MAX:
                self.clipped.append(c.name)
            half = np.asarray(np.clip(v, -F16_MAX, F16_MAX).astype(np.float16))
            half = np.where(np.isinf(v), np.where(v > 0, np.float16(np.inf), np.float16(-np.inf)), half)  # inf stays inf
            self.const16[id(c)] = gs.Constant(fresh_name(self.names, c.name + "_fp16"), np.array(half, order="C"))
        return self.const16[id(c)]

    def run(self) -> None:
        graph = self.graph
        kept = {id(n) for n in graph.nodes if self.kept_node(n)}
        # 1. outputs of converted nodes become float16 (graph outputs via a Cast back)
        half: set[int] = set()
        for node in graph.nodes:
            if id(node) in kept:
                continue
            for i, out in enumerate(node.outputs):
                if _dtype(out) != F32:
                    continue
                if is_graph_output(graph, out):
                    inner = gs.Variable(fresh_name(self.names, out.name + "_fp16"), dtype=F16, shape=out.shape)
                    node.outputs[i] = inner
                    self.new_nodes.append(gs.Node("Cast", name=fresh_name(self.names, out.name + "_cast_float32"),
                                                  attrs={"to": onnx.TensorProto.FLOAT}, inputs=[inner], outputs=[out]))
                    half.add(id(inner))
                else:
                    out.dtype = F16
                    half.add(id(out))
        # 2. inputs: float32 into converted nodes, float16 into kept nodes
        for node in list(graph.nodes):
            converted = id(node) not in kept
            for i, t in enumerate(node.inputs):
                if not t.name:
                    continue
                if converted:
                    if isinstance(t, gs.Constant) and t.name not in self.overridable:
                        if _dtype(t) == F32:
                            node.inputs[i] = self.to_half(t)
                    elif id(t) not in half and _dtype(t) == F32:
                        node.inputs[i] = self.cast(t, F16)
                elif id(t) in half:
                    node.inputs[i] = self.cast(t, F32)
            if converted:
                self.converted += 1
                self._retype_attrs(node)
            else:
                self.kept[node.op] = self.kept.get(node.op, 0) + 1
        graph.nodes.extend(self.new_nodes)
        graph.toposort()

    def _retype_attrs(self, node: gs.Node) -> None:
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        elif node.op in ("Constant", "ConstantOfShape"):
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant) and _dtype(value) == F32:
                node.attrs["value"] = self.to_half(value)
        elif node.op == "CastLike":
            pass  # follows its (converted) second input


def probe_cpu_fallbacks(proto: onnx.ModelProto) -> set[str]:
    """Names of the float16 tensors onnxruntime's CPU provider computes in
    float32 behind Casts of its own (its InsertCastTransformer renames them
    ``InsertedPrecisionFreeCast_<name>``)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.optimized_model_filepath = os.path.join(tmp, "probe.onnx")
        so.log_severity_level = 4
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        probed = onnx.load(so.optimized_model_filepath, load_external_data=False)
    prefix = "InsertedPrecisionFreeCast_"
    return {o[len(prefix):] for n in probed.graph.node if n.op_type != "Cast" for o in n.output if o.startswith(prefix)}


def out_of_range_tensors(model: Model, ctx: PassContext, limit: float) -> set[str]:
    """Float32 values of the main graph whose magnitude exceeds ``limit`` on
    the run's sample inputs (``ctx.inputs``, else seeded random data)."""
    from graphopt import runtime
    from graphopt.activations import with_outputs

    tensors = model.graph.tensors()
    proto = with_outputs(model, [name for node in model.graph.nodes for name in (o.name for o in node.outputs)
                                 if name and name in tensors and _dtype(tensors[name]) == F32])
    sess = runtime.session(proto, source_dir=model.source_dir)
    feeds = ctx.inputs if ctx.inputs is not None else runtime.random_inputs(sess, seed=ctx.seed,
                                                                             shapes=ctx.input_shapes)
    values = runtime.run(sess, feeds)
    big = set()
    for name, v in values.items():
        v = np.asarray(v)
        if v.dtype == np.float32 and v.size:
            finite = v[np.isfinite(v)]
            if finite.size and float(np.abs(finite).max()) > limit:
                big.add(name)
    return big


@register_pass("convert-fp16")
class ConvertFp16(Pass):
    """Convert weights and compute to float16, keeping the model's input and
    output types and a list of float32-only ops (with Casts around them)."""

    tolerance = Tolerance(relative=1e-2, lossy=True)

    keep_ops = Option(list, list(DEFAULT_KEEP_OPS), "op types kept in float32")
    extra_keep_ops = Option(list, [], "op types kept in float32 in addition to keep-ops")
    keep_nodes = Option(list, [], "node names kept in float32")
    range_check = Option(bool, True, "run the model once (--inputs, else seeded random data) and keep in "
                         "float32 the nodes that produce or read values beyond float16's range")
    range_limit = Option(float, 16384.0, "magnitude treated as beyond float16's range by range-check", min=1.0,
                         max=65504.0)
    keep_cpu_fallbacks = Option(bool, False, "also keep in float32 every node onnxruntime's CPU provider has no "
                                "float16 kernel for (asks onnxruntime)")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        annotate_shapes(model)
        keep_nodes = set(self.keep_nodes)
        notes: list[str] = []
        big: set[str] = set()
        if self.range_check:
            try:
                big = out_of_range_tensors(model, ctx, self.range_limit)
            except Exception as exc:  # the check is advisory: say so and convert anyway
                notes.append(f"range-check skipped: {type(exc).__name__}: {str(exc).strip()[:200]}")
            if big:
                wide = [n for n in model.graph.nodes
                        if any(t.name in big for t in list(n.inputs) + list(n.outputs))]
                keep_nodes |= {n.name for n in wide if n.name}
                for n in wide:
                    if not n.name:  # unnamed: keep through its outputs
                        big.update(o.name for o in n.outputs)
                notes.append(f"{len(wide)} node(s) kept in float32: values beyond +-{self.range_limit:g} "
                             f"on the sample inputs")
        if self.keep_cpu_fallbacks:
            trial = model.copy()
            _Converter(trial, set(self.keep_ops) | set(self.extra_keep_ops), keep_nodes).run()
            try:
                fallback = probe_cpu_fallbacks(trial.to_proto())
            except Exception as exc:
                raise PassError(f"pass 'convert-fp16': onnxruntime cannot load the float16 model: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
            tensors = model.graph.tensors()
            # A node writing a graph output computes '<output>_fp16' in the trial,
            # a name only the trial has: map it back through the Cast to the output.
            outputs = {t.name for t in trial.graph.outputs}
            back = {n.inputs[0].name: n.outputs[0].name for n in trial.graph.nodes
                    if n.op == "Cast" and n.outputs and n.outputs[0].name in outputs and n.inputs}
            keep_outputs = {back.get(name, name) for name in fallback} & set(tensors)
            added = {id(tensors[name].inputs[0]) for name in keep_outputs if tensors[name].inputs}
            if added:
                notes.append(f"{len(added)} node(s) kept in float32: no float16 kernel on onnxruntime CPU")
        else:
            keep_outputs = set()
        keep_outputs = set(keep_outputs) | {name for name in big}
        conv = _Converter(model, set(self.keep_ops) | set(self.extra_keep_ops), keep_nodes, keep_outputs)
        conv.run()
        if conv.clipped:
            shown = ", ".join(conv.clipped[:5]) + (" ..." if len(conv.clipped) > 5 else "")
            notes.append(f"{len(conv.clipped)} constant(s) had values outside float16's range, clipped to +-65504: {shown}")
        stats = {"converted_nodes": conv.converted, "kept_nodes": sum(conv.kept.values()),
                 "casts": len(conv.new_nodes),
                 "constants": len(conv.const16)}
        return PassResult(changed=conv.converted > 0, stats=stats, notes=notes)
