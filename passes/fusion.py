"""Fusions of adjacent nodes into one.

Folding an inference BatchNormalization into the linear op before it removes
a whole pass over the activations; MatMul+Add as one Gemm lets runtimes use a
single kernel with the bias in its epilogue.  Both only touch constants that
no other node reads (new weights get new names), and only swallow
intermediate values that nothing else observes.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.ir import Model, iter_graphs
from graphopt.pass_base import Pass, PassResult
from graphopt.registry import register_pass
from graphopt.rewrite import STANDARD_DOMAINS, as_constant, fresh_name, lacks_annotations, sole_consumer
from graphopt.passes.shapes import annotate_shapes

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _is_op(node: gs.Node | None, op: str) -> bool:
    return node is not None and node.op == op and node.domain in STANDARD_DOMAINS


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _float_dtype(dtype) -> np.dtype | None:
    try:
        d = np.dtype(dtype)
    except TypeError:
        return None
    return d if d in FLOAT_DTYPES else None


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _set_inputs(node: gs.Node, inputs: list[gs.Tensor]) -> None:
    # gs keeps tensor->consumer links in sync only through clear/extend/item set.
    node.inputs.clear()
    node.inputs.extend(inputs)


class _Fuser:
    """What both fusions need: the graph, the set of names in use and which
    initializers are not really constant."""

    def __init__(self, model: Model):
        self.model = model
        self.graph = model.graph
        self.opset = model.opset
        self.overridable = model.overridable
        self.names = {name for g in iter_graphs(model.graph) for name in g.tensors()}
        self.removed: set[int] = set()

    def const(self, tensor: gs.Tensor | None) -> gs.Constant | None:
        return None if tensor is None else as_constant(tensor, self.overridable)

    def new_const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(self.names, base), np.ascontiguousarray(values))

    def detach(self, node: gs.Node) -> None:
        node.inputs.clear()
        node.outputs.clear()
        self.removed.add(id(node))

    def take_output(self, producer: gs.Node, consumer: gs.Node) -> None:
        """``producer`` now writes what ``consumer`` wrote; ``consumer`` goes.

        The consumer's output keeps its name, so graph outputs are untouched.
        """
        out = consumer.outputs[0]
        self.detach(consumer)
        producer.outputs[0] = out

    def finish(self) -> None:
        if self.removed:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed]
            self.graph.toposort()


# ----------------------------------------------------------------------------------
# BatchNormalization folding
# ----------------------------------------------------------------------------------
def _bn_affine(fuser: _Fuser, bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """BN in inference is ``x * a + b`` per channel; None when it is not (or
    not provably) in inference mode or its statistics are not constant."""
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("spatial", 1) != 1:
        return None
    if fuser.opset < 7 and not bn.attrs.get("is_test", 0):
        return None
    for extra in bn.outputs[1:]:
        if extra.name and (extra.outputs or any(t is extra for t in fuser.graph.outputs)):
            return None
    if len(bn.inputs) != 5:
        return None
    consts = [fuser.const(t) for t in bn.inputs[1:]]
    if any(c is None or len(c.shape) != 1 for c in consts):
        return None
    scale, bias, mean, var = (np.asarray(c.values, dtype=np.float64) for c in consts)
    if not scale.shape == bias.shape == mean.shape == var.shape:
        return None
    eps = float(bn.attrs.get("epsilon", 1e-5))
    a = scale / np.sqrt(var + eps)
    return a, bias - mean * a


def _fold_conv(fuser: _Fuser, conv: gs.Node, a: np.ndarray, b: np.ndarray, suffix: str = "_bn") -> bool:
    weight = fuser.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is None or len(weight.shape) < 3 or _float_dtype(weight.dtype) is None:
        return False
    group = int(conv.attrs.get("group", 1))
    w = np.asarray(weight.values, dtype=np.float64)
    if conv.op == "Conv":
        cout = w.shape[0]
        if len(a) != cout:
            return False
        new_w = w * a.reshape((cout,) + (1,) * (w.ndim - 1))
    else:  # ConvTranspose: [Cin, Cout/group, k...]
        cin, per_group = w.shape[0], w.shape[1]
        cout = per_group * group
        if group < 1 or cin % group or len(a) != cout:
            return False
        grouped = w.reshape((group, cin // group, per_group) + w.shape[2:])
        new_w = (grouped * a.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))).reshape(w.shape)
    bias_t = _present(conv, 2)
    if bias_t is not None:
        bias = fuser.const(bias_t)
        if bias is None or tuple(bias.shape) != (cout,):
            return False
        old_bias = np.asarray(bias.values, dtype=np.float64)
    else:
        old_bias = np.zeros(cout)
    dtype = np.dtype(weight.dtype)
    new_inputs = [
        conv.inputs[0],
        fuser.new_const(weight.name + suffix, new_w.astype(dtype)),
        fuser.new_const((bias_t.name if bias_t is not None else weight.name) + suffix + "_bias",
                        (old_bias * a + b).astype(dtype)),
    ]
    _set_inputs(conv, new_inputs + list(conv.inputs[3:]))
    return True


def _fold_gemm(fuser: _Fuser, gemm: gs.Node, a: np.ndarray, b: np.ndarray) -> bool:
    weight = fuser.const(gemm.inputs[1]) if len(gemm.inputs) > 1 else None
    if weight is None or len(weight.shape) != 2 or _float_dtype(weight.dtype) is None:
        return False
    trans_b = int(gemm.attrs.get("transB", 0))
    w = np.asarray(weight.values, dtype=np.float64)
    n = w.shape[0] if trans_b else w.shape[1]
    if len(a) != n:
        return False
    new_w = w * (a[:, None] if trans_b else a[None, :])
    beta = float(gemm.attrs.get("beta", 1.0))
    c_t = _present(gemm, 2)
    if c_t is not None:
        c = fuser.const(c_t)
        if c is None or len(c.shape) > 2 or (len(c.shape) >= 1 and c.shape[-1] not in (1, n)):
            return False
        new_c = beta * np.asarray(c.values, dtype=np.float64) * a + b
    else:
        new_c = b
    dtype = np.dtype(weight.dtype)
    _set_inputs(gemm, [
        gemm.inputs[0],
        fuser.new_const(weight.name + "_bn", new_w.astype(dtype)),
        fuser.new_const((c_t.name if c_t is not None else weight.name) + "_bn_bias", new_c.astype(dtype)),
    ])
    gemm.attrs["beta"] = 1.0
    return True


def _bias_keeps_shape(shape: tuple[int, ...], n: int) -> bool:
    """A bias that broadcasts over [M, n] without growing it."""
    return len(shape) <= 2 and all(d == 1 for d in shape[:-1]) and (not shape or shape[-1] in (1, n))


def _matmul_weight(fuser: _Fuser, matmul: gs.Node) -> gs.Constant | None:
    """The constant 2-D weight of a MatMul over a 2-D activation [M, K]."""
    if len(matmul.inputs) != 2:
        return None
    x, weight = matmul.inputs[0], fuser.const(matmul.inputs[1])
    if weight is None or len(weight.shape) != 2 or _float_dtype(weight.dtype) is None:
        return None
    if x.shape is None or len(x.shape) != 2 or isinstance(x, gs.Constant):
        return None
    return weight


def _fold_matmul(fuser: _Fuser, matmul: gs.Node, add: gs.Node | None, bn: gs.Node, a: np.ndarray, b: np.ndarray) -> bool:
    weight = _matmul_weight(fuser, matmul)
    if weight is None or len(a) != weight.shape[1]:
        return False
    n = weight.shape[1]
    dtype = np.dtype(weight.dtype)
    if add is not None:
        side = 1 if add.inputs[0] is matmul.outputs[0] else 0
        bias = fuser.const(add.inputs[side]) if len(add.inputs) == 2 else None
        if bias is None or not _bias_keeps_shape(tuple(bias.shape), n):
            return False
        new_bias = np.asarray(bias.values, dtype=np.float64) * a + b
        add.inputs[side] = fuser.new_const(bias.name + "_bn", new_bias.astype(dtype))
        fuser.take_output(add, bn)
    else:
        y = bn.outputs[0]
        mm_out = matmul.outputs[0]
        fuser.detach(bn)
        bias = fuser.new_const(weight.name + "_bn_bias", b.astype(dtype))
        fuser.graph.nodes.append(gs.Node("Add", name=f"{bn.name}_as_add" if bn.name else "", inputs=[mm_out, bias], outputs=[y]))
    w = np.asarray(weight.values, dtype=np.float64) * a[None, :]
    matmul.inputs[1] = fuser.new_const(weight.name + "_bn", w.astype(dtype))
    return True


def _fuse_one_bn(fuser: _Fuser, bn: gs.Node) -> str | None:
    """Fold ``bn`` into its producer; returns the producer's op when done."""
    x = bn.inputs[0] if bn.inputs else None
    producer = _producer(x) if x is not None else None
    if producer is None or producer.domain not in STANDARD_DOMAINS or sole_consumer(fuser.graph, x) is not bn:
        return None
    if _float_dtype(x.dtype) is None and x.dtype is not None:
        return None
    affine = _bn_affine(fuser, bn)
    if affine is None:
        return None
    a, b = affine
    op = producer.op
    if op in ("Conv", "ConvTranspose") and len(producer.outputs) == 1:
        if _fold_conv(fuser, producer, a, b):
            fuser.take_output(producer, bn)
            return op
    elif op == "Gemm" and len(producer.outputs) == 1:
        if _fold_gemm(fuser, producer, a, b):
            fuser.take_output(producer, bn)
            return op
    elif op == "MatMul":
        if _fold_matmul(fuser, producer, None, bn, a, b):
            return op
    elif op == "Add":
        matmul = next((_producer(t) for t in producer.inputs if _is_op(_producer(t), "MatMul")), None)
        if matmul is not None and sole_consumer(fuser.graph, matmul.outputs[0]) is producer:
            if _fold_matmul(fuser, matmul, producer, bn, a, b):
                return "MatMul+Add"
    return None


