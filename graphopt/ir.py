"""The IR: an onnx-graphsurgeon graph plus the model-level facts gs does not keep.

Loading never reads external weights eagerly: they stay behind
:class:`ExternalValues`, which reads its bytes from the model's own folder only
when a pass asks for them, and saving streams them into the new data file.
Saving is atomic (temporary file + rename) so a failure never leaves a
half-written model, and it never touches the input file.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

# gs logs warnings on stdout (e.g. about attributes it skips); graphopt reports
# what matters itself, in one line.
G_LOGGER.severity = G_LOGGER.ERROR

from graphopt.errors import ModelError, UsageError, first_line
from graphopt.files import atomic_files

TWO_GB = 2**31
# Tensors smaller than this stay inline when writing external data, as onnx does.
EXTERNAL_THRESHOLD = 1024
# Offsets in the data file are aligned so weights can be memory-mapped directly.
EXTERNAL_ALIGN = 64
_COPY_CHUNK = 16 * 2**20


class ExternalValues(LazyValues):
    """Lazy values of a tensor stored in an external file inside ``base_dir``."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path):
        super().__init__(tensor)
        self.base_dir = base_dir
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        self.path = resolve_external_path(base_dir, info.location, tensor.name)
        self.offset = int(info.offset or 0)
        self.length = int(info.length) if info.length else None

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length) if self.length is not None else f.read()
        return data

    def iter_chunks(self) -> Iterator[bytes]:
        remaining = self.length if self.length is not None else None
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while remaining is None or remaining > 0:
                n = _COPY_CHUNK if remaining is None else min(_COPY_CHUNK, remaining)
                chunk = f.read(n)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def load(self) -> np.ndarray:
        inline = onnx.TensorProto()
        inline.name = self.tensor.name
        inline.data_type = self.tensor.data_type
        inline.dims.extend(self.tensor.dims)
        inline.raw_data = self.read_bytes()
        return np.array(onnx.numpy_helper.to_array(inline))


def resolve_external_path(base_dir: Path, location: str, tensor_name: str) -> Path:
    """Resolve an external-data location, refusing anything outside ``base_dir``."""
    loc = Path(location)
    if not location or loc.is_absolute() or ".." in loc.parts:
        raise ModelError(
            f"tensor '{tensor_name}': external data location '{location}' leaves the model's folder"
        )
    base = base_dir.resolve()
    path = (base / loc).resolve()
    if base != path and base not in path.parents:
        raise ModelError(
            f"tensor '{tensor_name}': external data location '{location}' leaves the model's folder"
        )
    return path


