"""Dynamic int8 quantization: int8 weights, activations quantized at run time.

The usual CPU recipe for transformer encoders.  Every selected MatMul/Gemm
with a constant 2-D float32 weight becomes

* ``format=fused`` (default): one ``com.microsoft.DynamicQuantizeMatMul``
  (activation quantized to uint8 inside the kernel, int8/uint8 weight,
  per-tensor or per-column weight scale, Gemm's bias in the epilogue).  This is
  the node onnxruntime itself fuses ``quantize_dynamic``'s output into, so the
  model starts from the fast form without relying on the fusion.
* ``format=onnx``: standard ops only, ``DynamicQuantizeLinear`` (shared by
  all consumers of one activation) + ``MatMulInteger`` + ``Cast`` + ``Mul``
  (+ ``Add`` for Gemm's bias), for runtimes without the contrib op.

Built for later work on top (activation smoothing, a fidelity budget): the
insertion is :func:`quantize_dynamic`, which takes a set of node names kept in
float (``keep_float``) and per-input-channel pre-scales (``smoothing``) that are
multiplied into the weight before it is quantized (``W' = diag(s) W``; the
activation is divided by ``s`` with an inserted Mul unless the caller has
already folded ``1/s`` upstream).  The pass reads both from
``ctx.scratch["quantize-dynamic"]`` so a cooperating pass can set them.
Site discovery (:func:`find_sites`) is shared with ``quantize-weights``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.errors import UsageError
from graphopt.ir import Model, iter_graphs
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, fresh_name, lacks_annotations, sole_consumer
from graphopt.passes.quantization.common import quantize_weight
from graphopt.passes.quantization.recovery import Smoothing, activation_stats, plan_smoothing, smooth_sites
from graphopt.passes.quantization.sensitivity import FidelityBudgetOptions
from graphopt.passes.shapes import annotate_shapes

MS_DOMAIN = "com.microsoft"
SUPPORTED_OPS = ("MatMul", "Gemm")
DYNAMIC_OPS = SUPPORTED_OPS + ("Gather", "LSTM")
SCRATCH_KEY = "quantize-dynamic"


# ----------------------------------------------------------------------------------
# Sites: a MatMul/Gemm with a constant weight, seen as y = alpha * x @ W[K, N] + bias
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Site:
    node: gs.Node
    weight: gs.Constant
    trans_b: bool  # weight stored [N, K] (Gemm transB=1)
    alpha: float = 1.0
    bias: np.ndarray | None = None  # beta * C as [N], Gemm only

    @property
    def k(self) -> int:
        return int(self.weight.shape[1 if self.trans_b else 0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[0 if self.trans_b else 1])

    def refresh(self, overridable=frozenset()) -> None:
        """Re-read weight and bias after a rewrite replaced the node's constants."""
        node = self.node
        if node.inputs[1] is not self.weight:
            self.weight = as_constant(node.inputs[1], overridable)
        if self.bias is not None and len(node.inputs) > 2:
            self.set_bias(as_constant(node.inputs[2], overridable))

    def set_bias(self, c: gs.Constant) -> None:
        """Gemm's ``beta * C`` as the [N] vector the quantized node adds."""
        bias = float(self.node.attrs.get("beta", 1.0)) * np.asarray(c.values, dtype=np.float32).reshape(-1)
        self.bias = np.ascontiguousarray(np.broadcast_to(bias, (self.n,)), dtype=np.float32)

    def matrix(self) -> np.ndarray:
        """The weight as float32 [K, N] (loads it; only call for weights being quantized)."""
        w = np.asarray(self.weight.values, dtype=np.float32)
        return np.ascontiguousarray(w.T if self.trans_b else w)


@dataclasses.dataclass
class Selection:
    """Which nodes a quantization pass may touch."""

    ops: tuple[str, ...] = SUPPORTED_OPS
    exclude_nodes: frozenset[str] = frozenset()
    exclude_ops: frozenset[str] = frozenset()
    exclude_regex: re.Pattern | None = None

    def allows(self, node: gs.Node) -> bool:
        if node.op not in self.ops or node.op in self.exclude_ops or node.domain not in STANDARD_DOMAINS:
            return False
        if node.name and node.name in self.exclude_nodes:
            return False
        return not (self.exclude_regex is not None and node.name and self.exclude_regex.search(node.name))


