"""Fuzzing ``graphopt opt`` with broken versions of the onnx "light" models.

Every mutant goes through ``graphopt.cli.main`` (in-process, for speed) with the
pipeline ``infer-shapes,eliminate-dead-code`` (and the default pipeline when
its passes exist), a share of them with ``--verify-each``.  Whatever the
mutant, graphopt must answer with a documented exit code (0, 2, 3 or 4): never
1 (internal error), never a traceback, never a hang, and a failed run leaves no
output or temporary file.  A successful run writes a model that graphopt can
load again, and the input file is never modified.

Mutations: truncation at a random point, random bit flips, and structural
edits of the ModelProto (delete a node or an initializer, rename a node input
to a missing name, negative or huge dims, invalid data types, no opset
import, a duplicated output name, an unknown op, raw_data of the wrong length,
a cycle, nodes out of order, attributes of the wrong type, ...).

The default test run does a smoke test of ~30 mutants in this process.  The
full run (1,000+ mutants in a pool of worker processes, each case with a time
limit; a few minutes) is marked slow::

    pytest -m slow tests/test_fuzz.py            # full fuzz, prints a summary
    GRAPHOPT_FUZZ_CASES=5000 pytest -m slow tests/test_fuzz.py   # more cases
    GRAPHOPT_FUZZ_SEED=7 pytest -m slow tests/test_fuzz.py       # other mutants

A failing case is reported with its (model, mutation, seed, argv) so it can be
replayed with :func:`make_mutant` and :func:`run_case`.
"""
from __future__ import annotations

import collections
import contextlib
import io
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import onnx
import pytest

from conftest import LIGHT_MODELS

SIMPLE_PIPELINE = "infer-shapes,eliminate-dead-code"
CASE_TIME_LIMIT = 60  # seconds; a case running longer is a hang
# Models cheap enough to run in onnxruntime for --verify-each.
VERIFY_MODELS = ("light_squeezenet", "light_shufflenet", "light_inception_v1", "light_densenet121")
SMOKE_MODELS = ("light_squeezenet", "light_inception_v1", "light_zfnet512", "light_bvlc_alexnet")
DOCUMENTED = {0, 2, 3, 4}

BYTE_MUTATIONS = ("truncate", "bitflip")
STRUCT_MUTATIONS = (
    "delete_node",
    "delete_initializer",
    "rename_input",
    "rename_output",
    "negative_dim",
    "huge_dim",
    "bad_dtype",
    "bad_input_dtype",
    "drop_opset",
    "old_opset",
    "dup_output",
    "dup_node_output",
    "unknown_op",
    "unknown_domain",
    "raw_data_length",
    "cycle",
    "self_loop",
    "swap_nodes",
    "bad_attribute",
    "drop_attribute",
    "empty_name",
    "drop_graph_output",
    "shape_values",
    "ir_version",
    "float_data",
    "external_ref",
)
MUTATIONS = BYTE_MUTATIONS + STRUCT_MUTATIONS


# ----------------------------------------------------------------------------------
# Mutants
# ----------------------------------------------------------------------------------
_CACHE: dict[str, tuple[bytes, onnx.ModelProto]] = {}


def _original(path: str) -> tuple[bytes, onnx.ModelProto]:
    if path not in _CACHE:
        data = Path(path).read_bytes()
        _CACHE[path] = (data, onnx.ModelProto.FromString(data))
    return _CACHE[path]


def make_mutant(path: str, kind: str, seed: int) -> bytes:
    """The bytes of mutant ``kind`` number ``seed`` of the model at ``path``."""
    data, original = _original(path)
    rng = random.Random(f"{Path(path).name}:{kind}:{seed}")
    if kind == "truncate":
        return data[: rng.randrange(len(data))]
    if kind == "bitflip":
        buf = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 16, 64))):
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf)
    m = onnx.ModelProto()
    m.CopyFrom(original)
    _STRUCT[kind](m, rng)
    return m.SerializeToString()


def _node(m, rng):
    return rng.choice(m.graph.node)


def _m_delete_node(m, rng):
    del m.graph.node[rng.randrange(len(m.graph.node))]


def _m_delete_initializer(m, rng):
    del m.graph.initializer[rng.randrange(len(m.graph.initializer))]


def _m_rename_input(m, rng):
    node = rng.choice([n for n in m.graph.node if n.input])
    node.input[rng.randrange(len(node.input))] = f"missing_{rng.randrange(1000)}"


def _m_rename_output(m, rng):
    node = _node(m, rng)
    node.output[0] = f"renamed_{rng.randrange(1000)}"


