"""Recovery after channel pruning, without training.

* Reconstruction: each Conv/Gemm/MatMul that lost input channels gets new
  weights (and bias) by ridge-regularized least squares, so that on
  calibration data its output in the pruned model matches the original
  model's output (closed form; layers in graph order, each fitted on the
  activations of the already-reconstructed model before it).
* Mean folding: what a removed channel contributed on average (its
  calibration mean; without data, its value with its filters set to zero:
  exact for a zero filter with a bias) is added to the next layer's bias.
* BatchNormalization re-estimation: a BN whose input changed gets its mean and
  variance re-measured on the pruned model (used when not reconstructing).
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.activations import Activations, collect
from graphopt.ir import Model
from graphopt.rewrite import as_constant, fresh_name
from graphopt.passes.pruning.groups import flush_subnormals, replace_constant_input

MAX_ROWS = 8192  # rows of a least-squares problem (sampled positions)


def _stack(model, names, calibration, max_samples, source_dir=None) -> dict[str, np.ndarray]:
    return _concatenate(list(collect(model, names, calibration, max_samples, source_dir, only=True)), names)


def _concatenate(rows: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> dict[str, np.ndarray | None]:
    """Per-sample values joined along the batch axis."""
    return {n: np.concatenate([r[n] for r in rows], axis=0) if rows else None for n in names}


def im2col(x: np.ndarray, node: gs.Node, kernel: Sequence[int], positions: np.ndarray | None = None,
           rng: np.random.Generator | None = None, max_rows: int = MAX_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a 2-D convolution's input patches ([rows, C*kh*kw]) at (sampled)
    output positions, and the positions (n, oy, ox) they belong to."""
    n, c, h, w = x.shape
    kh, kw = kernel
    sy, sx = (list(node.attrs.get("strides", [1, 1])) + [1, 1])[:2]
    dy, dx = (list(node.attrs.get("dilations", [1, 1])) + [1, 1])[:2]
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in ((h, kh, sy, dy), (w, kw, sx, dx)):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2) if auto == "SAME_UPPER" else (total - total // 2, total // 2))
        pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    oh = (h + pads[0] + pads[2] - (kh - 1) * dy - 1) // sy + 1
    ow = (w + pads[1] + pads[3] - (kw - 1) * dx - 1) // sx + 1
    if positions is None:
        total = n * oh * ow
        flat = np.arange(total) if total <= max_rows else np.sort(
            (rng or np.random.default_rng(0)).choice(total, max_rows, replace=False))
        positions = np.stack(np.unravel_index(flat, (n, oh, ow)), axis=1)
    b, oy, ox = positions[:, 0], positions[:, 1], positions[:, 2]
    # one gather per kernel tap, in unpadded coordinates: taps in the padding stay zero
    patches = np.zeros((len(b), c, kh, kw), x.dtype)
    for i in range(kh):
        y = oy * sy - pads[0] + i * dy
        for j in range(kw):
            xs = ox * sx - pads[1] + j * dx
            inside = (y >= 0) & (y < h) & (xs >= 0) & (xs < w)
            patches[inside, :, i, j] = x[b[inside], :, y[inside], xs[inside]]
    return patches.reshape(len(b), -1), positions


def ridge(a: np.ndarray, t: np.ndarray, lam: float, bias: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Weights (and bias) minimizing ||a w + b - t||^2 + lam * mean(diag(a'a)) ||w||^2."""
    a = a.astype(np.float64)
    t = t.astype(np.float64)
    if bias:
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    gram = a.T @ a
    d = gram.shape[0] - (1 if bias else 0)
    scale = float(np.mean(np.diag(gram)[:d])) if d else 1.0
    reg = np.eye(gram.shape[0]) * lam * max(scale, 1e-12)
    if bias:
        reg[-1, -1] = 0.0
    sol = np.linalg.solve(gram + reg, a.T @ t)
    return (sol[:-1], sol[-1]) if bias else (sol, None)


def _bias_input(graph: gs.Graph, node: gs.Node, index: int, values: np.ndarray, taken: set[str]) -> None:
    if len(node.inputs) > index and not (isinstance(node.inputs[index], gs.Variable) and not node.inputs[index].name):
        replace_constant_input(graph, node, index, values, taken)
        return
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable(""))
    const = gs.Constant(fresh_name(taken, (node.name or node.op) + "_bias"),
                        flush_subnormals(np.ascontiguousarray(values)))
    if len(node.inputs) == index:
        node.inputs.append(const)
    else:
        node.inputs[index] = const


def reconstruct(original: onnx.ModelProto, model: Model, nodes: Sequence[tuple[gs.Node, np.ndarray | None]],
                calibration: Any, lam: float = 1e-4, max_samples: int = 32,
                seed: int = 0, max_rows: int = MAX_ROWS,
                activations: Activations | None = None) -> tuple[int, list[str]]:
    """Least-squares refit of ``nodes`` (Conv group=1 2-D, Gemm, MatMul with a
    constant 2-D weight), each with its kept output channels (None: all), in
    graph order.  ``activations``: the original model on the calibration
    samples, shared by callers that refit many variants of one model (built
    here when not given).  Returns (refitted, notes)."""
    notes: list[str] = []
    done = 0
    rng = np.random.default_rng(seed)
    taken = set(model.graph.tensors().keys())
    shared = activations is not None
    if activations is None:
        activations = Activations(original, (s for _, s in zip(range(max_samples), calibration)),
                                  model.source_dir)
    # The original model's outputs of every refitted layer (kept for the next
    # caller only where one shares the activations).
    names = sorted({n.outputs[0].name for n, _ in nodes})
    targets = _concatenate(activations.values(names, keep=shared), names)
    for node, kept_out in nodes:
        w_const = as_constant(node.inputs[1])
        if w_const is None:
            continue
        w = np.asarray(w_const.values)
        x_name, y_name = node.inputs[0].name, node.outputs[0].name
        target = targets[y_name]
        # Only what the edits so far changed runs again; the rest is the original's.
        x = _concatenate(activations.run(model.to_proto(), [x_name], model.source_dir), [x_name])[x_name]
        if target is None or x is None:
            continue
        if kept_out is not None:
            target = np.take(target, kept_out, axis=-1 if node.op == "MatMul" else 1)
        if node.op == "Conv":
            if w.ndim != 4 or int(node.attrs.get("group", 1)) != 1:
                notes.append(f"Conv '{node.name}' not refitted: only 2-D convolutions with group=1")
                continue
            a, pos = im2col(x, node, w.shape[2:], rng=rng, max_rows=max_rows)
            t = target[pos[:, 0], :, pos[:, 1], pos[:, 2]]
            if t.shape[1] != w.shape[0]:
                continue
            sol, b = ridge(a, t, lam, bias=True)
            new_w = sol.T.reshape(w.shape).astype(w.dtype)
            replace_constant_input(model.graph, node, 1, new_w, taken)
            _bias_input(model.graph, node, 2, b.astype(w.dtype), taken)
        elif node.op == "Gemm":
            trans_b = int(node.attrs.get("transB", 0))
            alpha = float(node.attrs.get("alpha", 1.0))
            beta = float(node.attrs.get("beta", 1.0))
            c = as_constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
            has_c = len(node.inputs) > 2 and bool(node.inputs[2].name)
            fit_bias = (not has_c or (c is not None and np.asarray(c.values).ndim == 1)) and beta != 0
            if has_c and not fit_bias:
                c_values = np.asarray(c.values) if c is not None else None
                if c_values is None:
                    continue
                target = target - beta * c_values
            sol, b = ridge(alpha * x.reshape(x.shape[0], -1), target, lam, bias=fit_bias)
            replace_constant_input(model.graph, node, 1, (sol.T if trans_b else sol).astype(w.dtype), taken)
            if fit_bias:
                _bias_input(model.graph, node, 2, (b / beta).astype(w.dtype), taken)
        elif node.op == "MatMul":
            a = x.reshape(-1, x.shape[-1])
            t = target.reshape(-1, target.shape[-1])
            if a.shape[0] > max_rows:
                rows = np.sort(rng.choice(a.shape[0], max_rows, replace=False))
                a, t = a[rows], t[rows]
            sol, _ = ridge(a, t, lam, bias=False)
            replace_constant_input(model.graph, node, 1, sol.astype(w.dtype), taken)
        else:
            continue
        done += 1
    return done, notes


def recalibrate_bn(model: Model, nodes: Sequence[gs.Node], calibration: Any, max_samples: int = 32) -> int:
    """Re-measure mean and variance of BatchNormalizations on the pruned model."""
    names = [n.inputs[0].name for n in nodes]
    if not names:
        return 0
    values = _stack(model, names, calibration, max_samples)
    taken = set(model.graph.tensors().keys())
    done = 0
    for node, name in zip(nodes, names):
        x = values.get(name)
        mean_c, var_c = as_constant(node.inputs[3]), as_constant(node.inputs[4])
        if x is None or mean_c is None or var_c is None:
            continue
        axes = tuple(i for i in range(x.ndim) if i != 1)
        dtype = np.asarray(mean_c.values).dtype
        replace_constant_input(model.graph, node, 3, x.mean(axis=axes).astype(dtype), taken)
        replace_constant_input(model.graph, node, 4, x.var(axis=axes).astype(dtype), taken)
        done += 1
    return done


def fold_removed(model: Model, node: gs.Node, removed_in: np.ndarray, means: np.ndarray,
                 weight_before: np.ndarray, taken: set[str]) -> bool:
    """Add what removed input channels contributed on average (``means``, one per
    removed input element of the consumer) to ``node``'s bias.  ``weight_before``
    is the consumer's weight before its input channels were sliced (output
    channels already sliced)."""
    if node.op == "Conv":
        if int(node.attrs.get("group", 1)) != 1:
            return False
        w = weight_before[:, removed_in].astype(np.float64)
        contrib = w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2) @ means
        out_index = 2
    elif node.op == "Gemm":
        if float(node.attrs.get("beta", 1.0)) == 0:
            return False
        rows = weight_before[:, removed_in].T if int(node.attrs.get("transB", 0)) else weight_before[removed_in]
        contrib = float(node.attrs.get("alpha", 1.0)) * (means @ rows.astype(np.float64))
        contrib = contrib / float(node.attrs.get("beta", 1.0))
        out_index = 2
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = as_constant(node.inputs[2])
            if c is None or np.asarray(c.values).ndim != 1:
                return False
    else:
        return False
    dtype = weight_before.dtype
    if len(node.inputs) > out_index and node.inputs[out_index].name:
        c = as_constant(node.inputs[out_index])
        if c is None:
            return False
        current = np.asarray(c.values).astype(np.float64)
        _bias_input(model.graph, node, out_index, (current + contrib).astype(dtype), taken)
    else:
        _bias_input(model.graph, node, out_index, contrib.astype(dtype), taken)
    return True