def make_selection(pass_name: str, ops: Iterable[str], exclude_nodes, exclude_ops, exclude_regex: str,
                   supported: tuple[str, ...] = SUPPORTED_OPS) -> Selection:
    ops = tuple(ops)
    bad = [op for op in ops if op not in supported]
    if bad or not ops:
        raise UsageError(
            f"pass '{pass_name}': option 'ops' must list ops among {','.join(supported)}, got '{','.join(ops)}'"
        )
    pattern = None
    if exclude_regex:
        try:
            pattern = re.compile(exclude_regex)
        except re.error as exc:
            raise UsageError(f"pass '{pass_name}': option 'exclude-regex': bad regular expression: {exc}") from None
    return Selection(ops, frozenset(exclude_nodes), frozenset(exclude_ops), pattern)


def _float32(dtype) -> bool:
    try:
        return dtype is not None and np.dtype(dtype) == np.float32
    except TypeError:
        return False


def find_sites(model: Model, selection: Selection, notes: list[str]) -> list[Site]:
    """MatMul/Gemm nodes of the main graph with a constant float32 2-D weight
    and a float32 activation, in graph order; what is skipped gets a note."""
    if lacks_annotations(model, set(selection.ops)):
        annotate_shapes(model)
    overridable = model.overridable
    sites: list[Site] = []
    for node in model.graph.nodes:
        if node.op in ("Gather", "LSTM") or not selection.allows(node):
            continue  # embedding tables: quantize_gathers; recurrences: recurrent.py
        label = f"{node.op} '{node.name or node.outputs[0].name}'"
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            continue
        x = node.inputs[0]
        weight = as_constant(node.inputs[1], overridable)
        if weight is None or isinstance(x, gs.Constant):
            continue  # activation x activation (attention scores) or constant input: not a weight product
        if len(weight.shape) != 2 or not _float32(weight.dtype):
            notes.append(f"{label}: weight is not a 2-D float32 constant; left in float")
            continue
        if not _float32(x.dtype):
            notes.append(f"{label}: activation is not known to be float32; left in float")
            continue
        if x.shape is not None and len(x.shape) < 2:
            notes.append(f"{label}: 1-D activation; left in float")
            continue
        if node.op == "MatMul":
            sites.append(Site(node, weight, trans_b=False))
            continue
        # Gemm: y = alpha * op(A) @ op(B) + beta * C
        if int(node.attrs.get("transA", 0)):
            notes.append(f"{label}: transA=1 is not supported; left in float")
            continue
        site = Site(node, weight, trans_b=bool(int(node.attrs.get("transB", 0))),
                    alpha=float(node.attrs.get("alpha", 1.0)))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = as_constant(node.inputs[2], overridable)
            shape = tuple(c.shape) if c is not None else None
            if c is None or not _float32(c.dtype) or shape not in ((), (1,), (site.n,), (1, site.n)):
                notes.append(f"{label}: bias C is not a constant broadcast over rows; left in float")
                continue
            site.set_bias(c)
        sites.append(site)
    return sites


# ----------------------------------------------------------------------------------
# Insertion
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class DynamicConfig:
    per_channel: bool = False
    signed: bool = True
    reduce_range: bool = False
    fmt: str = "fused"