def _dims_holders(m):
    holders = []
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            holders.extend(vi.type.tensor_type.shape.dim)
    return holders


def _set_dim(m, rng, value):
    if rng.random() < 0.5 and m.graph.initializer:
        t = rng.choice([t for t in m.graph.initializer if t.dims] or list(m.graph.initializer))
        if t.dims:
            t.dims[rng.randrange(len(t.dims))] = value
        else:
            t.dims.append(value)
    else:
        dims = _dims_holders(m)
        rng.choice(dims).dim_value = value


def _m_negative_dim(m, rng):
    _set_dim(m, rng, -rng.choice((1, 2, 3, 100, 2**40)))


def _m_huge_dim(m, rng):
    _set_dim(m, rng, rng.choice((2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1)))


_BAD_DTYPES = (0, 8, 17, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 99, 1000, 2**31 - 1, -1, -7)


def _m_bad_dtype(m, rng):
    t = rng.choice(m.graph.initializer)
    t.data_type = rng.choice(_BAD_DTYPES)


def _m_bad_input_dtype(m, rng):
    vi = rng.choice(list(m.graph.input) + list(m.graph.output))
    vi.type.tensor_type.elem_type = rng.choice(_BAD_DTYPES)


def _m_drop_opset(m, rng):
    del m.opset_import[:]


def _m_old_opset(m, rng):
    m.opset_import[0].version = rng.choice((0, 1, 2, 5, 10**6, -3))


def _m_dup_output(m, rng):
    out = onnx.ValueInfoProto()
    out.CopyFrom(rng.choice(m.graph.output))
    if rng.random() < 0.5:
        m.graph.output.append(out)
    else:  # a second output named like an input or initializer
        out.name = rng.choice(list(m.graph.input)).name
        m.graph.output.append(out)


def _m_dup_node_output(m, rng):
    a, b = rng.sample(range(len(m.graph.node)), 2)
    m.graph.node[b].output[0] = m.graph.node[a].output[0]


def _m_unknown_op(m, rng):
    _node(m, rng).op_type = rng.choice(("NoSuchOp", "conv", "", "Conv2D", "Relu6"))


def _m_unknown_domain(m, rng):
    node = _node(m, rng)
    node.domain = rng.choice(("com.example.none", "com.microsoft", "ai.onnx.ml", "ai.onnx.preview.training"))


def _m_raw_data_length(m, rng):
    t = rng.choice([t for t in m.graph.initializer if t.raw_data] or list(m.graph.initializer))
    raw = t.raw_data
    choice = rng.randrange(3)
    if choice == 0 and raw:
        t.raw_data = raw[: rng.randrange(len(raw))]
    elif choice == 1:
        t.raw_data = raw + bytes(rng.randrange(1, 9))
    else:
        t.raw_data = b"\x01"


def _m_cycle(m, rng):
    n = len(m.graph.node)
    i = rng.randrange(1, n)
    j = rng.randrange(0, i)
    later, earlier = m.graph.node[i], m.graph.node[j]
    if earlier.input:
        earlier.input[rng.randrange(len(earlier.input))] = later.output[0]
    else:
        earlier.input.append(later.output[0])


def _m_self_loop(m, rng):
    node = rng.choice([n for n in m.graph.node if n.input])
    node.input[0] = node.output[0]


def _m_swap_nodes(m, rng):
    nodes = list(m.graph.node)
    rng.shuffle(nodes)
    del m.graph.node[:]
    m.graph.node.extend(nodes)


def _m_bad_attribute(m, rng):
    node = rng.choice([n for n in m.graph.node if n.attribute] or list(m.graph.node))
    if not node.attribute:
        node.attribute.append(onnx.helper.make_attribute("bogus", 1))
        return
    attr = rng.choice(node.attribute)
    choice = rng.randrange(5)
    if choice == 0:  # wrong type: a string where ints were expected
        name = attr.name
        attr.Clear()
        attr.name = name
        attr.type = onnx.AttributeProto.STRING
        attr.s = b"nonsense"
    elif choice == 1:  # declared type does not match the field
        attr.type = onnx.AttributeProto.GRAPH
    elif choice == 2:
        attr.ints.extend([-5, 0, 2**40])
    elif choice == 3:
        attr.type = onnx.AttributeProto.SPARSE_TENSOR  # declared, but no sparse_tensor set
    else:
        attr.name = ""


def _m_drop_attribute(m, rng):
    node = rng.choice([n for n in m.graph.node if n.attribute] or list(m.graph.node))
    del node.attribute[:]


