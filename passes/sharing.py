"""Weight sharing (k-means clustering) and binarization of Conv/Gemm/MatMul weights.

``share-weights`` replaces each weight by the nearest of ``2^bits`` shared
values (per tensor or per output channel), found by Lloyd's k-means in one
dimension.  In one dimension clusters are intervals of the sorted values, so
each iteration is a search of ``k - 1`` boundaries in sorted data and sums
from a cumulative sum: every tensor (or every channel at once) costs one sort,
which makes a ResNet-50 a matter of seconds.  Initialization is linear over
``[min, max]`` (large weights keep their own clusters) or by quantiles; both
are deterministic, so no seed is needed.  Iterations are cheap (a search of
``k - 1`` boundaries per row), so Lloyd runs until the codebook settles (at
most 300 rounds): linear initialization converges slowly on bell-shaped
weights, and stopping at 30 rounds leaves a third more weight error.

``mode=gather`` stores ``bits``-bit indices and
a float codebook, decoded at run time by Cast -> (unpack) -> Gather /
GatherElements -> Reshape, so the file shrinks by about ``32 / bits``;
indices are packed as a little-endian bit stream in groups that fill whole
bytes (8 3-bit indices in 3 bytes) and unpacked with integer Div/Mul/Add/Sub,
which every opset has;
onnxruntime folds the decoder when the session starts.  ``mode=dense``
writes the clustered floats back (same graph; compresses well externally).

``binarize`` replaces each weight by ``sign(W) * mean|W|`` per output channel.
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.context import PassContext
from graphopt.ir import Model
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.registry import register_pass
from graphopt.rewrite import fresh_name, is_graph_output, remove_nodes

from graphopt.passes.sparsity import WEIGHT_OPS, WeightSite, check_ops, find_weight_sites


# ----------------------------------------------------------------------------------
# 1-D k-means over rows
# ----------------------------------------------------------------------------------
def kmeans_rows(x: np.ndarray, k: int, init: str = "linear", iters: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Cluster every row of ``x`` [R, L] into ``k`` values.

    Returns ``(codebook [R, k] float64, labels [R, L] int)``, codebooks sorted,
    ``codebook[r, labels[r]]`` the clustered row.
    """
    x = np.asarray(x, np.float64)
    rows, length = x.shape
    xs = np.sort(x, axis=1)
    lo, hi = xs[:, :1], xs[:, -1:]
    span = np.where(hi > lo, hi - lo, 1.0)
    # One sorted key space for all rows: row r occupies [4r, 4r + 1].
    offset = 4.0 * np.arange(rows)[:, None]
    keys = (offset + (xs - lo) / span).reshape(-1)
    csum = np.concatenate([np.zeros((rows, 1)), np.cumsum(xs, axis=1)], axis=1)
    if init == "quantile":
        c = np.quantile(xs, (np.arange(k) + 0.5) / k, axis=1).T
    else:
        c = lo + (hi - lo) * np.linspace(0.0, 1.0, k)[None, :]
    r_idx = np.arange(rows)[:, None]

    def bounds_keys(c: np.ndarray) -> np.ndarray:
        mid = (c[:, 1:] + c[:, :-1]) / 2
        return offset + (mid - lo) / span

    for _ in range(iters):
        c = np.sort(c, axis=1)
        # elements <= a boundary belong to the lower cluster
        pos = np.searchsorted(keys, bounds_keys(c).reshape(-1), side="right").reshape(rows, k - 1)
        pos -= length * r_idx
        edges = np.concatenate([np.zeros((rows, 1), np.int64), pos, np.full((rows, 1), length)], axis=1)
        counts = np.diff(edges, axis=1)
        sums = csum[r_idx, edges[:, 1:]] - csum[r_idx, edges[:, :-1]]
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        done = np.all(np.abs(new - c) <= 1e-6 * span)
        c = new
        if done:
            break
    c = np.sort(c, axis=1)
    # rows with no more distinct values than clusters: the values themselves (exact)
    distinct = 1 + np.count_nonzero(np.diff(xs, axis=1), axis=1)
    for r in np.flatnonzero(distinct <= k):
        values = np.unique(xs[r])
        c[r] = np.concatenate([values, np.full(k - values.size, values[-1])])
    qkeys = (offset + (x - lo) / span).reshape(-1)
    labels = np.searchsorted(bounds_keys(c).reshape(-1), qkeys, side="left").reshape(rows, length)
    labels -= (k - 1) * r_idx
    return c, labels