class _Builder:
    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.names = {name for g in iter_graphs(model.graph) for name in g.tensors()}
        self.removed: set[int] = set()
        self.new_nodes: list[gs.Node] = []
        self.weight_cache: dict[tuple, tuple] = {}
        self.dql_cache: dict[int, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
        self.smooth_cache: dict[tuple, gs.Variable] = {}
        self.replacements: dict[int, list[gs.Node]] = {}
        self.overridable = model.overridable
        self.keep: set[str] = set()
        self.readers: dict[tuple, int] = {}

    def splice(self) -> None:
        """Put each replaced node's new nodes where it was, so the graph reads
        in its original order."""
        nodes: list[gs.Node] = []
        for n in self.graph.nodes:
            if id(n) in self.replacements:
                nodes.extend(self.replacements[id(n)])
            elif id(n) not in self.removed:
                nodes.append(n)
        self.graph.nodes = nodes
        self.graph.toposort()

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(self.names, base), np.array(values, order="C"))  # keeps 0-d

    def var(self, base: str, dtype=None) -> gs.Variable:
        return gs.Variable(fresh_name(self.names, base), dtype=dtype)

    def node(self, op: str, name: str, inputs, outputs, domain: str | None = None, **attrs) -> gs.Node:
        n = gs.Node(op, name=name, attrs=attrs, inputs=list(inputs), outputs=list(outputs), domain=domain)
        self.new_nodes.append(n)
        return n


def quantize_dynamic(
    model: Model,
    sites: list[Site],
    config: DynamicConfig,
    *,
    keep_float: Iterable[str] = (),
    smoothing: Mapping[str, Smoothing] | None = None,
) -> dict[str, int]:
    """Replace each site not in ``keep_float`` by its dynamically quantized
    form; returns counters.  Weights shared by several sites are quantized
    once (per pre-scale)."""
    keep = set(keep_float)
    smoothing = dict(smoothing or {})
    b = _Builder(model)
    b.keep = keep
    for site in sites:  # how many quantized sites read each (smoothed) activation
        if not (site.node.name and site.node.name in keep):
            key = _activation_key(site.node.inputs[0], smoothing.get(site.node.name) if site.node.name else None)
            b.readers[key] = b.readers.get(key, 0) + 1
    counts = {"quantized": 0, "kept_float": 0, "weights": 0}
    for site in sites:
        node = site.node
        if node.name and node.name in keep:
            counts["kept_float"] += 1
            if node.name in smoothing and smoothing[node.name].folded:  # its input is x/s already: W -> diag(s) W
                node.inputs[1] = b.const(site.weight.name + "_smoothed", _smoothed_float_weight(site, smoothing[node.name]))
            continue
        smooth = smoothing.get(node.name) if node.name else None
        if smooth is not None and np.shape(smooth.scale) != (site.k,):
            raise UsageError(f"quantize-dynamic: smoothing scale of '{node.name}' has shape "
                             f"{np.shape(smooth.scale)}, the weight has K={site.k}")
        start = len(b.new_nodes)
        _quantize_site(b, site, config, smooth, counts)
        b.replacements[id(node)] = b.new_nodes[start:]
        counts["quantized"] += 1
    if counts["quantized"]:
        b.splice()
    return counts


def _quantized_weight(b: _Builder, site: Site, config: DynamicConfig, smooth: Smoothing | None, counts):
    key = (id(site.weight), site.trans_b, site.alpha, None if smooth is None else smooth.scale.tobytes())
    if key not in b.weight_cache:
        w = site.matrix()
        if smooth is not None:
            w = w * np.asarray(smooth.scale, np.float32)[:, None]
        # int8: symmetric [-127, 127], zero point 0; uint8: asymmetric (common.py's conventions).
        qw = quantize_weight(w, "int8" if config.signed else "uint8", symmetric=config.signed,
                             axis=1 if config.per_channel else None, reduce_range=config.reduce_range)
        scale = (np.asarray(qw.scale, np.float64) * site.alpha).astype(np.float32)
        base = site.weight.name
        b.weight_cache[key] = (
            b.const(base + "_quantized", qw.values),
            b.const(base + "_scale", scale),
            b.const(base + "_zero_point", qw.zero_point),
            qw,
        )
        counts["weights"] += 1
    return b.weight_cache[key]


def _smoothed_float_weight(site: Site, smooth: Smoothing) -> np.ndarray:
    """The float weight as stored, times ``diag(s)`` along K (for a site kept in float)."""
    s = np.asarray(smooth.scale, np.float64)
    w = np.asarray(site.weight.values, np.float64)
    return (w * s[None, :] if site.trans_b else w * s[:, None]).astype(np.float32)


def _activation_key(x: gs.Tensor, smooth: Smoothing | None) -> tuple:
    """Identifies the activation a site quantizes: ``x``, or ``x / s``."""
    return (id(x), None if smooth is None or smooth.folded else smooth.scale.tobytes())


