"""Weight-only blocked quantization of MatMul/Gemm weights (4 or 8 bits).

Activations stay float; each weight column is cut along K into blocks of
``block`` values, each block with its own scale (and zero point when
asymmetric).  Two encodings:

* ``format=matmulnbits`` (default): onnxruntime's ``com.microsoft.MatMulNBits``.
  ``B`` is uint8 ``[N, n_blocks, blob]`` with ``blob = block * bits / 8``, each
  column's K values in order, two 4-bit values per byte (the even index in the
  low nibble); ``scales`` is ``[N, n_blocks]`` in the activation's float type;
  ``zero_points`` (asymmetric only) is uint8 ``[N, ceil(n_blocks * bits / 8)]``
  packed the same way.  Without zero points the kernel uses ``2^(bits-1)``
  (8 for 4 bits), which is what the symmetric mode quantizes to.  K that is not
  a multiple of ``block`` is padded with zeros in the last block.  Gemm's
  ``alpha`` goes into the scales and ``beta * C`` into the bias input.
* ``format=qdq``: a blocked ``DequantizeLinear`` (``axis=0``, ``block_size``;
  opset >= 21) of an int4/uint4 (or int8/uint8) ``[K, N]`` initializer feeding
  the unchanged MatMul/Gemm, for runtimes that fuse it themselves.

Symmetric blocks follow onnxruntime's quantizer: the value of largest
magnitude maps exactly to ``-2^(bits-1)`` (its scale may be negative), which
keeps one more level than ``absmax / (2^(bits-1) - 1)``.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.context import PassContext
from graphopt.ir import Model, iter_graphs
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import fresh_name

from graphopt.passes.quantization.dynamic import MS_DOMAIN, SUPPORTED_OPS, Site, find_sites, make_selection

BITS = (4, 8)
BLOCKS = (16, 32, 64, 128, 256)


def block_quantize(w: np.ndarray, bits: int, block: int, symmetric: bool):
    """Quantize ``w`` [K, N] in blocks along K.

    Returns ``(q, scales, zero_points)``: ``q`` uint8 [N, n_blocks, block]
    (unpacked, values in ``[0, 2^bits)``, K zero-padded), ``scales`` float32
    [N, n_blocks] and ``zero_points`` uint8 [N, n_blocks] (``2^(bits-1)``
    everywhere when symmetric).  ``w ~= (q - zp) * scale``.
    """
    k, n = w.shape
    n_blocks = -(-k // block)
    wt = np.zeros((n, n_blocks * block), np.float32)
    wt[:, :k] = np.asarray(w, np.float32).T
    blocks = wt.reshape(n, n_blocks, block).astype(np.float64)
    qmax = (1 << bits) - 1
    if symmetric:
        mid = 1 << (bits - 1)
        idx = np.abs(blocks).argmax(axis=2)[..., None]
        peak = np.take_along_axis(blocks, idx, axis=2)[..., 0]
        scale = np.where(peak != 0, peak / -mid, 1.0)
        zp = np.full(scale.shape, mid, np.float64)
    else:
        lo = np.minimum(blocks.min(axis=2), 0.0)
        hi = np.maximum(blocks.max(axis=2), 0.0)
        scale = np.where(hi > lo, (hi - lo) / qmax, 1.0)
        zp = np.clip(np.rint(-lo / scale), 0, qmax)
    scale32 = scale.astype(np.float32)
    q = np.clip(np.rint(blocks / scale32[..., None].astype(np.float64)) + zp[..., None], 0, qmax).astype(np.uint8)
    return q, scale32, zp.astype(np.uint8)


def block_dequantize(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`block_quantize`: float32 [K, N]."""
    n = q.shape[0]
    w = (q.astype(np.float32) - zero_points[..., None].astype(np.float32)) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of a uint8 array of ``bits``-bit values into bytes,
    the lower index in the lower bits (MatMulNBits' and ONNX int4's order)."""
    if bits == 8:
        return np.ascontiguousarray(q, dtype=np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return np.ascontiguousarray((q[..., 0::2] & 0x0F) | ((q[..., 1::2] & 0x0F) << 4), dtype=np.uint8)


def _nbytes(c: gs.Constant) -> int:
    if isinstance(c._values, LazyValues):
        t = c._values.tensor
        return len(t.raw_data) if t.HasField("raw_data") else 0
    return int(np.asarray(c.values).nbytes)


def _tensor_4bit(name: str, values: np.ndarray, signed: bool) -> gs.Constant:
    """An INT4/UINT4 initializer (values already in the type's range)."""
    flat = (np.asarray(values).astype(np.int16).reshape(-1) & 0x0F).astype(np.uint8)
    raw = pack_rows(flat, 4).tobytes()
    t = onnx.helper.make_tensor(name, onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4,
                                list(values.shape), raw, raw=True)
    return gs.Constant(name, LazyValues(t))


@register_pass("quantize-weights")
class QuantizeWeights(Pass):
    """Weight-only blocked 4/8-bit quantization of MatMul/Gemm weights
    (onnxruntime MatMulNBits, or blocked DequantizeLinear for opset >= 21)."""

    tolerance = Tolerance(relative=None, cosine=0.8, lossy=True)

    bits = Option(int, 4, "bits per weight: 4 or 8", choices=BITS)
    block = Option(int, 32, "weights per block along K: 16, 32, 64, 128 or 256", choices=BLOCKS)
    format = Option(str, "matmulnbits", "matmulnbits: com.microsoft.MatMulNBits; qdq: blocked DequantizeLinear "
                    "(opset >= 21)", choices=("matmulnbits", "qdq"))
    symmetric = Option(bool, True, "symmetric blocks (no zero points) instead of min/max with zero points")
    accuracy_level = Option(int, 0, "MatMulNBits accuracy_level (0: unset, 4: int8 compute on CPU)", min=0, max=4)
    min_k = Option(int, 16, "leave weights with fewer input features than this in float", min=1)
    ops = Option(list, list(SUPPORTED_OPS), "op types to quantize (MatMul, Gemm)")
    exclude_nodes = Option(list, [], "node names left in float")
    exclude_ops = Option(list, [], "op types left in float")
    exclude_regex = Option(str, "", "nodes whose name matches this regular expression are left in float")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        selection = make_selection(self.name, self.ops, self.exclude_nodes, self.exclude_ops, self.exclude_regex)
        if self.format == "qdq" and model.opset < 21:
            return PassResult(False, {"quantized": 0}, [
                f"format=qdq needs opset >= 21 for blocked DequantizeLinear; the model has opset "
                f"{model.opset} (use format=matmulnbits)"])
        notes: list[str] = []
        sites = find_sites(model, selection, notes)
        names = {name for g in iter_graphs(model.graph) for name in g.tensors()}
        names.update(n.name for n in model.graph.nodes if n.name)
        removed: dict[int, gs.Node] = {}
        cache: dict[tuple, tuple] = {}
        dq_outputs: dict[str, gs.Variable] = {}
        stats = {"quantized": 0, "weights": 0, "bytes_before": 0, "bytes_after": 0}
        for site in sites:
            node = site.node
            if site.k < self.min_k:
                notes.append(f"{node.op} '{node.name}': K={site.k} < min-k={self.min_k}; left in float")
                continue
            key = (id(site.weight), site.trans_b, site.alpha)
            if key not in cache:
                cache[key] = self._encode(site, names)
                stats["weights"] += 1
                stats["bytes_before"] += site.k * site.n * 4
                stats["bytes_after"] += sum(_nbytes(c) for c in cache[key] if c is not None)
            if self.format == "matmulnbits":
                removed[id(node)] = self._matmulnbits(site, cache[key], names)
            else:
                self._qdq(site, cache[key], names, model.graph, dq_outputs)
            stats["quantized"] += 1
        if removed:
            nodes = []
            for n in model.graph.nodes:
                nodes.append(removed.get(id(n), n))
            model.graph.nodes = nodes
            model.graph.toposort()
        elif stats["quantized"]:
            model.graph.toposort()
        return PassResult(changed=stats["quantized"] > 0, stats=stats, notes=notes)

    # -- encodings ----------------------------------------------------------------------
    def _encode(self, site: Site, names: set[str]):
        w = site.matrix()
        q, scales, zps = block_quantize(w, self.bits, self.block, self.symmetric)
        scales = (scales.astype(np.float64) * site.alpha).astype(np.float32)
        base = site.weight.name
        if self.format == "matmulnbits":
            packed = pack_rows(q, self.bits)  # [N, n_blocks, blob]
            b = gs.Constant(fresh_name(names, f"{base}_Q{self.bits}"), packed)
            s = gs.Constant(fresh_name(names, f"{base}_scales"), scales)
            z = None if self.symmetric else gs.Constant(fresh_name(names, f"{base}_zero_points"),
                                                        pack_rows(zps, self.bits))
            return b, s, z
        # qdq: [K, N] values, scales/zero points [n_blocks, N]
        k = site.k
        values = q.reshape(q.shape[0], -1)[:, :k].T
        scale_t = gs.Constant(fresh_name(names, f"{base}_scale"), np.ascontiguousarray(scales.T))
        qname = fresh_name(names, f"{base}_quantized")
        if self.symmetric:
            mid = 1 << (self.bits - 1)
            signed = values.astype(np.int16) - mid
            qt = (_tensor_4bit(qname, signed, True) if self.bits == 4
                  else gs.Constant(qname, np.ascontiguousarray(signed.astype(np.int8))))
            return qt, scale_t, None
        zp_name = fresh_name(names, f"{base}_zero_point")
        if self.bits == 4:
            return _tensor_4bit(qname, values, False), scale_t, _tensor_4bit(zp_name, np.ascontiguousarray(zps.T), False)
        return (gs.Constant(qname, np.ascontiguousarray(values)), scale_t,
                gs.Constant(zp_name, np.ascontiguousarray(zps.T)))

    def _matmulnbits(self, site: Site, encoded, names: set[str]) -> gs.Node:
        b, s, z = encoded
        node = site.node
        x, y = node.inputs[0], node.outputs[0]
        inputs = [x, b, s]
        if z is not None or site.bias is not None:
            inputs.append(z if z is not None else gs.Variable.empty())
        if site.bias is not None:
            inputs.append(gs.Variable.empty())  # g_idx
            inputs.append(gs.Constant(fresh_name(names, site.weight.name + "_bias"), site.bias))
        attrs = {"K": site.k, "N": site.n, "bits": self.bits, "block_size": self.block}
        if self.accuracy_level:
            attrs["accuracy_level"] = self.accuracy_level
        label = node.name or y.name
        node.inputs.clear()
        node.outputs.clear()
        return gs.Node("MatMulNBits", name=f"{label}_Q{self.bits}", domain=MS_DOMAIN, attrs=attrs,
                       inputs=inputs, outputs=[y])

    def _qdq(self, site: Site, encoded, names: set[str], graph: gs.Graph, dq_outputs: dict) -> None:
        qt, scale, zp = encoded
        node = site.node
        out = dq_outputs.get(qt.name)
        if out is None:
            out = gs.Variable(fresh_name(names, site.weight.name + "_dequantized"), dtype=np.float32,
                              shape=[site.k, site.n])
            inputs = [qt, scale] + ([zp] if zp is not None else [])
            graph.nodes.append(gs.Node("DequantizeLinear", name=fresh_name(names, site.weight.name + "_DequantizeLinear"),
                                       attrs={"axis": 0, "block_size": self.block}, inputs=inputs, outputs=[out]))
            dq_outputs[qt.name] = out
        node.inputs[1] = out
        if node.op == "Gemm":
            # the weight is now [K, N]; alpha is in the scales
            node.attrs["transB"] = 0
            node.attrs["alpha"] = 1.0

