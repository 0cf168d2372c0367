"""Pipeline text, TOML configs, the registry and the pass manager."""
from __future__ import annotations

import json
import re
import textwrap
from types import SimpleNamespace

import numpy as np
import onnx.parser
import pytest
from onnx import helper

import graphopt
from graphopt import registry
from graphopt.errors import ExitCode, PassError, UsageError, VerificationError
from graphopt.instruments import DumpDir, PrintIRAfter, TimePasses, VerifyEach
from graphopt.ir import Model
from graphopt.manager import PassManager
from graphopt.pass_base import Option, Pass, PassResult, Tolerance
from graphopt.pipeline import Fixpoint, load_config, parse, to_toml

from conftest import make_model, vi


# -- test passes ----------------------------------------------------------------------
@graphopt.register_pass("test-count")
class CountDown(Pass):
    """Changes the model ``times`` times, then reports no change (drives fixpoints)."""

    times = Option(int, 2, "how many runs report a change", min=0)
    ratio = Option(float, 0.5, "a float option")
    mode = Option(str, "a", "a choice", choices=("a", "b"))
    names = Option(list, [], "a list option")
    flag = Option(bool, False, "a bool option")

    def run(self, model, ctx):
        left = ctx.scratch.setdefault(id(self), self.times)
        ctx.scratch[id(self)] = max(left - 1, 0)
        return PassResult(changed=left > 0, stats={"left": left})


@graphopt.register_pass("test-crash")
class Crash(Pass):
    """Raises a plain exception, as a buggy plug-in would."""

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


def tiny_model() -> Model:
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2, 3])], [vi("y", [2, 3])]
    )
    return Model.from_proto(proto)


# -- parsing --------------------------------------------------------------------------
def test_parse_options_and_canonical_text():
    p = parse('test-count{times=3,ratio=0.25,mode=b,names=[c1,c2],flag=true}, eliminate-dead-code')
    first = p.elements[0]
    assert isinstance(first, CountDown)
    assert (first.times, first.ratio, first.mode, first.names, first.flag) == (3, 0.25, "b", ["c1", "c2"], True)
    assert str(p) == 'test-count{times=3,ratio=0.25,mode=b,names="c1;c2",flag=true},eliminate-dead-code'
    # The canonical form parses back to the same pipeline.
    assert str(parse(str(p))) == str(p)


def test_parse_fixpoint_and_named_pipeline():
    p = parse("fixpoint{max-iterations=3}(test-count,eliminate-dead-code),simplify")
    assert isinstance(p.elements[0], Fixpoint) and p.elements[0].max_iterations == 3
    assert isinstance(p.elements[1], Fixpoint)  # simplify expands to its fixpoint
    names = [q.name for q in p.passes()]
    assert names[:2] == ["test-count", "eliminate-dead-code"]
    assert "fold-constants" in names


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("eliminate-dead-cod", "did you mean 'eliminate-dead-code'"),
        ("test-count{bogus=1}", "unknown option 'bogus'"),
        ("test-count{times=abc}", "option 'times' expects int, got 'abc'"),
        ("test-count{times=-1}", "option 'times' must be in"),
        ("test-count{mode=c}", "option 'mode' must be one of a|b"),
        ("test-count{ratio=nan}", "option 'ratio' expects float"),
        ("test-count{times=1,times=2}", "given twice"),
        ("test-count{times=1", "expected '}'"),
        ("fixpoint(test-count", "expected ')'"),
        ("fixpoint{max-iterations=0}(test-count)", "max-iterations"),
        ("fixpoint{max-iterations=abc}(test-count)", "max-iterations"),
        ("test-count(eliminate-dead-code)", "does not take a nested pipeline"),
        ("simplify{x=1}", "takes no options"),
        ("", "pipeline is empty"),
        ("test-count,,cse", "expected a pass name"),
    ],
)
def test_parse_errors_are_one_line_and_name_the_culprit(text, fragment):
    with pytest.raises(UsageError) as info:
        parse(text)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg


def test_named_pipeline_cycle_is_an_error():
    registry.register_pipeline("test-loop", "test-loop", "refers to itself")
    try:
        with pytest.raises(UsageError, match="refers to itself"):
            parse("test-loop")
    finally:
        registry._PIPELINES.pop("test-loop")


# -- TOML configs -----------------------------------------------------------------------
def test_toml_config_says_the_same_as_text(tmp_path):
    text = "fixpoint{max-iterations=4}(test-count{times=1},eliminate-dead-code),test-count{ratio=0.75,names=\"a;b\"}"
    cfg_file = tmp_path / "p.toml"
    cfg_file.write_text(to_toml(parse(text)) + "\n[run]\nverify-each = true\nseed = 3\n")
    cfg = load_config(cfg_file)
    assert str(cfg.pipeline) == str(parse(text))
    assert cfg.run == {"verify-each": True, "seed": 3}