def bit_groups(bits: int) -> int:
    """Indices per packed group: the fewest whose bits fill whole bytes."""
    return 8 // math.gcd(8, bits)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit values as a little-endian bit stream: value i occupies bits
    ``[i*bits, (i+1)*bits)``, bit 0 of a byte first.  Padded with zeros to
    whole groups (:func:`bit_groups`)."""
    v = values.reshape(-1).astype(np.uint8)
    g = bit_groups(bits)
    v = np.concatenate([v, np.zeros(-v.size % g, np.uint8)])
    stream = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(stream.reshape(-1), bitorder="little")


def _unpack_plan(bits: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(bytes per group, low byte, high byte, divisor, multiplier) per index of a
    group: ``index = (low // divisor + high * multiplier) mod 2^bits``."""
    g = bit_groups(bits)
    offsets = np.arange(g) * bits
    low = offsets // 8
    shift = offsets % 8
    spill = shift + bits > 8
    high = np.where(spill, low + 1, low)
    return g * bits // 8, low.astype(np.int64), high.astype(np.int64), (1 << shift).astype(np.int32), \
        np.where(spill, 1 << (8 - shift), 0).astype(np.int32)


# ----------------------------------------------------------------------------------
# share-weights
# ----------------------------------------------------------------------------------
@register_pass("share-weights")
class ShareWeights(Pass):
    """k-means weight sharing: 2^bits values per output channel or tensor, as indices + codebook.

    A weight takes the nearest shared value; ``mode=dense`` keeps the floats."""

    # Lossy by request (1-3 bits per tensor can move outputs far): as sparsify.
    tolerance = Tolerance(relative=None, cosine=0.0, lossy=True)

    bits = Option(int, 4, "bits per index: 2^bits clusters", min=1, max=8)
    granularity = Option(str, "channel", "one codebook per output channel (default: follows per-channel scales, "
                         "such as a folded BatchNorm's) or per tensor", choices=("channel", "tensor"))
    mode = Option(str, "gather", "gather: bits-bit indices + codebook decoded by Gather (file shrinks); "
                  "dense: clustered floats written back", choices=("gather", "dense"))
    init = Option(str, "linear", "k-means initialization: linear over [min, max] or quantiles",
                  choices=("linear", "quantile"))
    pack = Option(bool, True, "gather mode, bits < 8: indices packed as a bit stream (else one byte each)")
    min_size = Option(int, 1024, "weights with fewer elements than this are left alone", min=1)
    ops = Option(list, list(WEIGHT_OPS), "op types whose weight (input 1) is clustered")
    exclude_nodes = Option(list, [], "node names whose weights are left alone")

    def __init__(self, **options):
        super().__init__(**options)
        check_ops(self.name, self.ops)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        notes: list[str] = []
        if self.mode == "gather" and self.granularity == "channel" and model.opset < 11:
            return PassResult(False, {"tensors": 0}, [
                f"granularity=channel, mode=gather needs GatherElements (opset >= 11); the model has opset "
                f"{model.opset} (use mode=dense or granularity=tensor)"])
        sites = find_weight_sites(model, self.ops, self.min_size, notes, self.exclude_nodes)
        k = 1 << self.bits
        taken = set(model.graph.tensors()) | {n.name for n in model.graph.nodes if n.name}
        stats: dict[str, Any] = {"tensors": 0, "bits": self.bits, "clusters": k, "granularity": self.granularity,
                                 "mode": self.mode, "bytes_before": 0, "bytes_after": 0}
        errors: list[float] = []
        for site in sites:
            w = site.load()
            rows = site.to_channels(w) if self.granularity == "channel" else w.reshape(1, -1)
            if self.mode == "gather" and self._encoded_bytes(rows.shape[0], k, w) >= w.nbytes:
                notes.append(f"{site.label}: {rows.shape[1]} weights per codebook; indices and {k}-entry "
                             f"codebooks would not be smaller; left alone")
                continue
            codebook, labels = kmeans_rows(rows, k, self.init)
            codebook = codebook.astype(w.dtype)
            clustered = np.take_along_axis(codebook, labels, axis=1)
            if self.granularity == "channel":
                back = site.from_channels(clustered, w.shape)
            else:
                back = clustered.reshape(w.shape)
            norm = float(np.linalg.norm(w.reshape(-1)))
            errors.append(float(np.linalg.norm((back - w).reshape(-1))) / norm if norm else 0.0)
            stats["tensors"] += 1
            stats["bytes_before"] += w.nbytes
            if self.mode == "dense":
                site.store(back)
                stats["bytes_after"] += w.nbytes
                continue
            stats["bytes_after"] += self._gather(model, site, w, codebook, labels.astype(np.uint8), taken)
        if errors:
            stats["weight_error_mean"] = round(float(np.mean(errors)), 6)
            stats["weight_error_max"] = round(float(np.max(errors)), 6)
        if self.mode == "gather" and stats["tensors"]:
            # Constant nodes that held a replaced weight are dead now
            dead = [s.holder.inputs[0] for s in sites if isinstance(s.holder, gs.Variable) and not s.holder.outputs
                    and len(s.holder.inputs) == 1 and not is_graph_output(model.graph, s.holder)]
            remove_nodes(model.graph, dead)
            model.graph.toposort()
        if not sites:
            notes.append("no eligible weight")
        return PassResult(changed=stats["tensors"] > 0, stats=stats, notes=notes)

    def _encoded_bytes(self, codebooks: int, k: int, w: np.ndarray) -> int:
        if self.pack and self.bits < 8:
            g = bit_groups(self.bits)
            return codebooks * k * w.dtype.itemsize + -(-w.size // g) * g * self.bits // 8
        return codebooks * k * w.dtype.itemsize + w.size

    @staticmethod
    def _slice(model: Model, flat, size: int, const, var, node):
        """The first ``size`` values (Slice's inputs form from opset 10, attributes before)."""
        out = var("indices_trimmed", np.int32, (size,))
        if model.opset >= 10:
            starts, ends = const("start", np.array([0], np.int64)), const("end", np.array([size], np.int64))
            return node("Slice", [flat, starts, ends], out)
        return node("Slice", [flat], out, starts=[0], ends=[size], axes=[0])

    def _gather(self, model: Model, site: WeightSite, w: np.ndarray, codebook: np.ndarray, labels: np.ndarray,
                taken: set[str]) -> int:
        """Replace the weight by a decoder subgraph; returns the stored bytes."""
        graph = model.graph
        base = site.name
        nodes: list[gs.Node] = []

        def var(suffix: str, dtype, shape) -> gs.Variable:
            return gs.Variable(fresh_name(taken, f"{base}_{suffix}"), dtype=dtype, shape=list(shape))

        def const(suffix: str, values: np.ndarray) -> gs.Constant:
            return gs.Constant(fresh_name(taken, f"{base}_{suffix}"), np.ascontiguousarray(values))

        def node(op: str, inputs, out: gs.Variable, **attrs) -> gs.Variable:
            nodes.append(gs.Node(op, name=fresh_name(taken, f"{base}_{op}"), attrs=attrs, inputs=inputs,
                                 outputs=[out]))
            return out

        if self.granularity == "tensor":
            index_shape = w.shape
            index_values = labels.reshape(w.shape)
            book = const("codebook", codebook.reshape(-1))
        elif site.out_axis == 0:
            index_shape = (w.shape[0], w.size // w.shape[0])
            index_values = labels
            book = const("codebook", codebook)  # [O, k]
        else:  # output channels on the last axis: indices [L, O], codebook [k, O]
            index_shape = (w.size // w.shape[-1], w.shape[-1])
            index_values = labels.T
            book = const("codebook", codebook.T)
        stored = book.values.nbytes
        if self.pack and self.bits < 8:
            packed = const(f"indices{self.bits}", pack_bits(index_values, self.bits))
            stored += packed.values.nbytes
            per_group, low, high, div, mult = _unpack_plan(self.bits)
            groups = packed.values.size // per_group
            g = bit_groups(self.bits)
            p = node("Cast", [packed], var("indices_bytes", np.int32, (packed.values.size,)), to=6)
            p = node("Reshape", [p, const("groups_shape", np.array([groups, per_group], np.int64))],
                     var("indices_groups", np.int32, (groups, per_group)))
            lo = node("Gather", [p, const("low_byte", low)], var("indices_low", np.int32, (groups, g)), axis=1)
            lo = node("Div", [lo, const("shift", div)], var("indices_shifted", np.int32, (groups, g)))
            if mult.any():
                hi = node("Gather", [p, const("high_byte", high)], var("indices_high", np.int32, (groups, g)), axis=1)
                hi = node("Mul", [hi, const("spill", mult)], var("indices_spill", np.int32, (groups, g)))
                lo = node("Add", [lo, hi], var("indices_joined", np.int32, (groups, g)))
            # drop the bits of the next indices: mod 2^bits (Div/Mul/Sub run at every opset)
            top = const("levels", np.array(1 << self.bits, np.int32))
            q = node("Div", [lo, top], var("indices_over", np.int32, (groups, g)))
            q = node("Mul", [q, top], var("indices_over_scaled", np.int32, (groups, g)))
            lo = node("Sub", [lo, q], var("indices_unpacked", np.int32, (groups, g)))
            flat = node("Reshape", [lo, const("flat_shape", np.array([groups * g], np.int64))],
                        var("indices_flat", np.int32, (groups * g,)))
            if groups * g != w.size:
                flat = self._slice(model, flat, w.size, const, var, node)
            idx = node("Reshape", [flat, const("indices_shape", np.array(index_shape, np.int64))],
                       var("indices", np.int32, index_shape))
        else:
            raw = const("indices", index_values.astype(np.uint8).reshape(index_shape))
            stored += raw.values.nbytes
            idx = node("Cast", [raw], var("indices_i32", np.int32, index_shape), to=6)
        if self.granularity == "tensor":
            out = node("Gather", [book, idx], var("shared", w.dtype, w.shape), axis=0)
        else:
            out = node("GatherElements", [book, idx], var("shared", w.dtype, index_shape),
                       axis=1 if site.out_axis == 0 else 0)
            out = node("Reshape", [out, const("shape", np.array(w.shape, np.int64))], var("shared_w", w.dtype, w.shape))
        for reader in site.nodes:
            reader.inputs[1] = out
        graph.nodes.extend(nodes)
        return stored


# ----------------------------------------------------------------------------------
# binarize
# ----------------------------------------------------------------------------------
@register_pass("binarize")
class Binarize(Pass):
    """Binary weights: sign(W) times each output channel's mean |W| (explicitly lossy).

    The first and last weighted layers stay float by default (``protect``)."""

    # Binarizing a trained network moves its outputs far; verification only
    # catches a broken model (shape change, NaN), the measured cosine is in stats.
    tolerance = Tolerance(relative=None, cosine=-1.0, lossy=True)

    ops = Option(list, list(WEIGHT_OPS), "op types whose weight (input 1) is binarized")
    protect = Option(list, ["first", "last"], "left in float: node names, 'first' and 'last' (the first and last "
                     "eligible weighted node in graph order)")
    min_size = Option(int, 1024, "weights with fewer elements than this are left alone", min=1)
    samples = Option(int, 8, "sample inputs (from --inputs or --calib) on which the output cosine is measured",
                     min=0)

    def __init__(self, **options):
        super().__init__(**options)
        check_ops(self.name, self.ops)

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        notes: list[str] = []
        sites = find_weight_sites(model, self.ops, self.min_size, notes)
        protect = set(self.protect)
        chosen: list[WeightSite] = []
        for i, site in enumerate(sites):
            names = {n.name for n in site.nodes}
            if names & protect or ("first" in protect and i == 0) or ("last" in protect and i == len(sites) - 1):
                notes.append(f"{site.label}: protected; left in float")
                continue
            chosen.append(site)
        if not chosen:
            return PassResult(False, {"tensors": 0}, notes + ["no weight to binarize"])
        samples = _samples(ctx, self.samples)
        before = _outputs(model, samples) if samples else None
        errors = []
        for site in chosen:
            w = site.load()
            ch = site.to_channels(w).astype(np.float64)
            scale = np.abs(ch).mean(axis=1, keepdims=True)
            b = np.where(ch >= 0, scale, -scale)
            norm = float(np.linalg.norm(ch))
            errors.append(float(np.linalg.norm(b - ch)) / norm if norm else 0.0)
            site.store(site.from_channels(b.astype(w.dtype), w.shape))
        stats: dict[str, Any] = {"tensors": len(chosen), "weight_error_mean": round(float(np.mean(errors)), 6)}
        if before is not None:
            from graphopt.fidelity import compare_outputs

            values = compare_outputs(_outputs(model, samples), before)
            stats["samples"] = len(samples)
            stats["cosine"] = round(values["cosine"], 6)
            stats["mean_cosine"] = round(values["mean-cosine"], 6)
        else:
            notes.append("no sample inputs (--inputs or --calib): output cosine not measured")
        return PassResult(changed=True, stats=stats, notes=notes)


def _samples(ctx: PassContext, limit: int) -> list[dict[str, np.ndarray]]:
    if limit <= 0:
        return []
    if ctx.calibration is not None:
        return [dict(s) for s in itertools.islice(iter(ctx.calibration), limit)]
    if ctx.inputs:
        return [dict(ctx.inputs)]
    return []


def _outputs(model: Model, samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    from graphopt import runtime

    try:
        sess = runtime.session(model.to_proto(), source_dir=model.source_dir)
        return [runtime.run(sess, s) for s in samples]
    except Exception as exc:
        from graphopt.errors import PassError, first_line

        raise PassError(f"pass 'binarize': onnxruntime cannot run the model on the sample inputs: "
                        f"{first_line(exc)}") from None