def _smoothed_input(b: _Builder, x: gs.Tensor, smooth: Smoothing | None, label: str) -> gs.Tensor:
    if smooth is None or smooth.folded:
        return x
    key = _activation_key(x, smooth)
    if key not in b.smooth_cache:
        inv = (1.0 / np.asarray(smooth.scale, np.float64)).astype(np.float32)
        out = b.var(x.name + "_smoothed", np.float32)
        b.node("Mul", f"{label}_smooth", [x, b.const(x.name + "_inv_smooth", inv)], [out])
        b.smooth_cache[key] = out
    return b.smooth_cache[key]


def _bias_add(b: _Builder, site: Site):
    """``(bias [N], Add output)`` when a MatMul's only reader is an Add of a
    constant float32 bias broadcast over rows, else None."""
    if site.node.op != "MatMul" or site.bias is not None:
        return None
    out = site.node.outputs[0]
    add = sole_consumer(b.graph, out)
    if add is None or add.op != "Add" or add.domain not in STANDARD_DOMAINS or len(add.inputs) != 2:
        return None
    if add.name and add.name in b.keep:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    c = as_constant(other, b.overridable)
    if c is None or other is out or not _float32(c.dtype) or tuple(c.shape) not in ((site.n,), (1, site.n)):
        return None
    if out.shape is None or len(out.shape) < 2:
        return None  # a [1, N] bias would add a dimension to a 1-D result
    return np.asarray(c.values, np.float32).reshape(-1), add.outputs[0]


def _quantize_site(b: _Builder, site: Site, config: DynamicConfig, smooth: Smoothing | None, counts) -> None:
    node = site.node
    label = node.name or node.outputs[0].name
    wq, wscale, wzp, _ = _quantized_weight(b, site, config, smooth, counts)
    shared = b.readers.get(_activation_key(node.inputs[0], smooth), 0) > 1
    x = _smoothed_input(b, node.inputs[0], smooth, label)
    y = node.outputs[0]
    bias_values = site.bias
    add = _bias_add(b, site) if config.fmt == "fused" else None
    if add is not None:
        # MatMul + constant Add: the bias goes into the kernel's epilogue.
        bias_values, y = add
        add_node = y.inputs[0]
        add_node.inputs.clear()
        add_node.outputs.clear()
        b.removed.add(id(add_node))
        counts["bias_absorbed"] = counts.get("bias_absorbed", 0) + 1
    node.inputs.clear()
    node.outputs.clear()
    b.removed.add(id(node))
    bias = None if bias_values is None else b.const(site.weight.name + "_bias", bias_values)
    if config.fmt == "fused" and not shared:
        inputs = [x, wq, wscale]
        # Symmetric int8: the zero point is 0, the kernel's default.
        if not config.signed or bias is not None:
            inputs.append(wzp)
        if bias is not None:
            inputs.append(bias)
        b.node("DynamicQuantizeMatMul", f"{label}_dynamic_quant", inputs, [y], domain=MS_DOMAIN)
        return
    # One DynamicQuantizeLinear per activation, shared by all its readers
    # (attention's Q/K/V projections): the activation is quantized once.
    xq, xs, xzp = _dynamic_quantize(b, x)
    if config.fmt == "fused":
        inputs = [xq, wq, xs, wscale, xzp, wzp] + ([bias] if bias is not None else [])
        b.node("MatMulIntegerToFloat", f"{label}_integer", inputs, [y], domain=MS_DOMAIN)
        return
    acc = b.var(y.name + "_int32", np.int32)
    b.node("MatMulInteger", f"{label}_integer", [xq, wq, xzp, wzp], [acc])
    accf = b.var(y.name + "_int32_float", np.float32)
    b.node("Cast", f"{label}_cast", [acc], [accf], to=1)
    scale = b.var(y.name + "_rescale", np.float32)
    b.node("Mul", f"{label}_scales_mul", [xs, wscale], [scale])
    if bias is None:
        b.node("Mul", f"{label}_rescale", [accf, scale], [y])
    else:
        pre = b.var(y.name + "_nobias", np.float32)
        b.node("Mul", f"{label}_rescale", [accf, scale], [pre])
        b.node("Add", f"{label}_bias", [pre, bias], [y])