def _m_empty_name(m, rng):
    choice = rng.randrange(3)
    if choice == 0:
        _node(m, rng).output[0] = ""
    elif choice == 1:
        rng.choice(m.graph.output).name = ""
    else:
        rng.choice(m.graph.initializer).name = ""


def _m_drop_graph_output(m, rng):
    del m.graph.output[:]


def _m_shape_values(m, rng):
    """Shape tensors (ConstantOfShape inputs, Reshape targets) with absurd values."""
    ints = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT64] or list(m.graph.initializer)
    t = rng.choice(ints)
    value = rng.choice((-1, -7, 0, 2**40, 2**62))  # (2**31 would really allocate 8 GB in onnxruntime)
    if t.data_type == onnx.TensorProto.INT64 and t.raw_data:
        n = len(t.raw_data) // 8
        arr = bytearray(t.raw_data)
        k = rng.randrange(max(n, 1))
        arr[k * 8 : k * 8 + 8] = int(value).to_bytes(8, "little", signed=True)
        t.raw_data = bytes(arr)
    else:
        del t.int64_data[:]
        t.raw_data = b""
        t.ClearField("raw_data")
        t.data_type = onnx.TensorProto.INT64
        del t.dims[:]
        t.dims.append(1)
        t.int64_data.append(value)


def _m_ir_version(m, rng):
    m.ir_version = rng.choice((0, 1, 2, 99, -1))


def _m_float_data(m, rng):
    """Typed data fields whose length does not match the dims."""
    t = rng.choice(m.graph.initializer)
    t.ClearField("raw_data")
    if t.data_type == onnx.TensorProto.INT64:
        t.int64_data.extend(range(rng.randrange(0, 5)))
    else:
        t.data_type = onnx.TensorProto.FLOAT
        t.float_data.extend([1.0] * rng.randrange(0, 5))


def _m_external_ref(m, rng):
    """Move an initializer to 'external data' that is missing, outside the folder,
    the model file itself, or at a bad offset."""
    t = rng.choice(m.graph.initializer)
    t.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    t.data_location = onnx.TensorProto.EXTERNAL
    location = rng.choice(("missing.bin", "../in.onnx", "/etc/hostname", "in.onnx", "out", "", "./in.onnx"))
    entries = [("location", location)]
    choice = rng.randrange(4)
    if choice == 1:
        entries.append(("offset", str(rng.choice((0, 3, 10**12, -1)))))
    elif choice == 2:
        entries.append(("length", str(rng.choice((0, 4, 10**12, -4)))))
    elif choice == 3:
        entries.append(("checksum", "x"))
        entries.append(("offset", "abc"))
    del t.external_data[:]
    for key, value in entries:
        t.external_data.add(key=key, value=value)


_STRUCT = {name: globals()[f"_m_{name}"] for name in STRUCT_MUTATIONS}


# ----------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------
class _Hang(BaseException):
    """Raised by SIGALRM; a BaseException so graphopt's handlers do not catch it."""


def _on_alarm(signum, frame):
    raise _Hang()