@register_pass("fuse-batchnorm")
class FuseBatchNorm(Pass):
    """Fold inference BatchNormalization into the Conv, ConvTranspose, Gemm or
    MatMul(+Add) before it, so the normalization costs nothing at run time."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if lacks_annotations(model, {"MatMul"}):
            annotate_shapes(model)  # MatMul folding needs the activation's rank
        fuser = _Fuser(model)
        counts: dict[str, int] = {}
        for bn in list(model.graph.nodes):
            if not _is_op(bn, "BatchNormalization") or id(bn) in fuser.removed:
                continue
            into = _fuse_one_bn(fuser, bn)
            if into is not None:
                counts[into] = counts.get(into, 0) + 1
        fuser.finish()
        fused = sum(counts.values())
        stats: dict[str, int] = {"fused": fused}
        stats.update({f"into_{op}": n for op, n in sorted(counts.items())})
        return PassResult(changed=fused > 0, stats=stats, reason="no inference BatchNormalization follows a Conv, "
                          "ConvTranspose, Gemm or MatMul with constant weights")


# ----------------------------------------------------------------------------------
# Conv followed by a per-channel Add/Sub/Mul
# ----------------------------------------------------------------------------------
def _channel_affine(fuser: _Fuser, node: gs.Node, x: gs.Tensor, rank: int, cout: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``node(x)`` as ``x * a + b`` per output channel, when its other input is
    a constant that varies at most along the channel axis (and so cannot
    change the shape of ``x``); None otherwise."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    first = node.inputs[0] is x
    other = fuser.const(node.inputs[1] if first else node.inputs[0])
    if other is None or _float_dtype(other.dtype) is None or len(other.shape) > rank:
        return None
    shape = (1,) * (rank - len(other.shape)) + tuple(other.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, cout):
        return None
    c = np.broadcast_to(np.asarray(other.values, dtype=np.float64).reshape(-1), (cout,))
    ones, zeros = np.ones(cout), np.zeros(cout)
    if node.op == "Add":
        return ones, c
    if node.op == "Sub":
        return (ones, -c) if first else (-ones, c)
    if node.op == "Mul":
        return c, zeros
    return None


def _fuse_one_affine(fuser: _Fuser, node: gs.Node) -> bool:
    for x in node.inputs:
        conv = _producer(x)
        if not (_is_op(conv, "Conv") or _is_op(conv, "ConvTranspose")) or len(conv.outputs) != 1:
            continue
        if sole_consumer(fuser.graph, x) is not node:
            continue
        weight = fuser.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weight is None or len(weight.shape) < 3:
            return False
        group = int(conv.attrs.get("group", 1))
        cout = weight.shape[0] if conv.op == "Conv" else weight.shape[1] * group
        affine = _channel_affine(fuser, node, x, len(weight.shape), cout)
        if affine is None or not _fold_conv(fuser, conv, *affine, suffix="_affine"):
            return False
        fuser.take_output(conv, node)
        return True
    return False


@register_pass("fuse-conv-affine")
class FuseConvAffine(Pass):
    """Fold a per-channel constant Add, Sub or Mul after a Conv or ConvTranspose
    into its weights and bias (exporters leave these behind, and quantized
    runtimes would otherwise run them as separate integer kernels)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        fuser = _Fuser(model)
        fused = 0
        for node in list(model.graph.nodes):
            if node.op in ("Add", "Sub", "Mul") and node.domain in STANDARD_DOMAINS and id(node) not in fuser.removed:
                fused += _fuse_one_affine(fuser, node)
        fuser.finish()
        return PassResult(changed=fused > 0, stats={"fused": fused},
                          reason="no per-channel constant Add, Sub or Mul follows a Conv or ConvTranspose")