def quantize_gathers(model: Model, selection: Selection, notes: list[str]) -> int:
    """Embedding lookups ``Gather(table, ids)`` of a constant 2-D float32 table
    become ``DequantizeLinear(Gather(int8 table, ids))`` with one symmetric
    scale per column (per tensor below opset 13): the table shrinks 4x and
    only the gathered rows are dequantized.  Returns how many were rewritten."""
    if "Gather" not in selection.ops:
        return 0
    opset = model.opset
    overridable = model.overridable
    b = _Builder(model)
    cache: dict[int, tuple[gs.Constant, gs.Constant, gs.Constant]] = {}
    done = 0
    for node in list(model.graph.nodes):
        if node.op != "Gather" or not selection.allows(node) or len(node.inputs) != 2 or len(node.outputs) != 1:
            continue
        table = as_constant(node.inputs[0], overridable)
        if table is None or isinstance(node.inputs[1], gs.Constant) or int(node.attrs.get("axis", 0)) != 0:
            continue  # not a lookup into a weight table (constant indices fold away)
        if len(table.shape) != 2 or not _float32(table.dtype) or table.shape[0] * table.shape[1] < 4096:
            continue
        if id(table) not in cache:
            per_column = opset >= 13
            qt = quantize_weight(np.asarray(table.values, np.float32), "int8", symmetric=True,
                                 axis=1 if per_column else None)
            cache[id(table)] = (b.const(table.name + "_quantized", qt.values),
                                b.const(table.name + "_scale", qt.scale),
                                b.const(table.name + "_zero_point", qt.zero_point))
        wq, scale, zp = cache[id(table)]
        y = node.outputs[0]
        yq = b.var(y.name + "_quantized", np.int8)
        node.inputs[0] = wq
        node.outputs[0] = yq
        attrs = {"axis": -1} if opset >= 13 else {}
        model.graph.nodes.append(gs.Node("DequantizeLinear", name=f"{node.name or y.name}_dequantize",
                                         inputs=[yq, scale, zp], outputs=[y], attrs=attrs))
        done += 1
    if done:
        model.graph.toposort()
    return done


def _dynamic_quantize(b: _Builder, x: gs.Tensor) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
    if id(x) not in b.dql_cache:
        xq, xs, xzp = b.var(x.name + "_quantized", np.uint8), b.var(x.name + "_scale", np.float32), \
            b.var(x.name + "_zero_point", np.uint8)
        b.node("DynamicQuantizeLinear", f"{x.name}_dynamic_quantize", [x], [xq, xs, xzp])
        b.dql_cache[id(x)] = (xq, xs, xzp)
    return b.dql_cache[id(x)]