def run_case(case: tuple, workdir: str | None = None) -> dict:
    """Run one mutant through ``graphopt opt``; return what happened and what broke."""
    from graphopt.cli import main

    path, kind, seed, pipeline, verify = case
    data = make_mutant(path, kind, seed)
    base = Path(tempfile.mkdtemp(prefix="fuzz-", dir=workdir))
    try:
        src = base / "in.onnx"
        src.write_bytes(data)
        out_dir = base / "out"
        out_dir.mkdir()
        out = out_dir / "o.onnx"
        argv = ["opt", str(src), "-o", str(out), "-p", pipeline, "-q"]
        if verify:
            argv.append("--verify-each")
        err, stdout = io.StringIO(), io.StringIO()
        native = tempfile.TemporaryFile()  # what C++ code (onnx, onnxruntime) writes to fd 2
        saved_fd = os.dup(2)
        sys.stderr.flush()
        os.dup2(native.fileno(), 2)
        problems: list[str] = []
        use_alarm = hasattr(signal, "SIGALRM") and _main_thread()
        old = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
        start = time.perf_counter()
        try:
            if use_alarm:
                signal.alarm(CASE_TIME_LIMIT)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
                try:
                    code = main(argv)
                except SystemExit as exc:  # main must not exit by itself
                    code = exc.code if isinstance(exc.code, int) else 1
                    problems.append(f"main raised SystemExit({exc.code!r})")
        except _Hang:
            code = "hang"
            problems.append(f"no answer within {CASE_TIME_LIMIT}s")
        except BaseException as exc:  # anything escaping main is a bug
            code = "escaped"
            problems.append(f"{type(exc).__name__} escaped main: {exc}")
        finally:
            if use_alarm:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        seconds = time.perf_counter() - start
        native.seek(0)
        native_text = native.read().decode("utf-8", "replace")
        native.close()
        text = err.getvalue()
        ort_noise = False
        if native_text.strip():
            # onnxruntime's own error log lines are a known issue (see
            # test_bad_input.test_console_script_onnxruntime_failure_is_one_line);
            # anything else written straight to fd 2 is a problem.
            if "onnxruntime" in native_text and "Traceback" not in native_text:
                ort_noise = True
            else:
                problems.append(f"native output on stderr: {native_text.strip()[:300]}")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if "Traceback" in text:
            problems.append("traceback on stderr")
        if code == 1:
            problems.append("exit 1 (internal error)")
        elif code not in DOCUMENTED and not problems:
            problems.append(f"undocumented exit code {code}")
        if code != 0 and code != "hang":
            if len(lines) != 1 or not lines[0].startswith("graphopt: error: "):
                problems.append(f"expected one 'graphopt: error:' line, got {len(lines)} lines")
        left = sorted(p.name for p in out_dir.iterdir())
        if code == 0:
            extra = [n for n in left if n not in ("o.onnx", "o.onnx.data")]
            if extra:
                problems.append(f"temporary files left: {extra}")
            if "o.onnx" not in left:
                problems.append("exit 0 but no output file")
            else:
                problems.extend(_check_output(out))
        elif left:
            problems.append(f"failed run left files: {left}")
        if src.read_bytes() != data:
            problems.append("input file modified")
        return {
            "case": case,
            "argv": argv,
            "code": code,
            "line": lines[0] if lines else "",
            "stderr": text[-2000:],
            "problems": problems,
            "seconds": seconds,
            "ort_noise": ort_noise,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _check_output(out: Path) -> list[str]:
    """A successful run must write a model graphopt itself accepts."""
    from graphopt.errors import GraphoptError
    from graphopt.ir import load

    try:
        load(out)
    except GraphoptError as exc:
        return [f"output does not load back: {exc}"]
    except Exception as exc:
        return [f"output does not load back: {type(exc).__name__}: {exc}"]
    return []


def _worker_init() -> None:
    # Let the parent handle Ctrl-C; workers just die with the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import graphopt.cli  # noqa: F401  (import once, not inside the first case's time limit)
    from graphopt import registry

    registry.passes()


def _worker(case: tuple) -> dict:
    return run_case(case)


# ----------------------------------------------------------------------------------
# Case lists
# ----------------------------------------------------------------------------------
def default_pipeline_available() -> bool:
    from graphopt.api import DEFAULT_PIPELINE
    from graphopt.errors import UsageError
    from graphopt.pipeline import parse

    try:
        parse(DEFAULT_PIPELINE)
    except UsageError:
        return False
    return True


def make_cases(n: int, seed: int, models: list[Path], verify_share: float = 0.2, default_share: float = 0.3):
    """``n`` cases spread over models and mutation kinds (structural ones ~2/3)."""
    from graphopt.api import DEFAULT_PIPELINE

    rng = random.Random(seed)
    with_default = default_pipeline_available()
    cases = []
    for i in range(n):
        path = models[i % len(models)]
        kind = STRUCT_MUTATIONS[i % len(STRUCT_MUTATIONS)] if rng.random() < 0.66 else rng.choice(BYTE_MUTATIONS)
        pipeline = DEFAULT_PIPELINE if with_default and rng.random() < default_share else SIMPLE_PIPELINE
        verify = path.stem in VERIFY_MODELS and rng.random() < verify_share * len(models) / len(VERIFY_MODELS)
        cases.append((str(path), kind, seed * 100_003 + i, pipeline, verify))
    return cases


def summarize(results: list[dict]) -> str:
    codes = collections.Counter(str(r["code"]) for r in results)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r["case"][1]][str(r["code"])] += 1
    bad = [r for r in results if r["problems"]]
    slowest = max(results, key=lambda r: r["seconds"]) if results else None
    lines = [
        f"fuzz: {len(results)} mutants, exit codes: "
        + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())),
        f"fuzz: verify-each on {sum(1 for r in results if r['case'][4])}, "
        f"default pipeline on {sum(1 for r in results if r['case'][3] != SIMPLE_PIPELINE)}, "
        f"problems in {len(bad)}, onnxruntime log lines on stderr in {sum(1 for r in results if r.get('ort_noise'))}",
    ]
    if slowest:
        lines.append(f"fuzz: slowest case {slowest['seconds']:.2f}s {slowest['case'][1:]}")
    for kind in sorted(by_kind):
        lines.append(f"  {kind:<20}" + "  ".join(f"{c}:{n}" for c, n in sorted(by_kind[kind].items())))
    return "\n".join(lines)


