"""Accuracy recovery without training, for the quantization passes.

Three float-side rewrites, each measured on the calibration data
(``ctx.calibration``) or on the weights alone, that make a later
quantization lose less:

* **activation smoothing** (SmoothQuant, ``quantize-dynamic{smooth=true}``):
  for each activation ``X`` read by quantized MatMul/Gemm weights, a
  per-input-channel scale ``s_j = max|X_j|^a / max|W_j|^(1-a)`` moves outlier
  magnitude from the activation into the weight rows (``X diag(1/s)`` times
  ``diag(s) W``).  ``1/s`` is folded upstream when every reader of ``X`` is
  smoothed with the same ``s`` (Q/K/V share one) and ``X`` comes, through
  ops that commute with the scale, from a LayerNormalization, a per-channel
  Mul or a constant weight's columns (attention's context: V's projection;
  channel_scale.py); otherwise the activation is left alone (or, with
  ``smooth-unfolded=true``, divided by an inserted Mul).  Folding is exact in
  float.
* **bias correction** (``quantize-static{bias-correction=true}``): the mean
  output error ``E[(W_q - W) x]`` that weight quantization adds to each output
  channel of a Conv/Gemm/MatMul, with ``E[x]`` the per-channel mean of its
  input over the calibration samples, is subtracted from the bias (a bias is
  created when absent; a MatMul's is the constant Add that follows it).
* **cross-layer equalization** (``quantize-static{equalize=true}``): in
  ``Conv -> [Relu|LeakyRelu] -> Conv`` chains the first conv's output channel
  ``i`` is divided by ``s_i = sqrt(r1_i / r2_i)`` and the second conv's input
  channel multiplied by it (``r`` the channels' weight ranges), which is
  exact because the activations are positively homogeneous; both ranges
  become ``sqrt(r1 r2)``.

Everything here is deterministic; new constants get fresh names, so shared
weights are never changed for their other readers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import UsageError
from graphopt.ir import Model, iter_graphs
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, fresh_name, is_graph_output
from graphopt.passes.quantization import channel_scale
from graphopt.passes.shapes import refine_with_symbolic_inference

_F32 = np.dtype(np.float32)
SCALE_LIMITS = (1e-4, 1e4)


# ----------------------------------------------------------------------------------
# Calibration statistics
# ----------------------------------------------------------------------------------
def channel_stats(model: Model, data: Iterable[Mapping[str, np.ndarray]], axes: Mapping[str, int]
                  ) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel ``absmax`` and ``mean`` of float tensors over the samples.

    ``axes``: tensor name -> channel axis (``-1`` for MatMul activations, ``1``
    for NCHW).  The model is run in onnxruntime with those tensors exposed as
    extra outputs; tensors it cannot produce are missing from the result.
    """
    from graphopt import runtime
    from graphopt.activations import with_outputs

    if not axes:
        return {}
    proto = with_outputs(model, list(axes))
    sess = runtime.session(proto, source_dir=model.source_dir)
    names = list(axes)
    inputs = {i.name for i in sess.get_inputs()}
    acc: dict[str, dict[str, Any]] = {}
    for feed in data:
        outs = sess.run(names, {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip(names, outs):
            v = np.asarray(value, np.float64)
            if v.ndim == 0:
                continue
            ax = axes[name] % v.ndim
            flat = np.moveaxis(v, ax, 0).reshape(v.shape[ax], -1)
            if flat.shape[1] == 0:
                continue
            a = acc.setdefault(name, {"absmax": np.zeros(flat.shape[0]), "sum": np.zeros(flat.shape[0]), "n": 0})
            if a["absmax"].shape != (flat.shape[0],):
                continue
            finite = np.where(np.isfinite(flat), flat, 0.0)
            a["absmax"] = np.maximum(a["absmax"], np.abs(finite).max(axis=1))
            a["sum"] += finite.sum(axis=1)
            a["n"] += flat.shape[1]
    return {name: {"absmax": a["absmax"], "mean": a["sum"] / max(a["n"], 1)} for name, a in acc.items()}


class ConstantNames:
    """Fresh names for new constants (tensor and node names already taken are avoided)."""

    def __init__(self, model: Model):
        self.taken = {name for g in iter_graphs(model.graph) for name in g.tensors()}
        for g in iter_graphs(model.graph):
            self.taken.update(n.name for n in g.nodes if n.name)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(self.taken, base), np.array(values, order="C"))


@dataclasses.dataclass
class Smoothing:
    """Per-input-channel pre-scale ``s`` [K] of one node: the weight becomes
    ``diag(s) W`` before quantization; unless ``folded`` (the caller already
    divided the activation by ``s`` upstream, e.g. in a LayerNorm's gamma),
    an ``x * (1/s)`` Mul is inserted in front of the node."""

    scale: np.ndarray
    folded: bool = False


def _f32_const(t: gs.Tensor, overridable) -> gs.Constant | None:
    c = as_constant(t, overridable)
    if c is None or c.dtype is None or np.dtype(c.dtype) != _F32:
        return None
    return c


# ----------------------------------------------------------------------------------
# SmoothQuant for quantize-dynamic
# ----------------------------------------------------------------------------------
def smoothing_scale(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, 1 where either is 0,
    clipped to :data:`SCALE_LIMITS`, float32."""
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, *SCALE_LIMITS).astype(np.float32)


def activation_stats(model: Model, sites: Sequence[Any], data) -> dict[str, dict[str, np.ndarray]]:
    """Per-channel statistics of the activations ``sites`` read, for
    :func:`plan_smoothing` (computed once when several strengths are tried)."""
    return channel_stats(model, data, {site.node.inputs[0].name: -1 for site in sites})


def plan_smoothing(model: Model, sites: Sequence[Any], data, alpha: float, *, keep_float: Iterable[str] = (),
                   existing: Mapping[str, Any] | None = None, unfolded: bool = False,
                   notes: list[str] | None = None, stats: Mapping[str, Any] | None = None,
                   per_channel: bool = True) -> tuple[dict[str, Any], dict[str, int]]:
    """Compute SmoothQuant scales for ``sites`` (from :func:`graphopt.passes.quantization.
    dynamic.find_sites`) on ``data`` (or precomputed :func:`activation_stats`)
    and fold ``1/s`` upstream where possible (edits the model).  Returns
    ``({node name: Smoothing}, counters)``; the caller multiplies ``s`` into
    the weights (``quantize_dynamic`` does).  ``1/s`` goes into the columns of
    another site's weight only when weights are quantized ``per_channel``
    (per-column scales make that exact; one per-tensor scale would not be)."""
    notes = notes if notes is not None else []
    keep = set(keep_float)
    existing = dict(existing or {})
    overridable = model.overridable
    groups: dict[str, list[Any]] = {}
    tensors: dict[str, gs.Tensor] = {}
    for site in sites:
        node = site.node
        if not node.name or node.name in keep:
            continue
        x = node.inputs[0]
        groups.setdefault(x.name, []).append(site)
        tensors[x.name] = x
    # a group some cooperating pass already smoothed stays as it is
    groups = {n: g for n, g in groups.items() if not any(s.node.name in existing for s in g)}
    if stats is None:
        stats = channel_stats(model, data, {name: -1 for name in groups})
    if groups:
        refine_with_symbolic_inference(model)  # static head dims for folding through attention
    names = ConstantNames(model)
    out: dict[str, Any] = dict(existing)
    counts = {"smoothed": 0, "smoothed_folded": 0, "smoothed_mul": 0}
    quantized = {id(site.node) for site in sites if site.node.name not in keep}

    def columns_ok(node: gs.Node) -> bool:
        return per_channel or id(node) not in quantized

    for name, group in groups.items():
        x = tensors[name]
        k = group[0].k
        st = stats.get(name)
        if st is None or st["absmax"].shape != (k,) or any(s.k != k for s in group):
            notes.append(f"smoothing: no per-channel statistics for '{name}'; not smoothed")
            continue
        wmax = np.max([np.abs(s.matrix()).max(axis=1) for s in group], axis=0)
        s = smoothing_scale(st["absmax"], wmax, alpha)
        ids = {id(site.node) for site in group}
        only_ours = not is_graph_output(model.graph, x) and all(id(c) in ids for c in x.outputs)
        plan = channel_scale.fold_plan(model.graph, x, k, overridable, columns_ok=columns_ok) if only_ours else None
        if plan is not None:
            channel_scale.apply(plan, s, names.const)
            folded = True
        elif unfolded:
            folded = False
        else:
            notes.append(f"smoothing: '{name}' comes from no LayerNormalization/Mul it can be folded into "
                         f"(or has other readers); not smoothed")
            continue
        for site in group:
            out[site.node.name] = Smoothing(s, folded)
        counts["smoothed"] += len(group)
        counts["smoothed_folded" if folded else "smoothed_mul"] += 1
    for site in sites:  # a fold may have scaled another site's weight columns
        site.refresh(overridable)
    return out, counts


def smooth_sites(pass_name: str, model: Model, sites, data, shared: Mapping[str, Any], notes: list[str], *,
                 alpha: float | None, unfolded: bool, per_channel: bool, stats: Mapping[str, Any] | None = None):
    """quantize-dynamic's hook: ``(shared, extra stats)``, ``shared`` being the
    pass's scratch entry (a copy, with ``smoothing`` filled in when ``alpha``
    is given; unchanged otherwise).  Folds ``1/s`` upstream."""
    if alpha is None or not sites:
        return shared, {}
    if data is None:
        raise UsageError(f"pass '{pass_name}': smooth=true needs calibration data: pass --calib PATH "
                         f"(a .npz, a folder of arrays or images, or random:N)")
    smoothing, counts = plan_smoothing(model, sites, data, alpha, keep_float=shared.get("keep_float", ()),
                                       existing=shared.get("smoothing"), unfolded=unfolded, notes=notes,
                                       stats=stats, per_channel=per_channel)
    return {**shared, "smoothing": smoothing}, {**counts, "smooth_alpha": alpha}


def apply_smoothing_float(model: Model, sites: Sequence[Any], smoothing: Mapping[str, Any]) -> int:
    """Multiply ``diag(s)`` into the float weights (and insert ``x * 1/s`` for
    unfolded scales) without quantizing: after :func:`plan_smoothing` the model
    computes the same function.  Used to check the folding; returns the count."""
    names = ConstantNames(model)
    graph = model.graph
    n = 0
    for site in sites:
        sm = smoothing.get(site.node.name) if site.node.name else None
        if sm is None:
            continue
        s = np.asarray(sm.scale, np.float64)
        w = np.asarray(site.weight.values, np.float64)
        w = w * s[None, :] if site.trans_b else w * s[:, None]
        site.node.inputs[1] = names.const(site.weight.name + "_smoothed", w.astype(np.float32))
        if not sm.folded:
            x = site.node.inputs[0]
            y = gs.Variable(fresh_name(names.taken, x.name + "_smoothed"), dtype=np.float32)
            inv = names.const(x.name + "_inv_smooth", (1.0 / s).astype(np.float32))
            graph.nodes.append(gs.Node("Mul", name=fresh_name(names.taken, site.node.name + "_smooth"),
                                       inputs=[x, inv], outputs=[y]))
            site.node.inputs[0] = y
        n += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return n


# ----------------------------------------------------------------------------------
# Bias correction for quantize-static
# ----------------------------------------------------------------------------------
def _matmul_bias_add(graph: gs.Graph, node: gs.Node, n: int, overridable):
    out = node.outputs[0]
    if is_graph_output(graph, out) or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or add.domain not in STANDARD_DOMAINS or len(add.inputs) != 2:
        return None
    i = 1 if add.inputs[0] is out else 0
    if add.inputs[i] is out:
        return None
    c = _f32_const(add.inputs[i], overridable)
    if c is None or tuple(c.shape) not in ((n,), (1, n)):
        return None
    return add, i, c


def correct_biases(model: Model, weights: Sequence[tuple[gs.Node, int, int | None]], data, *,
                   weight_type: str = "int8", symmetric: bool = True, reduce_range: bool = False,
                   new_bias_ok=None, notes: list[str] | None = None) -> tuple[dict[str, int], list[gs.Node]]:
    """Subtract ``E[(dq(q(W)) - W) x]`` per output channel from the bias of each
    ``(node, 1, axis)`` in ``weights`` (quantized as quantize-static will).
    Returns ``(counters, nodes that got a new bias)``; ``new_bias_ok(node)``
    says whether such a node's new bias may be quantized by the caller."""
    from graphopt.passes.quantization.common import quantize_weight

    notes = notes if notes is not None else []
    graph = model.graph
    overridable = model.overridable
    todo = []
    for node, index, axis in weights:
        if index != 1 or node.op not in ("Conv", "Gemm", "MatMul"):
            continue
        w = _f32_const(node.inputs[1], overridable)
        if w is None:
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            continue
        if node.op == "MatMul" and len(w.shape) != 2:
            continue
        todo.append((node, w, axis))
    axes = {}
    for node, _, _ in todo:
        axes.setdefault(node.inputs[0].name, 1 if node.op == "Conv" else -1)
    stats = channel_stats(model, data, axes)
    names = ConstantNames(model)
    counts = {"bias_corrected": 0, "bias_created": 0}
    created: list[gs.Node] = []
    for node, w, axis in todo:
        st = stats.get(node.inputs[0].name)
        W = np.asarray(w.values, np.float32)
        qt = quantize_weight(W, weight_type, symmetric=symmetric, axis=axis, reduce_range=reduce_range)
        dW = qt.dequantize().astype(np.float64) - W.astype(np.float64)
        label = node.name or node.outputs[0].name
        if node.op == "Conv":
            o, cg = W.shape[0], W.shape[1]
            g = int(node.attrs.get("group", 1))
            if st is None or st["mean"].shape != (cg * g,) or o % g:
                continue
            mx = st["mean"].reshape(g, cg)
            dsum = dW.reshape(o, cg, -1).sum(-1)
            delta = np.einsum("oc,oc->o", dsum, mx[np.arange(o) // (o // g)])
            n = o
        else:
            trans_b = node.op == "Gemm" and bool(int(node.attrs.get("transB", 0)))
            dkn = dW.T if trans_b else dW
            if st is None or st["mean"].shape != (dkn.shape[0],):
                continue
            delta = st["mean"] @ dkn
            n = dkn.shape[1]
            if node.op == "Gemm":
                delta = delta * float(node.attrs.get("alpha", 1.0))
        if not np.all(np.isfinite(delta)):
            continue
        if node.op == "MatMul":
            found = _matmul_bias_add(graph, node, n, overridable)
            if found is None:
                notes.append(f"bias correction: MatMul '{label}' has no constant bias Add; not corrected")
                continue
            add, i, c = found
            b = np.asarray(c.values, np.float64)
            add.inputs[i] = names.const(c.name + "_corrected", (b - delta.reshape(b.shape)).astype(np.float32))
            counts["bias_corrected"] += 1
            continue
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if beta == 0.0:
            continue
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = _f32_const(node.inputs[2], overridable)
            if c is None or tuple(c.shape) != (n,):
                continue
            b = np.asarray(c.values, np.float64) - delta / beta
            node.inputs[2] = names.const(c.name + "_corrected", b.astype(np.float32))
        else:
            b = -delta / beta
            bias = names.const(label + "_bias_correction", b.astype(np.float32))
            if len(node.inputs) > 2:
                node.inputs[2] = bias
            else:
                node.inputs.append(bias)
            counts["bias_created"] += 1
            if new_bias_ok is None or new_bias_ok(node):
                created.append(node)
        counts["bias_corrected"] += 1
    return counts, created


# ----------------------------------------------------------------------------------
# Cross-layer equalization
# ----------------------------------------------------------------------------------
_HOMOGENEOUS = ("Relu", "LeakyRelu")


def _conv_pairs(model: Model, overridable) -> list[tuple[gs.Node, gs.Node]]:
    graph = model.graph
    pairs = []
    for c1 in graph.nodes:
        if c1.op != "Conv" or c1.domain not in STANDARD_DOMAINS or int(c1.attrs.get("group", 1)) != 1:
            continue
        if len(c1.inputs) < 2 or len(c1.outputs) != 1:
            continue
        w1 = _f32_const(c1.inputs[1], overridable)
        if w1 is None or len(w1.shape) < 3:
            continue
        if len(c1.inputs) > 2 and c1.inputs[2].name:
            b1 = _f32_const(c1.inputs[2], overridable)
            if b1 is None or tuple(b1.shape) != (w1.shape[0],):
                continue
        t = c1.outputs[0]
        if is_graph_output(graph, t) or len(t.outputs) != 1:
            continue
        nxt = t.outputs[0]
        if nxt.op in _HOMOGENEOUS and nxt.domain in STANDARD_DOMAINS and len(nxt.outputs) == 1:
            if nxt.op == "LeakyRelu" and float(nxt.attrs.get("alpha", 0.01)) < 0:
                continue
            t = nxt.outputs[0]
            if is_graph_output(graph, t) or len(t.outputs) != 1:
                continue
            nxt = t.outputs[0]
        if nxt.op != "Conv" or nxt.domain not in STANDARD_DOMAINS or int(nxt.attrs.get("group", 1)) != 1:
            continue
        if len(nxt.inputs) < 2 or nxt.inputs[0] is not t:
            continue
        w2 = _f32_const(nxt.inputs[1], overridable)
        if w2 is None or len(w2.shape) < 3 or w2.shape[1] != w1.shape[0]:
            continue
        pairs.append((c1, nxt))
    return pairs


def equalize_conv_pairs(model: Model, rounds: int = 4) -> int:
    """Cross-layer equalization of every ``Conv -> [Relu|LeakyRelu] -> Conv``
    chain of the main graph (``rounds`` sweeps, for longer chains); exact in
    float.  Returns the number of equalized pairs."""
    overridable = model.overridable
    pairs = _conv_pairs(model, overridable)
    if not pairs:
        return 0
    # work on float64 copies (per node and input index), write each once at the end
    values: dict[tuple[int, int], np.ndarray] = {}
    originals: dict[tuple[int, int], tuple[gs.Node, gs.Constant]] = {}

    def get(node: gs.Node, i: int) -> np.ndarray:
        key = (id(node), i)
        if key not in values:
            c = as_constant(node.inputs[i], overridable)
            originals[key] = (node, c)
            values[key] = np.asarray(c.values, np.float64)
        return values[key]

    for _ in range(rounds):
        for c1, c2 in pairs:
            w1, w2 = get(c1, 1), get(c2, 1)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)).max(axis=1)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            s = np.clip(s, *SCALE_LIMITS)
            if np.allclose(s, 1.0, rtol=1e-4):
                continue
            values[(id(c1), 1)] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            values[(id(c2), 1)] = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
            if len(c1.inputs) > 2 and c1.inputs[2].name:
                values[(id(c1), 2)] = get(c1, 2) / s
    names = ConstantNames(model)
    for key, (node, c) in originals.items():
        node.inputs[key[1]] = names.const(c.name + "_equalized", values[key].astype(np.float32))
    model.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return len(pairs)


# ----------------------------------------------------------------------------------
# quantize-static's hooks
# ----------------------------------------------------------------------------------
def static_equalize(pass_, model: Model) -> list[str]:
    """Cross-layer equalization before planning, when the pass's ``equalize`` is on."""
    if not getattr(pass_, "equalize", False):
        return []
    n = equalize_conv_pairs(model)
    return [f"cross-layer equalization: {n} Conv pair(s)"] if n else []


def static_bias_correction(pass_, model: Model, plan, ranges: Mapping[str, Any], data, per_channel: bool,
                           notes: list[str]) -> dict[str, int]:
    """Bias correction of the weights quantize-static is about to quantize
    (those whose input has a calibrated range), when ``bias-correction`` is on.
    Nodes that get a new bias have it quantized like an original one."""
    if not getattr(pass_, "bias_correction", False):
        return {}
    weights = [(n, i, a) for n, i, a in plan.weights if n.inputs[0].name in ranges]
    if not weights:
        return {}
    quantize = bool(getattr(pass_, "quantize_bias", True))

    def new_bias_ok(node: gs.Node) -> bool:
        if not quantize:
            return False
        if node.op == "Gemm":
            return float(node.attrs.get("alpha", 1.0)) == 1.0 and float(node.attrs.get("beta", 1.0)) == 1.0
        return node.op == "Conv"

    counts, created = correct_biases(model, weights, data, weight_type=pass_.weight_type,
                                     symmetric=pass_.symmetric_weights, reduce_range=pass_.reduce_range,
                                     new_bias_ok=new_bias_ok, notes=notes)
    plan.biases.extend(n for n in created if n not in plan.biases)
    return counts