# ----------------------------------------------------------------------------------
# MatMul + Add -> Gemm
# ----------------------------------------------------------------------------------
def _fuse_one_gemm(fuser: _Fuser, matmul: gs.Node) -> bool:
    weight = _matmul_weight(fuser, matmul)
    if weight is None or len(matmul.outputs) != 1:
        return False
    x = matmul.inputs[0]
    if x.dtype is not None and np.dtype(x.dtype) != np.dtype(weight.dtype):
        return False
    add = sole_consumer(fuser.graph, matmul.outputs[0])
    if not _is_op(add, "Add") or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1]:
        return False
    side = 1 if add.inputs[0] is matmul.outputs[0] else 0
    bias = fuser.const(add.inputs[side])
    if bias is None or np.dtype(bias.dtype) != np.dtype(weight.dtype):
        return False
    if not _bias_keeps_shape(tuple(int(d) for d in bias.shape), weight.shape[1]):
        return False
    y = add.outputs[0]
    fuser.detach(add)
    gemm = gs.Node(
        "Gemm",
        name=f"{matmul.name}_gemm" if matmul.name else "",
        attrs={"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
        inputs=[x, weight, bias],
        outputs=[y],
    )
    fuser.detach(matmul)
    fuser.graph.nodes.append(gemm)
    return True


@register_pass("fuse-gemm")
class FuseGemm(Pass):
    """Turn MatMul (2-D activation, constant weight) + constant bias Add into
    one Gemm, which runtimes run as a single kernel."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if model.opset < 7 or not any(n.op == "MatMul" for n in model.graph.nodes):
            return PassResult(changed=False, stats={"fused": 0}, reason=_NO_GEMM)
        if lacks_annotations(model, {"MatMul"}):
            annotate_shapes(model)
        fuser = _Fuser(model)
        fused = 0
        for node in list(model.graph.nodes):
            if _is_op(node, "MatMul") and id(node) not in fuser.removed and _fuse_one_gemm(fuser, node):
                fused += 1
        fuser.finish()
        return PassResult(changed=fused > 0, stats={"fused": fused}, reason=_NO_GEMM)


_NO_GEMM = "no MatMul of a 2-D activation and a constant weight is followed by a constant bias Add"