def test_toml_config_with_tables_and_strings(tmp_path):
    cfg_file = tmp_path / "p.toml"
    cfg_file.write_text(
        textwrap.dedent(
            """
            [[pipeline]]
            pass = "test-count"
            times = 5
            [[pipeline]]
            fixpoint = ["eliminate-dead-code", {pass = "test-count", mode = "b"}]
            max-iterations = 2
            [[pipeline]]
            pass = "infer-shapes"
            """
        )
    )
    cfg = load_config(cfg_file)
    assert str(cfg.pipeline) == "test-count{times=5},fixpoint{max-iterations=2}(eliminate-dead-code,test-count{mode=b}),infer-shapes"


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("pipeline = [", "not a valid TOML"),
        ("pipelines = 'cse'", "unknown key 'pipelines'"),
        ("[run]\nspeed = 1", "unknown [run] option 'speed'"),
        ("[run]\nseed = 'x'", "option 'seed' expects int"),
        ("[[pipeline]]\nname = 'cse'", "needs a 'pass' or 'fixpoint' key"),
        ("[[pipeline]]\npass = 'test-count'\ntimes = 'many'", "option 'times' expects int"),
        ("pipeline = 3", "must be a string or an array"),
    ],
)
def test_toml_errors(tmp_path, body, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(UsageError) as info:
        load_config(f)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UsageError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


# -- registry -------------------------------------------------------------------------------
def test_every_builtin_pass_is_documented():
    passes = registry.passes()
    for name in ["fold-constants", "eliminate-dead-code", "cse", "eliminate-identity", "fuse-batchnorm",
                 "fuse-gemm", "infer-shapes"]:
        assert name in passes, name
    for name, cls in passes.items():
        assert cls.summary(), f"pass {name} has no docstring"
        for spec in cls.option_specs().values():
            assert spec.doc, f"{name}: option {spec.name} has no doc"


def test_entry_point_passes_are_discovered(monkeypatch):
    class Plugin(Pass):
        """A pass from another package."""

        name = "test-plugin-pass"

        def run(self, model, ctx):
            return PassResult(changed=False)

    ep = SimpleNamespace(name="test-plugin-pass", value="plugin:Plugin", load=lambda: Plugin)
    broken = SimpleNamespace(name="broken", value="nowhere:X", load=lambda: (_ for _ in ()).throw(ImportError("no module")))
    monkeypatch.setattr(registry, "_entry_points", lambda: [ep, broken])
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_plugin_errors", [])
    try:
        assert registry.get_pass("test-plugin-pass") is Plugin
        assert any("broken" in e for e in registry.plugin_errors())
    finally:
        registry._PASSES.pop("test-plugin-pass", None)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError):
        graphopt.register_pass("eliminate-dead-code")(type("Other", (Pass,), {"run": lambda self, m, c: PassResult(False)}))


# -- manager ----------------------------------------------------------------------------------
def test_fixpoint_stops_when_nothing_changes():
    model = tiny_model()
    result = PassManager(parse("fixpoint{max-iterations=10}(test-count{times=3})")).run(model)
    # three rounds report a change, the fourth does not and ends the loop
    assert [r.changed for r in result.records] == [True, True, True, False]
    assert [r.round for r in result.records] == [1, 2, 3, 4]


def test_fixpoint_respects_its_bound():
    result = PassManager(parse("fixpoint{max-iterations=2}(test-count{times=100})")).run(tiny_model())
    assert len(result.records) == 2


def test_records_carry_stats():
    result = PassManager(parse("test-count{times=1}")).run(tiny_model())
    rec = result.records[0].as_dict()
    assert rec["pass"] == "test-count" and rec["changed"] is True and rec["stats"] == {"left": 1}
    assert rec["before"]["nodes"] == 1 and rec["seconds"] >= 0
    json.dumps(rec)


def test_crashing_pass_becomes_pass_error():
    with pytest.raises(PassError, match=r"pass 'test-crash' failed: ZeroDivisionError: boom"):
        PassManager(parse("test-crash")).run(tiny_model())


def test_verify_each_catches_a_wrong_pass():
    model = tiny_model()
    with pytest.raises(VerificationError, match=r"pass 'test-negate': output 'y' moved: relative error"):
        PassManager(parse("test-negate"), [VerifyEach()]).run(model, graphopt.PassContext())