@register_pass("quantize-dynamic")
class QuantizeDynamic(FidelityBudgetOptions, Pass):
    """Quantize MatMul/Gemm weights to int8 with activations quantized at run
    time (onnxruntime DynamicQuantizeMatMul, or standard MatMulInteger ops)."""

    tolerance = Tolerance(relative=None, cosine=0.8, lossy=True)

    per_channel = Option(bool, False, "one weight scale per output column instead of per tensor")
    weight_type = Option(str, "int8", "weight type: int8 (symmetric) or uint8 (asymmetric)", choices=("int8", "uint8"))
    reduce_range = Option(bool, False, "7-bit weights, for CPUs without VNNI whose u8s8 kernels saturate")
    ops = Option(list, list(DYNAMIC_OPS), "op types to quantize (MatMul, Gemm; Gather: int8 embedding tables, "
                 "dequantized after the lookup; LSTM: onnxruntime's DynamicQuantizeLSTM)")
    exclude_nodes = Option(list, [], "node names left in float")
    exclude_ops = Option(list, [], "op types left in float")
    exclude_regex = Option(str, "", "nodes whose name matches this regular expression are left in float")
    format = Option(str, "fused", "fused: com.microsoft DynamicQuantizeMatMul; onnx: standard "
                    "DynamicQuantizeLinear+MatMulInteger", choices=("fused", "onnx"))
    smooth = Option(bool, False, "SmoothQuant: move activation outliers into the weights, 1/s folded into the "
                    "preceding LayerNormalization/Mul (needs --calib; see recovery.py)")
    smooth_alpha = Option(float, 0.5, "smoothing strength a: s = max|X|^a / max|W|^(1-a)", min=0.0, max=1.0)
    smooth_unfolded = Option(bool, False, "smooth activations that cannot be folded too, with an inserted Mul")

    fidelity_probes = Option(int, 128, "at most this many sensitivity probes, each one run of a single switched "
                             "model (beyond: neighbouring nodes are probed in groups)", min=1)
    recipe = Option(str, "auto", "with a fidelity budget, auto: first pick the weight granularity and smoothing "
                    "strength (per-tensor/per-channel x none/0.5/0.6/0.7/0.8) with the best fidelity on the ranking "
                    "samples, then keep nodes in float as needed; fixed: use per-channel/smooth as given",
                    choices=("auto", "fixed"))

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from graphopt.passes.quantization import sensitivity as sens

        selection = make_selection(self.name, self.ops, self.exclude_nodes, self.exclude_ops, self.exclude_regex,
                                   supported=DYNAMIC_OPS)
        spec = sens.fidelity_spec(self, ctx)
        if self.format == "onnx" and model.opset < 11:
            return PassResult(False, {"quantized": 0}, ["format=onnx needs opset >= 11 (DynamicQuantizeLinear)"])
        notes: list[str] = []
        sites = find_sites(model, selection, notes)
        shared = ctx.scratch.get(SCRATCH_KEY, {})
        config = DynamicConfig(per_channel=self.per_channel, signed=self.weight_type == "int8",
                               reduce_range=self.reduce_range, fmt=self.format)
        keep = set(shared.get("keep_float", ()))
        alpha = self.smooth_alpha if self.smooth else None
        unfolded = self.smooth_unfolded
        data, budget, stats, named = ctx.calibration, None, {}, 0
        lstms = "LSTM" in selection.ops and any(n.op == "LSTM" for n in model.graph.nodes)
        if spec is not None and (sites or lstms):
            named = _name_sites(model, sites)
            # Samples split once; references come from the float model, before any smoothing is folded in.
            budget = sens.BudgetData.prepare(model, ctx, self)
            data = budget.calib
            if self.recipe == "auto" and "smoothing" not in shared and sites:
                recipe, stats["recipe"] = self._choose_recipe(model, ctx, spec, selection, config, keep, budget)
                config.per_channel, alpha, unfolded = recipe.per_channel, recipe.alpha, True
        shared, smooth_stats = smooth_sites(self.name, model, sites, data, shared, notes, alpha=alpha,
                                            unfolded=unfolded, per_channel=config.per_channel)
        fidelity = None
        if budget is not None and sites:
            fidelity = self._fit(model, ctx, spec, selection, sites, config, keep, shared.get("smoothing"), budget)
            keep |= fidelity.keep
        counts = quantize_dynamic(model, sites, config, keep_float=keep, smoothing=shared.get("smoothing"))
        if counts["quantized"] or not sites:  # lookups go with the matmuls (a budget that keeps all float: none)
            counts["gathers"] = quantize_gathers(model, selection, notes)
            counts["quantized"] += counts["gathers"]
        if lstms:
            counts["lstms"] = self._quantize_lstms(model, selection, spec, budget, notes, stats)
            counts["quantized"] += counts["lstms"]
        if smooth_stats.get("smoothed_folded"):  # constants replaced by their smoothed copies
            model.graph.cleanup(remove_unused_graph_inputs=False)
        stats.update(counts)
        stats.update(smooth_stats)
        if config.per_channel != self.per_channel:
            stats["per_channel"] = config.per_channel
        if fidelity is not None:
            fidelity.conclude(model, counts["quantized"] > 0, stats, notes, ctx, self.name)
        # Smoothing rewrites the graph (exactly) even where the budget then keeps everything float.
        changed = counts["quantized"] > 0 or named > 0 or bool(smooth_stats.get("smoothed"))
        return PassResult(changed=changed, stats=stats, notes=notes)

    def _quantize_lstms(self, model: Model, selection: Selection, spec, budget, notes: list[str], stats: dict) -> int:
        """DynamicQuantizeLSTM for the LSTMs (recurrent.py); under a fidelity
        budget only if the model with them quantized still meets it on the
        held-out samples, else they all stay float and the note says why."""
        from graphopt.passes.quantization import sensitivity as sens
        from graphopt.passes.quantization.recurrent import quantize_lstms

        if self.format == "onnx":
            notes.append("LSTM: format=onnx has no quantized LSTM; left in float")
            return 0
        if budget is None:
            return quantize_lstms(model, selection.allows, per_channel=self.per_channel, notes=notes)
        trial = model.copy()
        n = quantize_lstms(trial, selection.allows, per_channel=self.per_channel, notes=notes)
        if not n:
            return 0
        report = sens.measure_model(spec, trial.to_proto(), trial.source_dir, budget.held, budget.held_refs)
        stats["lstm_heldout"] = {"samples": report.samples, **{m: sens.number(v) for m, v in report.values.items()}}
        if not report.met:
            notes.append(f"LSTM: {n} kept in float: quantized, the held-out samples measure "
                         f"{report.line(list(spec.metrics))}, which misses {spec}")
            return 0
        model.graph, model.info = trial.graph, trial.info
        return n

    def _choose_recipe(self, model: Model, ctx: PassContext, spec, selection: Selection, config: DynamicConfig,
                       keep: set[str], budget) -> tuple["Recipe", dict]:
        """Quantize the whole model with each recipe and keep the one whose
        outputs are closest to the float model's; ties go to the simpler
        recipe.  The calibration part of the samples is split in two: smoothing
        statistics come from one half and recipes are judged on the other, so
        a strength that only fits the statistics' own samples is not chosen
        (the held-out samples stay unseen)."""
        from graphopt import runtime
        from graphopt.console import progress
        from graphopt.passes.quantization import sensitivity as sens

        fit, judge = budget.calib.split(0.5, ctx.seed + 1) if len(budget.calib) >= 2 else (budget.calib,) * 2
        judge = list(judge)
        names, (refs,) = sens.reference_outputs(model.to_proto(), model.source_dir, judge)
        fit_stats = _activation_stats(model, find_sites(model, selection, []), fit)
        tried = []
        best: tuple[float, int, Recipe] | None = None
        for i, recipe in enumerate(progress(RECIPES, description="quantize-dynamic: choosing a recipe",
                                            quiet=ctx.quiet)):
            m = model.copy()
            m_sites = find_sites(m, selection, [])
            smoothing = None
            if recipe.alpha is not None:
                smoothing, _ = plan_smoothing(m, m_sites, fit, recipe.alpha, keep_float=keep, unfolded=True,
                                              stats=fit_stats, per_channel=recipe.per_channel)
            cfg = dataclasses.replace(config, per_channel=recipe.per_channel)
            quantize_dynamic(m, m_sites, cfg, keep_float=keep, smoothing=smoothing)
            sess = runtime.session(m.to_proto(), source_dir=m.source_dir)
            values = sens.metric_values(sens.run_all(sess, judge, names), refs, spec, judge)
            badness = spec.badness(values)
            tried.append({"recipe": str(recipe), **{k: sens.number(v) for k, v in values.items()}})
            if best is None or badness < best[0] - 1e-9:
                best = (badness, i, recipe)
        chosen = best[2]
        ctx.info(f"graphopt: {self.name}: recipe {chosen} (best of {len(RECIPES)}, statistics from "
                 f"{len(fit)} calibration sample(s), judged on {len(judge)} others)")
        return chosen, {"chosen": str(chosen), "statistics_samples": len(fit), "judged_on": len(judge),
                        "tried": tried}

    def _fit(self, model: Model, ctx: PassContext, spec, selection: Selection, sites: list[Site],
             config: DynamicConfig, keep: set[str], smoothing, budget):
        """Rank the sites by the output error each causes alone and keep the
        worst in float until ``spec`` holds on held-out samples (sensitivity.py)."""
        from graphopt.passes.quantization import sensitivity as sens

        nodes = [(s.node.name, s.node.op) for s in sites if s.node.name not in keep]
        proto, switches = switched_model(model, selection, config, {n for n, _ in nodes}, smoothing)
        candidates = sens.SwitchedCandidates(proto, switches, budget.names, model.source_dir)
        return sens.search(spec, nodes, candidates, budget.rank, budget.rank_refs, budget.held, budget.held_refs,
                           max_probes=self.fidelity_probes, quiet=ctx.quiet, method="isolated (switched model)")


