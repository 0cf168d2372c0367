"""Dynamic int8 quantization of LSTM weights, for quantize-dynamic.

onnxruntime runs ``com.microsoft.DynamicQuantizeLSTM`` (int8 input and
recurrence weights, the activations quantized per time step inside the
kernel) several times faster than its float LSTM: a recurrent model left in
float would be far behind onnxruntime's own ``quantize_dynamic``.  The kernel
takes the weights transposed to ``[directions, input, 4*hidden]`` and
``[directions, hidden, 4*hidden]`` with a symmetric scale per direction (or per
gate column).  There is no standard ONNX form of it, so ``format=onnx`` keeps
LSTMs in float.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import Model
from graphopt.rewrite import STANDARD_DOMAINS, as_constant
from graphopt.passes.quantization.common import quantize_weight
from graphopt.passes.quantization.recovery import ConstantNames

MS_DOMAIN = "com.microsoft"
_LSTM_INPUTS = 8  # X, W, R, B, sequence_lens, initial_h, initial_c, P


def quantize_lstms(model: Model, allows, *, per_channel: bool, notes: list[str]) -> int:
    """Rewrite every LSTM of the main graph whose W and R are constant float32
    into DynamicQuantizeLSTM; ``allows(node)`` is the pass's selection.
    Returns how many were rewritten; what is skipped gets a note."""
    overridable = model.overridable
    names = ConstantNames(model)
    done = 0
    for node in model.graph.nodes:
        if node.op != "LSTM" or node.domain not in STANDARD_DOMAINS or not allows(node):
            continue
        label = f"LSTM '{node.name or node.outputs[0].name}'"
        w, r = (as_constant(node.inputs[i], overridable) if len(node.inputs) > i else None for i in (1, 2))
        if w is None or r is None or len(w.shape) != 3 or len(r.shape) != 3 or not all(
                c.dtype is not None and np.dtype(c.dtype) == np.float32 for c in (w, r)):
            notes.append(f"{label}: W and R are not constant float32 tensors; left in float")
            continue
        if int(node.attrs.get("layout", 0)) != 0:
            notes.append(f"{label}: layout=1 (batch first) has no quantized kernel; left in float")
            continue
        wq, ws, wzp = _transposed(w.values, per_channel)
        rq, rs, rzp = _transposed(r.values, per_channel)
        const = names.const
        rest = list(node.inputs[3:_LSTM_INPUTS])
        rest += [gs.Variable.empty()] * (_LSTM_INPUTS - 3 - len(rest))
        node.inputs = [node.inputs[0], const(w.name + "_quantized", wq), const(r.name + "_quantized", rq), *rest,
                       const(w.name + "_scale", ws), const(w.name + "_zero_point", wzp),
                       const(r.name + "_scale", rs), const(r.name + "_zero_point", rzp)]
        node.op, node.domain = "DynamicQuantizeLSTM", MS_DOMAIN
        node.attrs.pop("layout", None)
        done += 1
    if done:
        model.graph.cleanup(remove_unused_graph_inputs=False)
    return done


def _transposed(weight: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[D, 4H, K]`` -> int8 ``[D, K, 4H]`` with symmetric scales ``[D]`` (or ``[D, 4H]``)."""
    t = np.ascontiguousarray(np.transpose(np.asarray(weight, np.float32), (0, 2, 1)))
    values, scales, zero_points = [], [], []
    for d in range(t.shape[0]):
        qt = quantize_weight(t[d], "int8", symmetric=True, axis=1 if per_channel else None)
        values.append(qt.values)
        scales.append(np.asarray(qt.scale, np.float32).reshape(-1))
        zero_points.append(np.asarray(qt.zero_point, np.int8).reshape(-1))
    scale, zp = np.stack(scales), np.stack(zero_points)
    if not per_channel:
        scale, zp = scale.reshape(-1), zp.reshape(-1)
    return np.stack(values).astype(np.int8), scale.astype(np.float32), zp.astype(np.int8)