def test_verify_each_accepts_a_correct_pass_and_records_error():
    model = tiny_model()
    result = PassManager(parse("test-count{times=1}"), [VerifyEach()]).run(model)
    assert result.records[0].stats["verify"] == {"y": "relative error 0 (tolerance 0.0001)"}


def test_verify_each_with_given_inputs_and_tolerance():
    """On these inputs Relu gives zeros and Neg(0) == 0, so the broken pass is
    indistinguishable from a correct one: it passes only if the given inputs
    (not random ones) are fed, and the record shows the run's tolerance was used."""
    model = tiny_model()
    inputs = {"x": -np.ones((2, 3), np.float32)}
    result = PassManager(parse("test-negate"), [VerifyEach(inputs=inputs, tolerance=0.0)]).run(model)
    assert result.records[0].stats["verify"] == {"y": "relative error 0 (tolerance 0)"}


# float16 rounds the weight.  (A Relu alone would not move: onnxruntime drops
# the fp16 -> fp32 -> fp16 Casts around the float32 kernel it runs for it.)
MATMUL_TEXT = """
<ir_version: 8, opset_import: ["": 17]>
g (float[2,3] x) => (float[2,4] y)
<float[3,4] w = {0.1, -0.7, 1.3, 0.45, -1.1, 0.333, 0.9, -0.21, 0.77, 1.7, -0.05, 0.6}>
{
    y = MatMul(x, w)
}
"""


def test_verify_each_fails_beyond_the_given_tolerance():
    """The twin: convert-fp16 moves the outputs by float16 rounding, within its
    own 1e-2 bound but not within an absurdly tight run tolerance; the run must
    stop with VerificationError (the CLI's exit 4), naming the figure."""
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}

    def verified(tolerance: float | None):
        model = Model.from_proto(onnx.parser.parse_model(MATMUL_TEXT))
        return PassManager(parse("convert-fp16"), [VerifyEach(inputs=feeds, tolerance=tolerance)]).run(model)

    figure = verified(None).records[0].stats["verify"]["y"]
    assert re.fullmatch(r"relative error \S+ \(tolerance 0\.01\)", figure), figure
    assert 1e-6 < float(figure.split()[2]) < 1e-2  # it really moved, and only slightly
    with pytest.raises(VerificationError,
                       match=r"^pass 'convert-fp16': output 'y' moved: relative error \S+ \(tolerance 1e-06\)$") as info:
        verified(1e-6)
    assert info.value.exit_code == ExitCode.PASS_FAILED


def test_time_print_and_dump_instruments(tmp_path, capsys):
    import io

    table = io.StringIO()
    ir = io.StringIO()
    model = tiny_model()
    PassManager(
        parse("test-count{times=1},eliminate-dead-code"),
        [TimePasses(table), PrintIRAfter(["test-count"], ir), DumpDir(tmp_path / "dump")],
    ).run(model)
    assert "test-count" in table.getvalue() and "total" in table.getvalue()
    assert "IR after test-count{times=1}" in ir.getvalue() and "%y = Relu(%x)" in ir.getvalue()
    dumped = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumped == ["000-input.onnx", "001-test-count.onnx", "002-eliminate-dead-code.onnx"]


def test_tolerance_is_declared_per_pass():
    assert Tolerance().relative == 1e-4 and not Tolerance().lossy
    for cls in registry.passes().values():
        t = cls.tolerance
        # exact passes bound relative error; lossy ones may bound cosine instead
        assert (t.relative or 0) > 0 or (t.lossy and t.cosine is not None), cls.name


def test_lossy_tolerance_checks_cosine_and_ignores_the_relative_override():
    lossy = Tolerance(relative=None, cosine=0.9, lossy=True)
    ref = np.array([1.0, 2.0, 3.0])
    ok, figure = lossy.check(ref * 1.05, ref, relative=1e-6)
    assert ok and figure.startswith("cosine 1")
    ok, figure = lossy.check(-ref, ref)
    assert not ok and "cosine -1" in figure
    exact = Tolerance()
    assert not exact.check(ref * 1.05, ref)[0]
    assert exact.check(ref * 1.05, ref, relative=0.1)[0]


def test_explicit_options_tell_a_default_from_an_unset_option():
    p = next(parse("test-count{times=2}").passes())  # 2 is the default
    assert p.is_set("times") and not p.is_set("ratio") and p.explicit_options() == {"times": 2}
    p.explicit_options()["ratio"] = 9.0  # a copy: the pass is not changed through it
    assert not p.is_set("ratio") and p.ratio == 0.5