def _report(request, text: str) -> None:
    """Print the summary past pytest's output capture (shown without -s)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover
        print(text)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in text.splitlines():
            reporter.write_line(line)


def _failures(results: list[dict]) -> str:
    out = []
    for r in [r for r in results if r["problems"]][:15]:
        model, kind, seed, pipeline, verify = r["case"]
        out.append(
            f"- {Path(model).stem} {kind} seed={seed} pipeline={pipeline} verify={verify}: "
            f"{'; '.join(r['problems'])}\n    exit {r['code']}: {r['stderr'].strip()[-600:]}"
        )
    return "\n".join(out)


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------
def _models(names=None) -> list[Path]:
    models = [p for p in LIGHT_MODELS if names is None or p.stem in names]
    if not models:
        pytest.skip("onnx light models not found")
    return models


def test_mutations_are_deterministic_and_mutate():
    path = str(_models(SMOKE_MODELS)[0])
    data, _ = _original(path)
    for kind in MUTATIONS:
        a = make_mutant(path, kind, 3)
        assert a == make_mutant(path, kind, 3), kind
        assert a != data, f"mutation {kind} changed nothing"


def test_fuzz_smoke(request, tmp_path):
    """~30 mutants in this process: every structural mutation once, plus byte noise."""
    models = _models(SMOKE_MODELS)
    cases = [
        (str(models[i % len(models)]), kind, i, SIMPLE_PIPELINE,
         i % 7 == 0 and models[i % len(models)].stem in VERIFY_MODELS)
        for i, kind in enumerate(STRUCT_MUTATIONS + ("truncate", "bitflip") * 3)
    ]
    if default_pipeline_available():
        from graphopt.api import DEFAULT_PIPELINE

        cases += [(str(models[i % len(models)]), "bitflip", 1000 + i, DEFAULT_PIPELINE, False) for i in range(3)]
    results = [run_case(c, str(tmp_path)) for c in cases]
    _report(request, summarize(results))
    bad = [r for r in results if r["problems"]]
    assert not bad, f"{len(bad)} of {len(results)} mutants broke graphopt:\n{_failures(results)}"
    # The smoke set must reach both the loader's checks and the passes.
    codes = collections.Counter(r["code"] for r in results)
    assert codes[3] > 0


@pytest.mark.slow
def test_fuzz_full(request, tmp_path):
    """1,000+ mutants of all light models in worker processes, each with a time limit."""
    n = int(os.environ.get("GRAPHOPT_FUZZ_CASES", "2000"))
    seed = int(os.environ.get("GRAPHOPT_FUZZ_SEED", "0"))
    cases = make_cases(n, seed, _models())
    workers = max(1, min(os.cpu_count() or 1, 8))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding onnxruntime threads
    results: list[dict] = []
    hung: list[tuple] = []
    start = time.perf_counter()
    with ctx.Pool(workers, initializer=_worker_init, maxtasksperchild=200) as pool:
        pending = {i: pool.apply_async(_worker, (c,)) for i, c in enumerate(cases)}
        for i, res in pending.items():
            # Cases finish roughly in order; a worker stuck in C code (where
            # SIGALRM cannot reach Python) shows up as a missing result here.
            try:
                results.append(res.get(timeout=CASE_TIME_LIMIT * 2 + 30))
            except multiprocessing.TimeoutError:
                hung.append(cases[i])
                results.append({"case": cases[i], "argv": [], "code": "hang", "line": "", "stderr": "",
                                "problems": ["worker did not answer (hang)"], "seconds": 0.0})
                pool.terminate()
                break
    elapsed = time.perf_counter() - start
    _report(request, summarize(results) + f"\nfuzz: {elapsed:.0f}s with {workers} workers")
    assert not hung, f"hung on {hung[0]}"
    assert len(results) == len(cases)
    bad = [r for r in results if r["problems"]]
    assert not bad, f"{len(bad)} of {len(results)} mutants broke graphopt:\n{_failures(results)}"
    assert len(results) >= 1000 or n < 1000