@dataclasses.dataclass
class ModelInfo:
    """Model-level fields that a gs round trip would otherwise drop or rewrite."""

    ir_version: int = 8
    opset_imports: dict[str, int] = dataclasses.field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata_props: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # Names that were both graph inputs and initializers (required before IR v4,
    # "overridable initializers" after); kept listed as inputs on export.
    initializer_inputs: list[str] = dataclasses.field(default_factory=list)
    # Non-empty input/output value_info of the original graph by position, so a
    # graph whose outputs became constants keeps its declared types and shapes.
    input_order: list[str] = dataclasses.field(default_factory=list)
    # Serialized TypeProtos of values that are not plain tensors (optionals,
    # maps, nested sequences), which gs cannot write back itself.
    value_types: dict[str, bytes] = dataclasses.field(default_factory=dict)
    # Intermediate values the source model annotated (value_info).  Written
    # models annotate only these: graphopt's own inferred shapes serve its
    # analyses, and handing them to a runtime changes its choices (onnxruntime
    # 1.32 fuses Add+LayerNormalization into SkipLayerNormalization only where
    # symbolic dims prove equal shapes, and that kernel is 3-7x slower on CPU).
    annotated: frozenset[str] = frozenset()
    # What loading changed to accept a model onnxruntime runs but the checker
    # refuses (one line each); the CLI prints them and the report lists them.
    load_notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Model:
    """A graph under optimization and the facts needed to write it back."""

    graph: gs.Graph
    info: ModelInfo
    source_dir: Path | None = None
    source_path: Path | None = None
    # Results of analyses (shape inference, ...) valid for the graph as it is;
    # the pass manager clears them whenever a pass reports a change.
    analyses: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # -- facts ----------------------------------------------------------------------
    @property
    def opset(self) -> int:
        """The version of the default (ai.onnx) operator set the model imports."""
        opsets = self.info.opset_imports
        return int(opsets.get("", opsets.get("ai.onnx", 1)))

    @property
    def overridable(self) -> frozenset[str]:
        """Initializers that are also graph inputs: callers may feed them, so no
        pass may treat their values as known."""
        return frozenset(self.info.initializer_inputs)

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source_dir: Path | None = None) -> "Model":
        init_names = {t.name for t in proto.graph.initializer}
        info = ModelInfo(
            ir_version=proto.ir_version,
            opset_imports={o.domain: o.version for o in proto.opset_import},
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata_props=[(p.key, p.value) for p in proto.metadata_props],
            initializer_inputs=[i.name for i in proto.graph.input if i.name in init_names],
            input_order=[i.name for i in proto.graph.input],
            value_types=_non_tensor_types(proto.graph),
            annotated=frozenset(vi.name for g in _graph_protos(proto.graph) for vi in g.value_info),
        )
        try:
            graph = gs.import_onnx(_encode_type_attributes(proto))
        except Exception as exc:  # gs raises assorted errors on malformed graphs
            raise ModelError(f"cannot import graph: {first_line(exc)}") from None
        model = cls(graph=graph, info=info, source_dir=source_dir)
        model._bind_external_values()
        return model

    def to_proto(self) -> onnx.ModelProto:
        """Export to a ModelProto; external tensors keep their source references."""
        graph = self.graph
        opsets = dict(self.info.opset_imports)
        for domain, version in _used_domains(graph).items():
            opsets.setdefault(domain, version)
        # gs only writes tensor, sequence and sparse types: hide the others
        # during export and put the recorded types back afterwards.
        hidden = [
            (t, t.dtype)
            for g in iter_graphs(graph)
            for t in g.tensors().values()
            if isinstance(t, gs.Variable) and getattr(t, "type", "tensor_type") not in _GS_TYPES
        ]
        for t, _ in hidden:
            t.dtype = None
        try:
            proto = gs.export_onnx(
                graph,
                do_type_check=False,
                opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
            )
        except Exception as exc:
            raise ModelError(f"cannot export graph: {first_line(exc)}") from None
        finally:
            for t, dtype in hidden:
                t.dtype = dtype
        _hoist_shared_initializers(proto.graph, _single_constants(graph))
        if self.info.value_types:
            _restore_value_types(proto.graph, self.info.value_types)
        _decode_type_attributes(proto.graph)
        _unique_node_names(proto.graph)
        proto.ir_version = self.info.ir_version
        proto.producer_name = self.info.producer_name
        proto.producer_version = self.info.producer_version
        proto.domain = self.info.domain
        proto.model_version = self.info.model_version
        proto.doc_string = self.info.doc_string
        del proto.metadata_props[:]
        for key, value in self.info.metadata_props:
            proto.metadata_props.add(key=key, value=value)
        self._restore_initializer_inputs(proto)
        return proto

    def to_analysis_proto(self, inline_limit: int = 4096) -> onnx.ModelProto:
        """Export for shape inference and other analyses that read only the
        dims and dtypes of large weights: in-memory constants over
        ``inline_limit`` bytes are written as data-less stubs, so analysing a
        model whose weights were folded or fused does not copy every weight."""
        swapped = []
        for g in iter_graphs(self.graph):
            for t in g.tensors().values():
                if (
                    isinstance(t, gs.Constant)
                    and not isinstance(t._values, LazyValues)
                    and isinstance(t._values, np.ndarray)
                    and t._values.nbytes > inline_limit
                ):
                    swapped.append((t, t._values))
                    t._values = LazyValues(_stub_tensor(t.name, t._values))
        try:
            return self.to_proto()
        finally:
            for t, values in swapped:
                t._values = values

    def copy(self) -> "Model":
        return Model(
            graph=self.graph.copy(), info=copy.deepcopy(self.info), source_dir=self.source_dir,
            source_path=self.source_path,
        )

    # -- helpers ----------------------------------------------------------------------
    def constants(self) -> Iterator[gs.Constant]:
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                yield tensor

    def _bind_external_values(self) -> None:
        for graph in iter_graphs(self.graph):
            for tensor in graph.tensors().values():
                if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
                    proto = tensor._values.tensor
                    if isinstance(proto, onnx.TensorProto) and _is_external(proto):
                        if self.source_dir is None:
                            raise ModelError(f"tensor '{proto.name}': external data but no model folder")
                        tensor._values = ExternalValues(proto, self.source_dir)

    def _restore_initializer_inputs(self, proto: onnx.ModelProto) -> None:
        inits = {t.name: t for t in proto.graph.initializer}
        # Before IR v4 every initializer must also be a graph input, including
        # the ones passes create.
        names = list(inits) if self.info.ir_version < 4 else self.info.initializer_inputs
        if not names:
            return
        listed = {i.name for i in proto.graph.input}
        extra = []
        for name in names:
            if name in inits and name not in listed:
                t = inits[name]
                extra.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        if not extra:
            return
        order = {n: i for i, n in enumerate(self.info.input_order)}
        inputs = list(proto.graph.input) + extra
        inputs.sort(key=lambda vi: order.get(vi.name, len(order)))
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)


