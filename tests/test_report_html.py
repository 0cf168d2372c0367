"""The compress report page: every section present, every chart an embedded
image that decodes, nothing fetched from elsewhere, and (when Chromium is
installed: apt-get install -y chromium) it renders with no broken image."""
from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from graphopt import registry
from graphopt.cli import main
from graphopt.report_html import SECTIONS, render

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_resnet.onnx"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(f"{tag} {key}={a[key]}")


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tiny_resnet, objective size, with a pruned+quantized candidate (so the
    per-layer charts show changes) and a fidelity-budget one (sensitivity)."""
    tmp = tmp_path_factory.mktemp("report")
    cands = ['quantize-static{fidelity="cosine>=0.9999"}']
    if "prune-channels" in registry.passes():
        cands.append("prune-channels{ratio=0.25,reconstruct=false},quantize-static")
    argv = ["compress", str(EXAMPLE), "-o", str(tmp / "out.onnx"), "--calib", "random:16", "--report",
            str(tmp / "rep"), "--objective", "size", "-q", "--latency-rounds", "3"]
    for c in cands:
        argv += ["--candidate", c]
    assert main(argv) == 0
    return tmp / "rep", json.loads((tmp / "rep" / "report.json").read_text())


def test_sections_and_embedded_images(run):
    rep, report = run
    text = (rep / "report.html").read_text()
    page = _parse(text)
    assert [s for s in SECTIONS if s not in page.ids] == []
    assert page.external == []  # self-contained: no file or network reference
    # scatter + channels + MACs + sensitivity
    assert len(page.imgs) == 4
    for img in page.imgs:
        prefix = "data:image/svg+xml;base64,"
        assert img["src"].startswith(prefix), img["src"][:40]
        root = ET.fromstring(base64.b64decode(img["src"][len(prefix):], validate=True))
        assert root.tag.endswith("svg") and img.get("alt")
    assert report["chosen"]["pipeline"] in text
    for c in report["candidates"]:
        assert html.escape(c["pipeline"]) in text
    assert report["sensitivity"] and report["sensitivity_from"]


def test_pruned_layers_shown(run):
    _, report = run
    if "prune-channels" not in registry.passes():
        pytest.skip("prune-channels is not registered")
    assert report["chosen"]["candidate"].startswith("prune-channels")
    assert any(l["channels_after"] < l["channels_before"] for l in report["layers"])


def test_minimal_report_renders_every_section():
    """A run where nothing was measured (budget spent) still gives a whole page."""
    report = {"input": "m.onnx", "message": "no candidate met cosine>=0.99", "met": False,
              "options": {"fidelity": "cosine>=0.99", "objective": "latency"},
              "model": {"before": {"file_bytes": 10, "nodes": 1, "params": 0, "macs": 0}},
              "candidates": [{"index": 1, "pipeline": "quantize-dynamic", "status": "skipped",
                              "error": "budget spent"}],
              "chosen": {"pipeline": "simplify", "candidate": None}}
    page = _parse(render(report))
    assert [s for s in SECTIONS if s not in page.ids] == []
    assert page.imgs == []


def test_render_is_deterministic(run):
    _, report = run
    assert render(report) == render(json.loads(json.dumps(report)))


def test_report_command_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", str(bad), "-o", str(tmp_path / "out")]) == 2
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    assert main(["report", str(other), "-o", str(tmp_path / "out")]) == 2
    assert main(["report", str(tmp_path / "none.json"), "-o", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(ln.startswith("graphopt: error: ") for ln in lines)
    assert "not a readable JSON report" in lines[0] and "not a graphopt compress report" in lines[1]
    assert "no such file" in lines[2]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_renders_in_headless_chromium(run, tmp_path):
    rep, _ = run
    # A copy with a probe that counts images that failed to decode, read back from the DOM.
    probe = ("<script>window.addEventListener('load',()=>{const bad=[...document.images].filter("
             "i=>!i.complete||i.naturalWidth===0).length;document.body.setAttribute('data-broken',bad);"
             "document.body.setAttribute('data-images',document.images.length);});</script></body>")
    probed = tmp_path / "probed.html"
    probed.write_text((rep / "report.html").read_text().replace("</body>", probe))
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(common + ["--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-broken="0"' in dom.stdout, dom.stderr[-2000:]
    assert 'data-images="4"' in dom.stdout
    shot = Path(os.environ.get("GRAPHOPT_REPORT_SCREENSHOT", tmp_path / "report.png"))
    subprocess.run(common + [f"--screenshot={shot}", "--window-size=1400,3000", (rep / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
