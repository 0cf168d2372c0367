"""Where a per-channel scale on an activation can be folded upstream.

Smoothing divides an activation ``x`` by a positive per-channel ``s`` (its last
axis).  An inserted ``Mul`` costs a pass over the tensor at run time; folding
``1/s`` into constants that produce ``x`` costs nothing.  :func:`fold_plan`
walks up from ``x`` through the ops that commute with a positive per-channel
scale, carrying *which* channel of ``x`` each element of the current tensor
belongs to (an integer index array broadcast against it), until it reaches a
constant that can absorb the scale:

* layout ops: ``Reshape`` (the scaled trailing dims regrouped), ``Transpose``,
  ``Identity``, ``Dropout``;
* positively homogeneous ops: ``Relu``, ``LeakyRelu`` (``f(x/s) = f(x)/s``);
* ``Mul``/``Div`` by a constant that is the same for all scaled channels;
* ``Add`` of a constant (the bias is scaled too, and the walk goes on);
* the right operand of a ``MatMul`` with a variable left operand: attention's
  ``softmax(QK^T) @ V`` mixes rows of V, never its columns, so a scale on the
  context's channels is a scale on V's (through the heads' Reshape/Transpose);

and ends at a ``LayerNormalization`` (gamma and beta), a ``Mul`` by a
per-channel constant, or a ``MatMul``/``Gemm`` with a constant weight (its
columns).  Every value on the way must have one reader and not be a graph
output, so nothing else sees the scaled values; folding is exact in float.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.rewrite import STANDARD_DOMAINS, as_constant, is_graph_output

MAX_DEPTH = 32
_TRANSPARENT = ("Identity", "Dropout", "Relu", "LeakyRelu")


@dataclasses.dataclass
class Edit:
    """``node.inputs[index]`` (a constant) becomes ``c / s[channels]``."""

    node: gs.Node
    index: int
    channels: np.ndarray  # integer channel of x, broadcastable to the constant without growing it


def fold_plan(graph: gs.Graph, x: gs.Tensor, k: int, overridable=frozenset(),
              columns_ok: Callable[[gs.Node], bool] = lambda node: True) -> list[Edit] | None:
    """The constants that absorb ``1/s`` for ``x / s`` (``s`` over the last axis
    of ``x``, ``k`` channels), or None when the walk meets anything else.  The
    caller makes sure every reader of ``x`` itself takes ``x / s``;
    ``columns_ok(node)`` says whether a MatMul/Gemm's weight columns may be
    scaled (not when that weight is then quantized with one scale)."""
    if x.shape is None or not x.shape or x.shape[-1] not in (k, None):
        return None
    idx = np.arange(k).reshape((1,) * (len(x.shape) - 1) + (k,))
    edits: list[Edit] = []
    t = x
    for _ in range(MAX_DEPTH):
        if len(t.inputs) != 1 or isinstance(t, gs.Constant):
            return None
        p = t.inputs[0]
        if p.domain not in STANDARD_DOMAINS or p.outputs[0] is not t:
            return None
        if t is not x and (len(t.outputs) != 1 or is_graph_output(graph, t)):
            return None
        if any(o.outputs or is_graph_output(graph, o) for o in p.outputs[1:]):
            return None  # LayerNormalization's mean/inv-std, Dropout's mask: they would see the change
        op = p.op
        if op == "LayerNormalization":
            return _layernorm(p, idx, edits, overridable)
        if op in ("MatMul", "Gemm"):
            step = _matmul(p, idx, edits, overridable, columns_ok)
            if step is None or step is True:
                return edits if step else None
            t, idx = step
        elif op in ("Mul", "Div", "Add"):
            step = _elementwise(p, t, idx, edits, overridable)
            if step is None or step is True:
                return edits if step else None
            t, idx = step
        elif op in _TRANSPARENT and p.inputs and not isinstance(p.inputs[0], gs.Constant):
            if op == "LeakyRelu" and float(p.attrs.get("alpha", 0.01)) < 0:
                return None
            t = p.inputs[0]
        elif op == "Transpose":
            perm = p.attrs.get("perm", list(range(idx.ndim))[::-1])
            if len(perm) != idx.ndim:
                return None
            t, idx = p.inputs[0], np.transpose(idx, np.argsort(perm))
        elif op == "Reshape":
            idx = _through_reshape(idx, p.inputs[0].shape, t.shape)
            if idx is None:
                return None
            t = p.inputs[0]
        else:
            return None
    return None


def apply(edits: list[Edit], scale: np.ndarray, const) -> None:
    """Divide the planned constants by ``scale``; ``const(base, values)`` makes
    a new constant (shared constants are never changed in place)."""
    inv = 1.0 / np.asarray(scale, np.float64)
    for e in edits:
        c = as_constant(e.node.inputs[e.index])
        values = np.asarray(c.values, np.float64)
        new = values * inv[e.channels]
        assert new.shape == values.shape, (new.shape, values.shape)
        e.node.inputs[e.index] = const(c.name + "_smoothed", new.astype(np.float32))


# ----------------------------------------------------------------------------------
def _align(idx: np.ndarray, shape) -> np.ndarray | None:
    """``idx`` re-ranked to broadcast against ``shape`` without growing it."""
    r = len(shape)
    if idx.ndim > r:
        if any(d != 1 for d in idx.shape[: idx.ndim - r]):
            return None
        idx = idx.reshape(idx.shape[idx.ndim - r:])
    else:
        idx = idx.reshape((1,) * (r - idx.ndim) + idx.shape)
    for d, s in zip(idx.shape, shape):
        if d != 1 and d != s:
            return None
    return idx


def _constant_along_scaled(idx: np.ndarray, shape) -> bool:
    """A constant of ``shape`` takes the same value for every scaled channel."""
    lead = idx.ndim - len(shape)
    return all(d == 1 or a - lead < 0 or shape[a - lead] == 1 for a, d in enumerate(idx.shape))


def _const_input(node: gs.Node, overridable):
    found = [(i, as_constant(t, overridable)) for i, t in enumerate(node.inputs)]
    consts = [(i, c) for i, c in found if c is not None]
    if len(consts) != 1 or len(node.inputs) != 2:
        return None
    i, c = consts[0]
    if c.dtype is None or np.dtype(c.dtype) != np.float32:
        return None
    return i, c


def _layernorm(ln: gs.Node, idx: np.ndarray, edits: list[Edit], overridable) -> list[Edit] | None:
    shape = ln.inputs[0].shape
    axis = int(ln.attrs.get("axis", -1))
    if shape is None or not (axis == -1 or axis == len(shape) - 1) or len(ln.inputs) < 2:
        return None
    plan = []
    for i in (1, 2):
        if len(ln.inputs) > i and ln.inputs[i].name:
            c = as_constant(ln.inputs[i], overridable)
            if c is None or c.dtype is None or np.dtype(c.dtype) != np.float32 or len(c.shape) != 1:
                return None
            channels = _align(idx, c.shape)
            if channels is None or channels.ndim != 1:
                return None
            plan.append(Edit(ln, i, np.broadcast_to(channels, c.shape)))
    return edits + plan if plan else None


def _matmul(node: gs.Node, idx: np.ndarray, edits: list[Edit], overridable, columns_ok):
    """True: ended at a constant weight; (tensor, idx): go on up the right
    operand; None: cannot fold."""
    if len(idx.shape) < 2 or idx.shape[-2] != 1:
        return None  # rows scaled: not a column scale
    a, b = node.inputs[0], node.inputs[1]
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or len(idx.shape) != 2 or not columns_ok(node):
            return None
        w = as_constant(b, overridable)
        if w is None or len(w.shape) != 2:
            return None
        cols = idx.reshape(-1, 1) if int(node.attrs.get("transB", 0)) else idx
        cols = _align(cols, w.shape)
        if cols is None:
            return None
        plan = [Edit(node, 1, cols)]
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = as_constant(node.inputs[2], overridable)
            bias = _align(idx, c.shape) if c is not None else None
            if bias is None:
                return None
            plan.append(Edit(node, 2, bias))
        edits.extend(plan)
        return True
    w = as_constant(b, overridable)
    if w is not None:
        cols = _align(idx, w.shape)
        if cols is None or isinstance(a, gs.Constant) or not columns_ok(node):
            return None
        edits.append(Edit(node, 1, cols))
        return True
    if isinstance(a, gs.Constant) or b.shape is None or len(b.shape) < 2:
        return None
    # A batch axis of b broadcast against a scaled one is refused by _align
    # (its rows would serve channels with different scales).
    b_idx = _align(idx, b.shape)
    return None if b_idx is None else (b, b_idx)


def _elementwise(node: gs.Node, t: gs.Tensor, idx: np.ndarray, edits: list[Edit], overridable):
    found = _const_input(node, overridable)
    if found is None:
        return None
    i, c = found
    v = node.inputs[1 - i]
    if node.op == "Div" and i == 0:
        return None  # c / x
    if v.shape is None:
        return None
    channels = _align(idx, c.shape)
    if node.op == "Mul" and channels is not None and any(d > 1 for d in c.shape):
        edits.append(Edit(node, i, channels))  # a per-channel constant: absorb here
        return True
    if node.op in ("Mul", "Div"):
        if not _constant_along_scaled(idx, c.shape):
            return None
        nxt = _align(idx, v.shape)
        return (v, nxt) if nxt is not None else None
    # Add: the bias is scaled with the activation, which must have every
    # scaled element of the sum (not broadcast along a scaled axis)
    nxt = _align(idx, v.shape)
    if channels is None or nxt is None:
        return None
    edits.append(Edit(node, i, channels))
    return v, nxt


def _through_reshape(idx: np.ndarray, in_shape, out_shape) -> np.ndarray | None:
    """The channel index of a Reshape's input from that of its output: the
    scaled trailing dims of the output must be static and have the same element
    count as a static trailing run of the input's dims (row-major order then
    maps one onto the other)."""
    if in_shape is None or out_shape is None or len(out_shape) != idx.ndim:
        return None
    scaled = [j for j, d in enumerate(idx.shape) if d > 1]
    if not scaled:
        return None
    j = scaled[0]
    suffix = out_shape[j:]
    if not all(isinstance(d, int) and d > 0 for d in suffix):
        return None
    total = int(np.prod(suffix))
    full = np.broadcast_to(idx.reshape(idx.shape[j:]), suffix)
    prod = 1
    for i in range(len(in_shape) - 1, -1, -1):
        d = in_shape[i]
        if not isinstance(d, int) or d <= 0:
            return None
        prod *= d
        if prod == total:
            return _compact(full.reshape(in_shape[i:]).reshape((1,) * i + tuple(in_shape[i:])))
        if prod > total:
            return None
    return None


def _compact(idx: np.ndarray) -> np.ndarray:
    """Collapse the axes along which the channel does not change to size 1."""
    for ax in range(idx.ndim):
        if idx.shape[ax] > 1 and (idx == idx.take([0], axis=ax)).all():
            idx = idx.take([0], axis=ax)
    return np.ascontiguousarray(idx)