_GS_TYPES = ("tensor_type", "sequence_type", "sparse_tensor_type", None)


def _graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graph_protos(attr.g)
            for sub in attr.graphs:
                yield from _graph_protos(sub)


def _single_constants(graph: gs.Graph) -> set[str]:
    """Names that denote one constant throughout the model (gs shares the
    tensor object between a scope and the subgraphs that read it)."""
    objects: dict[str, set[int]] = {}
    for g in iter_graphs(graph):
        for name, t in g.tensors().items():
            if isinstance(t, gs.Constant):
                objects.setdefault(name, set()).add(id(t))
    return {name for name, ids in objects.items() if len(ids) == 1}


def _hoist_shared_initializers(graph: onnx.GraphProto, single: set[str]) -> None:
    """Store each constant once, in the innermost scope enclosing all its readers.

    gs writes an outer-scope constant into every subgraph that reads it, so the
    weights an If's two branches share would be written three times.  Scopes
    are paths of (node, attribute, graph) indices; the common prefix of the
    paths of every graph holding a copy is the scope that keeps it."""
    where: dict[str, list[tuple[tuple, onnx.GraphProto]]] = {}

    def walk(g: onnx.GraphProto, path: tuple) -> None:
        for t in g.initializer:
            if t.name in single:
                where.setdefault(t.name, []).append((path, g))
        for i, node in enumerate(g.node):
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g, path + ((i, attr.name, 0),))
                for j, sub in enumerate(attr.graphs):
                    walk(sub, path + ((i, attr.name, j),))

    walk(graph, ())
    for name, copies in where.items():
        if len(copies) < 2:
            continue
        common = _common_prefix([path for path, _ in copies])
        moved = None
        for path, g in copies:
            if path != common:
                index = next(k for k, t in enumerate(g.initializer) if t.name == name)
                moved = moved or _detached(g.initializer[index])
                del g.initializer[index]
        if all(path != common for path, _ in copies):
            _graph_at(graph, common).initializer.append(moved)


def _detached(tensor: onnx.TensorProto) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return copy


