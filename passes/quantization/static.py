"""quantize-static: calibrated QuantizeLinear/DequantizeLinear (QDQ) insertion.

The QDQ format is what onnxruntime, TensorRT and graphopt's TVM lowering read:
the model stays a float model in which chosen tensors pass through
``QuantizeLinear -> DequantizeLinear``, and a runtime fuses ``DQ -> op -> Q``
into an integer kernel.  The placement follows onnxruntime's QDQ quantizer so
its CPU provider fuses everything it can, and nothing else:

* Conv / ConvTranspose / Gemm / MatMul (QLinearConv, QGemm, QLinearMatMul):
  the activation input and the output get QDQ; a constant weight becomes an
  int8 initializer (symmetric, per output channel by default) read through a
  DequantizeLinear; a Conv/Gemm bias becomes int32 with ``scale =
  input_scale * weight_scale``;
* a Relu or Clip after such an op is removed and its range becomes the op's
  output range (the zero point sits at qmin, so QuantizeLinear's saturation
  clamps), as onnxruntime does;
* Add, Mul (QLinearAdd/Mul), Concat (QLinearConcat), AveragePool,
  GlobalAveragePool, Sigmoid, LeakyRelu: every float input and the output;
* Reshape, Transpose, Squeeze, Unsqueeze, Flatten, MaxPool, Resize, Slice, Pad,
  Split, Gather, ...: only when their input is quantized already, and their
  output reuses the input's scale and zero point (so the runtime drops the pair);
* Softmax and normalizations stay in float unless listed in ``ops`` and
  removed from ``keep-float``;
* the decode tail on the way to each output (nodes after the last weighted
  op whose results reach only outputs: sigmoid, exp, grid offsets, the
  concatenation of boxes with scores) stays in float (``float-tails``).

Activation ranges come from onnxruntime's calibrators
(:func:`graphopt.calibration.collect_ranges`: minmax, percentile, entropy);
``mse`` picks, on the histogram of each tensor, the clipping range whose
quantize-dequantize round trip has the least mean squared error.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, fresh_name, is_graph_input, is_graph_output
from graphopt.passes.quantization.common import (
    BINARY_OPS,
    DEFAULT_STATIC_OPS,
    PASSTHROUGH_OPS,
    VARIADIC_OPS,
    WEIGHTED_OPS,
    QDQBuilder,
    output_tails,
    compute_scale_zero_point,
    qrange,
    quantize_bias,
    quantize_weight,
    weight_axis,
)
from graphopt.passes.quantization.sensitivity import FidelityBudgetOptions
from graphopt.passes.shapes import annotate_shapes

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_KEEP_FLOAT = ("Softmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
                      "GroupNormalization")
_F32 = np.dtype(np.float32)


def _is_float(tensor: gs.Tensor) -> bool:
    return tensor.dtype is not None and np.dtype(tensor.dtype) == _F32


class _Plan:
    """What to quantize, decided on the float graph before any edit."""

    def __init__(self) -> None:
        self.nodes: list[gs.Node] = []            # quantized nodes, in graph order
        self.activations: dict[str, gs.Tensor] = {}  # tensors that get calibrated QDQ
        self.shared: dict[str, str] = {}          # passthrough output -> input whose params it reuses
        self.weights: list[tuple[gs.Node, int, int | None]] = []  # (node, input index, per-channel axis)
        self.biases: list[gs.Node] = []
        self.constants: list[tuple[gs.Node, int]] = []  # constant inputs of Add/Mul/Concat
        self.fused: list[tuple[gs.Node, gs.Node]] = []  # (producer, Relu/Clip) to merge
        self.skipped: dict[str, int] = {}
        self.tail = 0                              # decode-tail nodes left in float

    def act(self, tensor: gs.Tensor) -> None:
        self.activations.setdefault(tensor.name, tensor)

    def quantized(self, name: str) -> bool:
        return name in self.activations or name in self.shared


@register_pass("quantize-static")
class QuantizeStatic(FidelityBudgetOptions, Pass):
    """Insert calibrated QuantizeLinear/DequantizeLinear pairs (QDQ) on weights
    and activations, placed where onnxruntime/TensorRT run integer kernels.
    Needs calibration data (--calib)."""

    tolerance = Tolerance(relative=None, cosine=0.8, lossy=True)

    method = Option(str, "minmax", "activation range calibration", choices=METHODS)
    per_channel = Option(bool, True, "per-output-channel weight scales (needs opset 13; else per tensor)")
    weight_type = Option(str, "int8", "type of quantized weights", choices=("int8", "uint8"))
    activation_type = Option(str, "uint8", "type of quantized activations (uint8 is fastest on x86)",
                             choices=("uint8", "int8"))
    symmetric_weights = Option(bool, True, "symmetric weight ranges (zero point 0 / 128)")
    symmetric_activations = Option(bool, False, "symmetric activation ranges (keeps Relu/Clip as nodes)")
    reduce_range = Option(bool, False, "7-bit weights, for x86 CPUs without VNNI")
    percentile = Option(float, 99.999, "percentile kept by method=percentile", min=50.0, max=100.0)
    samples = Option(int, 0, "calibrate on the first N samples (0: all)", min=0)
    ops = Option(list, list(DEFAULT_STATIC_OPS), "op types to quantize")
    keep_float = Option(list, list(DEFAULT_KEEP_FLOAT), "op types never quantized (wins over ops)")
    exclude_nodes = Option(list, [], "node names left in float")
    exclude_ops = Option(list, [], "op types left in float")
    exclude_regex = Option(str, "", "node names matching this regex (re.search) are left in float")
    fuse_activations = Option(bool, True, "absorb Relu/Clip after a quantized op into its output range")
    quantize_bias = Option(bool, True, "int32 bias for Conv/Gemm (else the bias stays float)")
    upgrade_opset = Option(bool, True, "upgrade opset < 13 to 13 (onnx version converter): QDQ needs 10, per-channel 13")
    bias_correction = Option(bool, True, "subtract the mean output error of weight quantization (measured on the "
                             "calibration data) from each channel's bias; see recovery.py")
    float_tails = Option(bool, True, "leave the decode tail after the last weighted op on the way to each output "
                                     "(sigmoid, box/score concat, grid offsets) in float")
    equalize = Option(bool, False, "cross-layer equalization of Conv->Relu->Conv chains before quantizing")

    # ------------------------------------------------------------------------------
    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from graphopt.passes.quantization import recovery
        from graphopt.passes.quantization import sensitivity as sens

        data = getattr(ctx, "calibration", None)
        if data is None:
            raise UsageError(f"pass '{self.name}' needs calibration data: pass --calib PATH "
                             f"(a .npz, a folder of arrays or images, or random:N)")
        spec = sens.fidelity_spec(self, ctx)
        try:
            regex = re.compile(self.exclude_regex) if self.exclude_regex else None
        except re.error as exc:
            raise UsageError(f"pass '{self.name}': option 'exclude-regex' is not a valid regex ({exc})") from None
        opset = model.opset
        notes: list[str] = []
        modified = False  # by the preparation (opset upgrade, node names), even if nothing is quantized
        if opset < 10:
            # QuantizeLinear arrived in opset 10: older models need the upgrade.
            if not (self.upgrade_opset and _upgrade_opset(model, 13)):
                return PassResult(False, {"quantized_nodes": 0},
                                  [f"opset {opset} < 10 has no QuantizeLinear and could not be upgraded; nothing done"])
            notes.append(f"opset {opset} upgraded to 13 (QuantizeLinear needs 10, per-channel scales 13)")
            opset, modified = 13, True
        per_channel = self.per_channel
        if per_channel and opset < 13:
            if self.upgrade_opset and _upgrade_opset(model, 13):
                notes.append(f"opset {opset} upgraded to 13 for per-channel weight scales")
                opset, modified = 13, True
            else:
                per_channel = False
                notes.append(f"opset {opset} < 13: per-tensor weight scales instead of per-channel")
        annotate_shapes(model)
        if spec is not None:  # keep-float works by name: name the unnamed
            taken = {n.name for n in model.graph.nodes if n.name}
            for node in model.graph.nodes:
                if not node.name and node.op in self.ops:
                    modified = True
                    node.name = fresh_name(taken, f"{node.op}_{node.outputs[0].name if node.outputs else 'node'}")
        notes += recovery.static_equalize(self, model)
        plan = self._plan(model, regex, per_channel)
        if not plan.nodes:
            return PassResult(modified, {"quantized_nodes": 0}, notes + ["no quantizable node"])
        fidelity = None
        if spec is not None:  # calibration must not see the held-out samples
            rank_samples, held_samples, data = sens.split_samples(data, self.fidelity_holdout, ctx.seed,
                                                                  self.fidelity_samples)
        if self.samples and self.samples < len(data):
            data = data.take(self.samples)
        ranges = self._calibrate(model, plan, data)
        missing = [n for n in plan.activations if n not in ranges]
        if missing:
            notes.append(f"{len(missing)} tensor(s) without a calibrated range left in float")
        if spec is not None:
            fidelity = self._fit(model, ctx, spec, regex, per_channel, plan, ranges, rank_samples, held_samples)
            plan = self._plan(model, regex, per_channel, fidelity.keep)
        corrected = recovery.static_bias_correction(self, model, plan, ranges, data, per_channel, notes)
        stats = self._apply(model, plan, ranges, per_channel)
        stats.update(corrected)
        if fidelity is not None:
            fidelity.conclude(model, stats["quantized_nodes"] > 0, stats, notes, ctx, self.name)
        stats["method"] = self.method
        stats["samples"] = len(data)
        for op, n in sorted(plan.skipped.items()):
            stats[f"skipped_{op}"] = n
        if plan.tail:
            stats["float_tail_nodes"] = plan.tail
        # An op list without weighted ops quantizes activations only: QDQ pairs are a change too.
        changed = modified or any(stats[k] for k in ("quantized_nodes", "qdq_pairs", "weights", "biases"))
        return PassResult(changed, stats, notes)

    def _fit(self, model: Model, ctx: PassContext, spec, regex, per_channel: bool, plan: _Plan,
             ranges: dict[str, tuple[float, float]], rank_samples, held_samples):
        """Rank the quantized nodes by the output error each causes alone and
        keep the worst in float until ``spec`` holds on held-out samples
        (sensitivity.py).  Ranges are calibrated once and reused by every
        candidate model."""
        from graphopt.passes.quantization import sensitivity as sens

        nodes = [(n.name, n.op) for n in plan.nodes if n.op not in PASSTHROUGH_OPS and n.name]
        names, (rank_refs, held_refs) = sens.reference_outputs(model.to_proto(), model.source_dir,
                                                               rank_samples, held_samples)

        def build(keep: frozenset[str]):
            m = model.copy()
            self._apply(m, self._plan(m, regex, per_channel, keep), ranges, per_channel)
            return m.to_proto()

        candidates = sens.RebuildCandidates(build, names, model.source_dir)
        return sens.search(spec, nodes, candidates, rank_samples, rank_refs, held_samples, held_refs,
                           max_probes=self.fidelity_probes, quiet=ctx.quiet, method="isolated (one model per probe)")

    # ------------------------------------------------------------------------------
    def _excluded(self, node: gs.Node, regex, extra: frozenset[str] = frozenset()) -> bool:
        return (
            node.name in extra
            or node.name in self.exclude_nodes
            or node.op in self.exclude_ops
            or (regex is not None and bool(regex.search(node.name or "")))
        )

    def _plan(self, model: Model, regex, per_channel: bool, extra: frozenset[str] = frozenset()) -> _Plan:
        graph = model.graph
        graph.toposort()
        overridable = model.overridable
        wanted = set(self.ops) - set(self.keep_float)
        tails = output_tails(graph) if self.float_tails else set()
        plan = _Plan()

        def const(t: gs.Tensor) -> gs.Constant | None:
            c = as_constant(t, overridable)
            return c if c is not None and c.dtype is not None and np.dtype(c.dtype) == _F32 else None

        def float_var(t: gs.Tensor) -> bool:
            return isinstance(t, gs.Variable) and bool(t.name) and _is_float(t) and as_constant(t, overridable) is None

        for node in graph.nodes:
            op = node.op
            if node.domain not in STANDARD_DOMAINS or op not in wanted or self._excluded(node, regex, extra):
                continue
            if id(node) in tails:
                plan.tail += 1
                continue
            if not node.outputs or not node.inputs:
                continue
            out = node.outputs[0]
            if op in WEIGHTED_OPS:
                if len(node.inputs) < 2 or not float_var(node.inputs[0]) or not _is_float(out):
                    plan.skipped[op] = plan.skipped.get(op, 0) + 1
                    continue
                w = const(node.inputs[1])
                if w is None and not (op == "MatMul" and float_var(node.inputs[1])):
                    plan.skipped[op] = plan.skipped.get(op, 0) + 1
                    continue
                if op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
                    axis = None  # per-channel along axis 1 is per group-slice; keep it simple
                elif op == "MatMul" and w is not None and len(w.shape) != 2:
                    axis = None
                else:
                    axis = weight_axis(node, len(w.shape)) if (per_channel and w is not None) else None
                plan.nodes.append(node)
                plan.act(node.inputs[0])
                if w is not None:
                    plan.weights.append((node, 1, axis))
                else:
                    plan.act(node.inputs[1])
                if op in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name:
                    if self.quantize_bias and const(node.inputs[2]) is not None and self._bias_ok(node, w):
                        plan.biases.append(node)
                plan.act(out)
            elif op in BINARY_OPS or op in VARIADIC_OPS:
                ins = [t for t in node.inputs if t.name]
                if not ins or not _is_float(out) or not all(float_var(t) or const(t) is not None for t in ins):
                    plan.skipped[op] = plan.skipped.get(op, 0) + 1
                    continue
                if all(const(t) is not None for t in ins):
                    continue  # folding's job, not ours
                plan.nodes.append(node)
                for i, t in enumerate(node.inputs):
                    if not t.name:
                        continue
                    if float_var(t):
                        plan.act(t)
                    else:
                        plan.constants.append((node, i))
                plan.act(out)
            elif op in PASSTHROUGH_OPS:
                x = node.inputs[0]
                if not float_var(x) or not plan.quantized(x.name):
                    continue
                outs = [o for o in node.outputs if o.name]
                if not outs or not all(_is_float(o) for o in outs):
                    continue
                plan.nodes.append(node)
                for o in outs:
                    plan.shared[o.name] = x.name
            else:  # UNARY_OPS, or a float-only op the user asked for: input 0 and outputs
                x = node.inputs[0]
                if not float_var(x) or not _is_float(out):
                    plan.skipped[op] = plan.skipped.get(op, 0) + 1
                    continue
                plan.nodes.append(node)
                plan.act(x)
                plan.act(out)
        if self.fuse_activations and not self.symmetric_activations:
            self._plan_fusions(model, plan, regex)
        return plan

    def _bias_ok(self, node: gs.Node, w: gs.Constant | None) -> bool:
        if w is None:
            return False
        b = node.inputs[2]
        shape = tuple(b.shape) if b.shape is not None else None
        if node.op == "Gemm":
            if float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0:
                return False
            n = w.shape[0] if int(node.attrs.get("transB", 0)) else w.shape[1]
            return shape == (n,)
        cout = w.shape[0] if node.op == "Conv" else w.shape[1] * int(node.attrs.get("group", 1))
        return shape == (cout,)

    def _plan_fusions(self, model: Model, plan: _Plan, regex) -> None:
        graph = model.graph
        overridable = model.overridable
        quantized = {id(n) for n in plan.nodes}
        for node in graph.nodes:
            if node.op not in ("Relu", "Clip") or node.domain not in STANDARD_DOMAINS or self._excluded(node, regex):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if len(x.inputs) != 1 or id(x.inputs[0]) not in quantized or x.name not in plan.activations:
                continue
            producer = x.inputs[0]
            if producer.op in PASSTHROUGH_OPS or producer.outputs[0] is not x:
                continue
            if len(x.outputs) != 1 or is_graph_output(graph, x) or is_graph_output(graph, y) or not _is_float(y):
                continue
            if node.op == "Clip" and not self._clip_absorbable(node, overridable):
                continue
            plan.fused.append((producer, node))
            del plan.activations[x.name]
            plan.act(y)

    @staticmethod
    def _clip_absorbable(node: gs.Node, overridable) -> bool:
        """A Clip is absorbed when its lower bound is <= 0 (so the range widened
        to include 0 still clamps at it or above) and its upper bound >= 0."""
        lo, hi = node.attrs.get("min", -np.inf), node.attrs.get("max", np.inf)
        for i, default in ((1, None), (2, None)):
            if len(node.inputs) > i and node.inputs[i].name:
                c = as_constant(node.inputs[i], overridable)
                if c is None:
                    return False
                if i == 1:
                    lo = float(np.asarray(c.values))
                else:
                    hi = float(np.asarray(c.values))
        return lo <= 0.0 <= hi

    # ------------------------------------------------------------------------------
    def _calibrate(self, model: Model, plan: _Plan, data) -> dict[str, tuple[float, float]]:
        from graphopt.calibration import collect_ranges

        op_types = sorted({n.op for n in plan.nodes} | {a.op for _, a in plan.fused})
        method = {"mse": "percentile"}.get(self.method, self.method)
        extra: dict[str, Any] = {}
        if self.method == "percentile":
            extra["percentile"] = self.percentile
        if self.method == "mse":
            extra.update({"symmetric": False, "num_bins": 2048})
        # onnxruntime's histogram calibrators print progress on stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            tensors = collect_ranges(model, data, method, op_types=op_types, extra_options=extra, description=None)
        qmin, qmax = qrange(self.activation_type, self.symmetric_activations)
        ranges: dict[str, tuple[float, float]] = {}
        for name in plan.activations:
            try:
                td = tensors[name]
            except (KeyError, TypeError):
                td = None
            if td is None:
                continue
            if self.method == "mse" and getattr(td, "hist", None) is not None and getattr(td, "hist_edges", None) is not None:
                lo, hi = _mse_range(np.asarray(td.hist), np.asarray(td.hist_edges), qmin, qmax,
                                    self.symmetric_activations)
            else:
                lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in td.range_value)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                continue
            ranges[name] = (lo, hi)
        return ranges

    # ------------------------------------------------------------------------------
    def _apply(self, model: Model, plan: _Plan, ranges: dict[str, tuple[float, float]], per_channel: bool) -> dict:
        graph = model.graph
        overridable = model.overridable
        builder = QDQBuilder(graph, opset=model.opset)
        act_type = self.activation_type

        # 1. Relu/Clip absorbed into their producer: the producer writes their output.
        for producer, act in plan.fused:
            y = act.outputs[0]
            act.inputs.clear()
            act.outputs.clear()
            producer.outputs[0] = y
        if plan.fused:
            removed = {id(a) for _, a in plan.fused}
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]

        # 2. Scales and zero points of every calibrated activation.
        params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in plan.activations:
            if name in ranges:
                lo, hi = ranges[name]
                params[name] = compute_scale_zero_point(lo, hi, act_type, symmetric=self.symmetric_activations)

        def resolve(name: str) -> tuple[np.ndarray, np.ndarray] | None:
            seen = set()
            while name in plan.shared and name not in seen:
                seen.add(name)
                name = plan.shared[name]
            return params.get(name)

        # 3. Weights (int8 initializers behind a DequantizeLinear) and int32 biases.
        weight_scales: dict[int, np.ndarray] = {}
        n_weights = 0
        for node, index, axis in plan.weights:
            if node.inputs[0].name not in params:
                continue  # its input stays float: leave the node alone
            w = as_constant(node.inputs[index], overridable)
            values = np.asarray(w.values)
            qt = quantize_weight(values, self.weight_type, symmetric=self.symmetric_weights, axis=axis,
                                 reduce_range=self.reduce_range)
            node.inputs[index] = builder.weight_dq(w, qt, key=(self.weight_type,))
            weight_scales[id(node)] = qt.scale
            n_weights += 1
        n_bias = 0
        for node in plan.biases:
            if id(node) not in weight_scales:
                continue
            in_params = params.get(node.inputs[0].name)
            b = as_constant(node.inputs[2], overridable)
            qb = quantize_bias(np.asarray(b.values), in_params[0], weight_scales[id(node)])
            base = node.name or b.name
            node.inputs[2] = builder.constant_dq(f"{base}_bias", qb)
            n_bias += 1

        # 4. Constant inputs of Add/Mul/Concat: quantized like activations.
        for node, i in plan.constants:
            c = as_constant(node.inputs[i], overridable)
            values = np.asarray(c.values)
            qt = quantize_weight(values, act_type, symmetric=self.symmetric_activations)
            node.inputs[i] = builder.weight_dq(c, qt, key=("activation", act_type))

        # 5. QDQ pairs on activations, in graph order (deterministic names).
        order = []
        seen: set[str] = set()
        for node in graph.nodes:
            for t in list(node.inputs) + list(node.outputs):
                if t.name and t.name not in seen and (t.name in plan.activations or t.name in plan.shared):
                    seen.add(t.name)
                    order.append(t)
        for t in graph.inputs:
            if t.name not in seen and (t.name in plan.activations):
                seen.add(t.name)
                order.insert(0, t)
        n_qdq = 0
        for t in order:
            p = resolve(t.name)
            if p is None:
                continue
            self._insert(graph, builder, t, p)
            n_qdq += 1

        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        quantized = sum(1 for n in plan.nodes if any(
            t.name in params or resolve(t.name) is not None for t in n.outputs if t.name))
        return {
            "quantized_nodes": quantized,
            "qdq_pairs": n_qdq,
            "weights": n_weights,
            "biases": n_bias,
            "fused_activations": len(plan.fused),
        }

    @staticmethod
    def _insert(graph: gs.Graph, builder: QDQBuilder, t: gs.Tensor, p) -> None:
        scale, zp = p
        if is_graph_output(graph, t) and len(t.inputs) == 1 and not is_graph_input(graph, t):
            # The output keeps its name on the dequantized value, so the
            # producer can fuse with the QuantizeLinear (as onnxruntime's quantizer does).
            builder.insert_qdq_at_output(t, scale, zp)
        else:
            builder.insert_qdq(t, scale, zp)


def _upgrade_opset(model: Model, target: int) -> bool:
    """Convert the model to ``target`` with onnx's version converter, in place;
    False (model untouched) when the converter cannot."""
    import onnx

    try:
        proto = onnx.version_converter.convert_version(model.to_proto(), target)
        new = Model.from_proto(proto, model.source_dir)
    except Exception:
        return False
    model.graph = new.graph
    model.info = new.info
    model.analyses.clear()
    return True


def _mse_range(hist: np.ndarray, edges: np.ndarray, qmin: int, qmax: int, symmetric: bool) -> tuple[float, float]:
    """The range ``[alpha*lo, alpha*hi]`` (``lo``/``hi`` the histogram's
    occupied extent, widened to include 0) whose uniform quantization to
    ``[qmin, qmax]`` has the least squared error over the histogram (bin
    centers weighted by counts), for alpha on a grid in (0, 1]."""
    hist = hist.astype(np.float64)
    edges = edges.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    nz = np.nonzero(hist)[0]
    if nz.size == 0:
        return 0.0, 0.0
    lo = min(edges[nz[0]], 0.0)
    hi = max(edges[nz[-1] + 1], 0.0)
    if symmetric:
        m = max(-lo, hi)
        lo, hi = -m, m
    c, h = centers[nz], hist[nz]
    best = (np.inf, lo, hi)
    for alpha in np.linspace(0.05, 1.0, 96):
        a, b = lo * alpha, hi * alpha
        scale = (b - a) / (qmax - qmin)
        if scale <= 0:
            continue
        zp = np.clip(np.round(qmin - a / scale), qmin, qmax)
        q = np.clip(np.rint(c / scale) + zp, qmin, qmax)
        err = float((h * ((q - zp) * scale - c) ** 2).sum() + h.sum() * scale * scale / 12.0)
        if err < best[0] - 1e-18:
            best = (err, a, b)
    return float(best[1]), float(best[2])
