"""Constant-folding conformance sweep over the onnx node test cases, as users run it.

Every case runs frozen (test inputs as initializers) and with its inputs left
as inputs; each tool reads the case from a file and writes its output file,
and fresh onnxruntime sessions on both files give the numbers (the harness is
``tests/conformance_cases.py``).  graphopt runs as ``graphopt opt IN -o OUT``
through the CLI's entry point; onnx-graphsurgeon's ``fold_constants()`` +
``cleanup()`` runs on the same files for comparison.

    python benchmarks/conformance.py [--limit N] [--filter REGEX] [--every N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conformance_cases as cc  # noqa: E402


def graphsurgeon(src: Path, dst: Path, pipeline: str) -> None:
    """onnx-graphsurgeon's folding and cleanup, file to file."""
    import onnx_graphsurgeon as gs

    proto = onnx.load(str(src))
    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    onnx.save(out, str(dst))


def print_table(summary: dict[str, Any], methods: Sequence[str], show_folded: bool = False) -> None:
    print(f"pipeline: {summary['pipeline']}")
    print(f"cases: {summary['total_cases']}, {summary['seconds']} s")
    header = f"{'variant':8} {'method':9} {'ORT ok':>7} {'correct':>8} {'%':>7} {'folded':>7} {'%':>7}"
    print(header)
    print("-" * len(header))
    for variant, v in summary["variants"].items():
        for method in methods:
            m = v[method]
            print(f"{variant:8} {method:9} {v['ref_ok']:7d} {m['correct']:8d} {m['correct_pct']:7.2f} "
                  f"{m['folded']:7d} {m['folded_pct']:7.2f}")
    for variant, v in summary["variants"].items():
        for method in methods:
            failing = v[method]["failing"]
            if failing:
                print(f"\n{variant}/{method}: {len(failing)} incorrect")
                for name, why in failing.items():
                    print(f"  {name}: {why}")
            if show_folded and variant == "frozen":
                nf = v[method]["not_folded"]
                print(f"\n{variant}/{method}: {len(nf)} not fully folded")
                for name, ops in nf.items():
                    print(f"  {name}: {','.join(ops)}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--filter", default=None, help="only cases whose name matches this regex")
    ap.add_argument("--every", type=int, default=1, help="take one case in N")
    ap.add_argument("--pipeline", default=cc.PIPELINE, help="graphopt pipeline (default: simplify)")
    ap.add_argument("--no-gs", action="store_true", help="skip the onnx-graphsurgeon comparison")
    ap.add_argument("--show-unfolded", action="store_true", help="list frozen cases not fully folded")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)
    optimizers = {"graphopt": cc.graphopt_cli} | ({} if args.no_gs else {"gs": graphsurgeon})
    cases = cc.collect_cases(args.filter, args.limit, args.every)
    summary = cc.sweep(cases, optimizers, args.pipeline, progress=True)
    print_table(summary, list(optimizers), show_folded=args.show_unfolded)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