def _common_prefix(paths: list[tuple]) -> tuple:
    prefix = paths[0]
    for path in paths[1:]:
        k = 0
        while k < min(len(prefix), len(path)) and prefix[k] == path[k]:
            k += 1
        prefix = prefix[:k]
    return prefix


def _graph_at(graph: onnx.GraphProto, path: tuple) -> onnx.GraphProto:
    for node_index, attr_name, graph_index in path:
        attr = next(a for a in graph.node[node_index].attribute if a.name == attr_name)
        graph = attr.g if attr.HasField("g") else attr.graphs[graph_index]
    return graph


def _plain(tp: onnx.TypeProto) -> bool:
    """Types gs round-trips faithfully: tensors, sparse tensors, sequences of tensors."""
    if tp.HasField("tensor_type") or tp.HasField("sparse_tensor_type"):
        return True
    return tp.HasField("sequence_type") and tp.sequence_type.elem_type.HasField("tensor_type")


def _non_tensor_types(graph: onnx.GraphProto) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for g in _graph_protos(graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.ByteSize() and not _plain(vi.type):
                out[vi.name] = vi.type.SerializeToString()
    return out


def _restore_value_types(graph: onnx.GraphProto, types: dict[str, bytes]) -> None:
    for g in _graph_protos(graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name in types and not vi.type.HasField("tensor_type"):
                vi.type.CopyFrom(onnx.TypeProto.FromString(types[vi.name]))


def _stub_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """A TensorProto with the dims and dtype of ``values`` and no data (marked
    external, so no reader mistakes it for an empty tensor)."""
    t = onnx.TensorProto()
    t.name = name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="graphopt-analysis-stub")
    return t


_TYPE_ATTR_PREFIX = "__graphopt_type__"


def _encode_type_attributes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """gs drops TYPE_PROTO attributes (Optional's ``type``): carry them through
    the import as hex strings under a reserved name, decoded again on export."""
    nodes = [
        (node, attr)
        for g in _graph_protos(proto.graph)
        for node in g.node
        for attr in node.attribute
        if attr.type == onnx.AttributeProto.TYPE_PROTO
    ]
    if not nodes:
        return proto
    proto = copy_proto(proto)
    for g in _graph_protos(proto.graph):
        for node in g.node:
            for i, attr in enumerate(node.attribute):
                if attr.type == onnx.AttributeProto.TYPE_PROTO:
                    encoded = onnx.helper.make_attribute(
                        _TYPE_ATTR_PREFIX + attr.name, attr.tp.SerializeToString().hex()
                    )
                    node.attribute[i].CopyFrom(encoded)
    return proto


def _decode_type_attributes(graph: onnx.GraphProto) -> None:
    for g in _graph_protos(graph):
        for node in g.node:
            for i, attr in enumerate(node.attribute):
                if attr.name.startswith(_TYPE_ATTR_PREFIX):
                    tp = onnx.TypeProto.FromString(bytes.fromhex(attr.s.decode()))
                    node.attribute[i].CopyFrom(onnx.helper.make_attribute(attr.name[len(_TYPE_ATTR_PREFIX):], tp))


def _unique_node_names(graph: onnx.GraphProto) -> None:
    """onnxruntime refuses two nodes with one name; a pass that names a new
    node after an old one must not make the model unloadable.  Later
    duplicates get a numeric suffix, deterministically."""
    for g in _graph_protos(graph):
        seen: set[str] = set()
        dupes = []
        for node in g.node:
            if node.name and node.name in seen:
                dupes.append(node)
            seen.add(node.name)
        for node in dupes:
            base, i = node.name, 1
            while f"{base}_{i}" in seen:
                i += 1
            node.name = f"{base}_{i}"
            seen.add(node.name)


def copy_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(_is_external(t) for t in iter_tensor_protos(proto.graph))


def node_subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """The graphs ``node`` holds in its attributes (If branches, Loop and Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, gs.Graph))


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every graph nested in it, outermost first."""
    yield graph
    for node in graph.nodes:
        for sub in node_subgraphs(node):
            yield from iter_graphs(sub)


def _used_domains(graph: gs.Graph) -> dict[str, int]:
    domains: dict[str, int] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            if node.domain and node.domain not in ("", "ai.onnx"):
                domains.setdefault(node.domain, 1)
    return domains




# ----------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------
def load_proto(path: str | os.PathLike, notes: list[str] | None = None) -> onnx.ModelProto:
    """Read and validate a model file without loading its external data.
    What was normalized to accept it is appended to ``notes``."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ModelError(f"{path}: not a valid ONNX model (no graph or no opset import)")
    _check_tensors(proto, path)
    _check_value_infos(proto.graph, path)
    done = normalize_ir_version(proto)
    if notes is not None:
        notes.extend(done)
    try:
        # By path, so the checker looks for external data next to the model
        # (with a proto it would look in the current directory).
        onnx.checker.check_model(str(path) if _has_external(proto) else proto)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: invalid model: {_checker_message(exc)}") from None
    except Exception as exc:
        raise ModelError(f"{path}: invalid model: {first_line(exc)}") from None
    return proto


def load(path: str | os.PathLike) -> Model:
    """Load a model for optimization; weights in external files stay on disk."""
    path = Path(path)
    notes: list[str] = []
    proto = load_proto(path, notes)
    try:
        model = Model.from_proto(proto, source_dir=path.resolve().parent)
        model.source_path = path.resolve()
        model.info.load_notes = [f"{path}: {n}" for n in notes]
        return model
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None


# The first IR version in which an initializer need not be a graph input.
_IR_INITIALIZERS_AS_CONSTANTS = 4


def normalize_ir_version(proto: onnx.ModelProto) -> list[str]:
    """Raise a model older than IR version 4 to 4, as onnxruntime reads it.

    Before IR 4 every initializer had to be listed as a graph input, and many
    exporters (and onnx's own frozen test models) did not; onnxruntime runs
    such models anyway and treats every initializer as a constant that cannot be
    fed, listed or not.  IR 4 says exactly that when the initializers are not
    listed, so the listing goes and the checker accepts the model.  Returns a
    note per change (empty if none).
    """
    if not 0 < proto.ir_version < _IR_INITIALIZERS_AS_CONSTANTS:
        return []  # IR 0 is a missing version, which onnxruntime refuses too
    old = proto.ir_version
    inits = {t.name for t in proto.graph.initializer}
    listed = [vi for vi in proto.graph.input if vi.name in inits]
    if listed:
        kept = [vi for vi in proto.graph.input if vi.name not in inits]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
    proto.ir_version = _IR_INITIALIZERS_AS_CONSTANTS
    unlisted = len(inits) - len(listed)
    why = []
    if listed:
        why.append(f"{len(listed)} initializers no longer listed as graph inputs")
    if unlisted:
        why.append(f"{unlisted} initializers were not listed")
    detail = f" ({'; '.join(why)}; onnxruntime treats initializers as constants before IR 4)" if why else ""
    return [f"IR version {old} raised to {_IR_INITIALIZERS_AS_CONSTANTS}{detail}"]


def _checker_message(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # The checker appends a "==> Context: ..." line that names the node; keep both.
    ctx = next((ln for ln in lines if ln.startswith("==> Context")), "")
    body = [ln for ln in lines if not ln.startswith("==> Context")]
    # Some messages continue over lines ("... input 'x' of node:\nname: n8 OpType:
    # Conv\nis not output of any previous nodes."): join them into one.
    main = " ".join(body) if body and body[0].endswith(":") else (body[0] if body else "checker failed")
    msg = main + (f" ({ctx[4:].strip()})" if ctx else "")
    return msg if len(msg) < 400 else msg[:397] + "..."


def iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in a graph: initializers, attributes, subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensor_protos(attr.g)
            for sub in attr.graphs:
                yield from iter_tensor_protos(sub)


_VALID_DTYPES = set(onnx.TensorProto.DataType.values())


def _check_value_infos(graph: onnx.GraphProto, path: Path) -> None:
    """Declared types of inputs, outputs and value_info: the checker lets an
    unknown element type through, and a pass or the verifier would then fail
    on the input's fault.  Negative dims are normalized to unknown ones."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in _VALID_DTYPES:
            raise ModelError(f"{path}: value '{vi.name}' has unknown element type {tt.elem_type}")
        if tt.HasField("shape"):
            for d in tt.shape.dim:
                # Some exporters (Paddle) write -1 for a dynamic dimension: read it as unknown.
                if d.HasField("dim_value") and d.dim_value < 0:
                    d.Clear()
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _check_value_infos(attr.g, path)
            for sub in attr.graphs:
                _check_value_infos(sub, path)


def _check_tensors(proto: onnx.ModelProto, path: Path) -> None:
    """Catch truncated or inconsistent weights before any pass trips over them."""
    base = path.resolve().parent
    for tensor in iter_tensor_protos(proto.graph):
        if any(d < 0 for d in tensor.dims):
            raise ModelError(f"{path}: tensor '{tensor.name}' has a negative dimension")
        if tensor.data_type == onnx.TensorProto.UNDEFINED or tensor.data_type not in _DTYPE_BITS:
            if tensor.data_type == onnx.TensorProto.STRING:
                if not _is_external(tensor) and len(tensor.string_data) != math.prod(tensor.dims):
                    raise ModelError(
                        f"{path}: tensor '{tensor.name}' holds {len(tensor.string_data)} strings, "
                        f"its shape needs {math.prod(tensor.dims)}"
                    )
                continue
            raise ModelError(f"{path}: tensor '{tensor.name}' has unknown data type {tensor.data_type}")
        numel = math.prod(tensor.dims)  # exact: np.prod would wrap around on huge dims
        nbits = _DTYPE_BITS[tensor.data_type] * numel
        nbytes = (nbits + 7) // 8
        if _is_external(tensor):
            try:
                info = onnx.external_data_helper.ExternalDataInfo(tensor)
            except (ValueError, TypeError) as exc:
                raise ModelError(
                    f"{path}: tensor '{tensor.name}': bad external data entry ({first_line(exc)})"
                ) from None
            try:
                file = resolve_external_path(base, info.location, tensor.name) if info.location else None
            except ModelError as exc:
                raise ModelError(f"{path}: {exc}") from None
            if file is None:
                raise ModelError(f"{path}: tensor '{tensor.name}' has external data with no location")
            if not file.is_file():
                raise ModelError(f"{path}: tensor '{tensor.name}': external data file '{info.location}' not found")
            offset = int(info.offset or 0)
            length = int(info.length) if info.length else file.stat().st_size - offset
            if length != nbytes or offset + length > file.stat().st_size:
                raise ModelError(
                    f"{path}: tensor '{tensor.name}': external data file '{info.location}' is truncated "
                    f"or does not match the tensor's shape"
                )
        elif tensor.HasField("raw_data"):
            if len(tensor.raw_data) != nbytes:
                raise ModelError(
                    f"{path}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes, its shape needs {nbytes}"
                )
        else:
            field, per = _TYPED_FIELDS.get(tensor.data_type, ("int32_data", 1))
            bits = _DTYPE_BITS[tensor.data_type]
            # 4- and 2-bit types are packed into int32_data like raw bytes.
            want = numel * per if field != "int32_data" or bits >= 8 else (numel * bits + 7) // 8
            have = len(getattr(tensor, field))
            if have != want:
                raise ModelError(
                    f"{path}: tensor '{tensor.name}' holds {have} values in {field}, its shape needs {want}"
                )


_DTYPE_BITS = {
    onnx.TensorProto.FLOAT: 32,
    onnx.TensorProto.UINT8: 8,
    onnx.TensorProto.INT8: 8,
    onnx.TensorProto.UINT16: 16,
    onnx.TensorProto.INT16: 16,
    onnx.TensorProto.INT32: 32,
    onnx.TensorProto.INT64: 64,
    onnx.TensorProto.BOOL: 8,
    onnx.TensorProto.FLOAT16: 16,
    onnx.TensorProto.DOUBLE: 64,
    onnx.TensorProto.UINT32: 32,
    onnx.TensorProto.UINT64: 64,
    onnx.TensorProto.COMPLEX64: 64,
    onnx.TensorProto.COMPLEX128: 128,
    onnx.TensorProto.BFLOAT16: 16,
}
# Where a tensor without raw_data keeps its values (field, numbers per element);
# every other type uses int32_data.
_TYPED_FIELDS = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
}
for _name, _bits in (
    ("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8),
    ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("FLOAT8E8M0", 8), ("UINT2", 2), ("INT2", 2),
):
    if hasattr(onnx.TensorProto, _name):
        _DTYPE_BITS[getattr(onnx.TensorProto, _name)] = _bits
del _name, _bits


# ----------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------
def save(
    model: Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protect: list[str | os.PathLike] = (),
    write_shapes: bool = False,
) -> Path:
    """Write ``model`` atomically; external data when asked or when over 2 GB.

    ``protect`` lists files (the input model) that must never be overwritten.
    ``write_shapes`` writes every inferred intermediate shape as value_info;
    by default only the values the source model annotated keep theirs.
    """
    path = Path(path)
    if not path.parent.exists():
        raise UsageError(f"{path}: output folder '{path.parent}' does not exist")
    refuse_overwriting_inputs(model, path, protect)
    proto = model.to_proto()
    if not write_shapes:
        keep_annotations(proto.graph, model.info.annotated)
    for tensor in iter_tensor_protos(proto.graph):
        _drop_stale_external_mark(tensor)
    tensors = [t for t in iter_tensor_protos(proto.graph) if _tensor_nbytes(t) >= EXTERNAL_THRESHOLD]
    total = sum(_tensor_nbytes(t) for t in tensors)
    if external_data is None:
        external_data = total > TWO_GB
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    with atomic_files() as beside:
        if external_data:
            # Unbuffered: tell() is then the file's real offset, which the
            # in-kernel copies of _write_external rely on.
            with open(beside(data_path), "wb", buffering=0) as out:
                for tensor in tensors:
                    _write_external(tensor, out, data_name, _source_of(model, tensor))
        else:
            for tensor in iter_tensor_protos(proto.graph):
                src = _source_of(model, tensor)
                if src is not None:
                    _inline(tensor, src)
        data = proto.SerializeToString(deterministic=True)
        if len(data) >= TWO_GB:
            raise ModelError(f"{path}: model is over 2 GB; save it with external data")
        with open(beside(path), "wb") as f:
            f.write(data)
    return path


def keep_annotations(graph: onnx.GraphProto, names: frozenset[str]) -> None:
    """Drop the value_info of every intermediate value not in ``names``, in
    ``graph`` and its subgraphs."""
    for g in _graph_protos(graph):
        kept = [vi for vi in g.value_info if vi.name in names]
        if len(kept) != len(g.value_info):
            del g.value_info[:]
            g.value_info.extend(kept)


def refuse_overwriting_inputs(model: Model, path: Path, protect) -> None:
    """The files a model was read from (and ``protect``) are never written:
    neither the model file nor the external data it still reads lazily."""
    model_files = {Path(p).resolve() for p in protect}
    if model.source_path is not None:
        model_files.add(model.source_path.resolve())
    data_files = {src.path for src in _external_sources(model).values()}
    out, data = path.resolve(), (path.parent / (path.name + ".data")).resolve()
    if out in model_files:
        raise UsageError(f"{path}: refusing to overwrite the input model")
    if out in data_files or data in data_files:
        raise UsageError(f"{path}: refusing to overwrite the input model's external data")


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    bits = _DTYPE_BITS.get(tensor.data_type, 0)
    n = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return (bits * n + 7) // 8


def _external_sources(model: Model) -> dict[str, ExternalValues]:
    """Map tensor names to the lazy source they came from, for streaming copies."""
    out: dict[str, ExternalValues] = {}
    for graph in iter_graphs(model.graph):
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, ExternalValues):
                out[tensor.name] = tensor._values
    return out


def _drop_stale_external_mark(tensor: onnx.TensorProto) -> None:
    """A weight read into memory by a pass keeps gs's ``data_location=EXTERNAL``
    from the input, and gs exports it with its bytes inline but still marked
    external and without a location; such a tensor is an inline one."""
    if _is_external(tensor) and not any(e.key == "location" and e.value for e in tensor.external_data):
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _source_of(model: Model, tensor: onnx.TensorProto) -> ExternalValues | None:
    """Where an exported tensor's bytes are, when they are still in the input's
    external files.  Exported protos keep their source references, so the proto
    itself says where (this also covers Constant-node attribute tensors, which
    :func:`_external_sources` does not see, and same-named tensors in subgraphs)."""
    if not _is_external(tensor):
        return None
    if model.source_dir is None:
        raise ModelError(f"tensor '{tensor.name}': external data but no model folder to read it from")
    return ExternalValues(tensor, model.source_dir)


def _copy_external(src: ExternalValues, out) -> None:
    """Append ``src``'s bytes to ``out`` (an unbuffered file): in the kernel with
    copy_file_range where the OS allows (no user-space buffer; a reflink on
    copy-on-write filesystems), else through bounded chunks.  Either way memory
    stays O(chunk), never O(tensor)."""
    length = src.length if src.length is not None else src.path.stat().st_size - src.offset
    copy_range = getattr(os, "copy_file_range", None)
    done = 0
    if copy_range is not None:
        with open(src.path, "rb", buffering=0) as f:
            try:
                while done < length:
                    n = copy_range(f.fileno(), out.fileno(), min(length - done, 1 << 30), src.offset + done)
                    if n == 0:
                        raise ModelError(f"tensor '{src.tensor.name}': external data file '{src.path.name}' is truncated")
                    done += n
            except OSError:  # EXDEV, ENOSYS, EINVAL...: fall back to copying through memory
                pass
    if done < length:
        with open(src.path, "rb") as f:
            f.seek(src.offset + done)
            while done < length:
                chunk = f.read(min(_COPY_CHUNK, length - done))
                if not chunk:
                    raise ModelError(f"tensor '{src.tensor.name}': external data file '{src.path.name}' is truncated")
                _write_all(out, chunk)
                done += len(chunk)


def _write_all(out, data: bytes) -> None:
    """``out.write`` on an unbuffered file may write less than asked (always,
    on Linux, past 2 GiB in one call); loop until everything is out."""
    view = memoryview(data)
    while view:
        n = out.write(view)
        if not n:
            raise OSError(f"cannot write to {getattr(out, 'name', 'the data file')}")
        view = view[n:]


def _write_external(tensor: onnx.TensorProto, out, location: str, src: ExternalValues | None) -> None:
    pad = (-out.tell()) % EXTERNAL_ALIGN
    if pad:
        _write_all(out, b"\0" * pad)
    offset = out.tell()
    if src is not None:
        _copy_external(src, out)
    else:
        if not tensor.HasField("raw_data"):
            array = onnx.numpy_helper.to_array(tensor)
            tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
        _write_all(out, tensor.raw_data)
        tensor.ClearField("raw_data")
    length = out.tell() - offset
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _inline(tensor: onnx.TensorProto, src: ExternalValues) -> None:
    tensor.raw_data = src.read_bytes()
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