@dataclasses.dataclass(frozen=True)
class Recipe:
    per_channel: bool
    alpha: float | None  # smoothing strength; None: no smoothing

    def __str__(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        return gran + (f", smoothing a={self.alpha:g}" if self.alpha is not None else ", no smoothing")


# Simplest first: ties keep the earlier one.
RECIPES = tuple(Recipe(pc, a) for a in (None, 0.5, 0.6, 0.7, 0.8) for pc in (False, True))


def _name_sites(model: Model, sites: list[Site]) -> int:
    """keep_float and the budget work by node name: name the unnamed; returns how many."""
    taken = {n.name for n in model.graph.nodes if n.name}
    named = 0
    for site in sites:
        if not site.node.name:
            site.node.name = fresh_name(taken, f"{site.node.op}_{site.node.outputs[0].name}")
            named += 1
    return named


def _activation_stats(model: Model, sites: list[Site], data):

    return activation_stats(model, sites, data)


def switched_model(model: Model, selection: Selection, config: DynamicConfig, names: set[str],
                   smoothing: Mapping[str, Smoothing] | None = None):
    """A copy of ``model`` in which every site named in ``names`` computes
    ``y = y_float + s * (y_quantized - y_float)`` with ``s`` a new scalar float
    input; returns ``(proto, {node name: switch input name})``.  The quantized
    result is DynamicQuantizeMatMul with the weight quantized as the pass does
    (format=onnx and the shared-activation form compute the same values up to
    rounding).  With ``smoothing`` (already folded upstream where ``folded``),
    float branches use ``diag(s) W`` where their input is ``x / s``."""
    smoothing = dict(smoothing or {})
    m = model.copy()
    b = _Builder(m)
    counts: dict[str, int] = {"weights": 0}
    switches: dict[str, str] = {}
    for site in find_sites(m, selection, []):
        node = site.node
        smooth = smoothing.get(node.name) if node.name else None
        if smooth is not None and smooth.folded:  # the input is x / s: the float product needs diag(s) W
            node.inputs[1] = b.const(site.weight.name + "_smoothed", _smoothed_float_weight(site, smooth))
        if node.name not in names:
            continue
        wq, wscale, wzp, _ = _quantized_weight(b, site, config, smooth, counts)
        x, y = _smoothed_input(b, node.inputs[0], smooth, node.name), node.outputs[0]
        yf = b.var(y.name + "_float", y.dtype)
        yq = b.var(y.name + "_quant", y.dtype)
        node.outputs[0] = yf
        inputs = [x, wq, wscale, wzp]
        if site.bias is not None:
            inputs.append(b.const(site.weight.name + "_bias", site.bias))
        b.node("DynamicQuantizeMatMul", f"{node.name}_fidelity_quant", inputs, [yq], domain=MS_DOMAIN)
        s = gs.Variable(fresh_name(b.names, f"graphopt_fidelity_switch_{len(switches)}"), dtype=np.float32,
                        shape=[])
        m.graph.inputs.append(s)
        d = b.var(y.name + "_qdiff", y.dtype)
        sd = b.var(y.name + "_qdiff_switched", y.dtype)
        b.node("Sub", f"{node.name}_fidelity_sub", [yq, yf], [d])
        b.node("Mul", f"{node.name}_fidelity_mul", [d, s], [sd])
        b.node("Add", f"{node.name}_fidelity_add", [yf, sd], [y])
        switches[node.name] = s.name
    m.graph.nodes.extend(b.new_nodes)
    m.graph.toposort()
    return m.to_proto(), switches
