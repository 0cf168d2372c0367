"""Named TVM targets, and TVM target dicts given as JSON.

TVM 0.27 takes targets as dicts only ("llvm -mcpu=..." strings are refused),
and ``mcpu=native`` fails with the wheel's default triple, so the host preset
names the CPU and its disabled features explicitly.  Cross targets carry the linker
that makes the shared library: the GNU cross compiler when it is on PATH,
else ``zig cc`` from the ``ziglang`` wheel (``pip install 'graphopt[cross]'``),
so a machine set up from PyPI alone can cross-compile.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from graphopt.errors import UsageError, first_line


# arch -> (GNU cross compiler, its Debian package, zig's -target triple)
CROSS_CC = {
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu", "x86_64-linux-gnu"),
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "aarch64-linux-gnu"),
    "arm": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf", "arm-linux-gnueabihf"),
    "riscv64": ("riscv64-linux-gnu-gcc", "gcc-riscv64-linux-gnu", "riscv64-linux-gnu"),
}


@dataclasses.dataclass(frozen=True)
class Linker:
    """The command that links a cross target's objects into ``model.so``."""

    name: str  # for the manifest and messages: "aarch64-linux-gnu-gcc" or "zig cc -target aarch64-linux-gnu"
    argv: tuple[str, ...]  # the command; "-shared -fPIC -o OUT OBJECTS..." follows
    triple: str  # the GNU triple the library is for

    def fcompile(self) -> Callable[..., None]:
        """An ``export_library`` fcompile running this command (TVM's
        ``cross_compiler`` takes one executable; zig needs ``cc -target T``)."""

        def link(output: str, objects: list[str], options: list[str] | None = None) -> None:
            cmd = [*self.argv, "-shared", "-fPIC", "-o", output, *(options or []), *objects]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                raise RuntimeError(_link_error(proc.stdout, proc.returncode))

        link.output_format = "so"  # type: ignore[attr-defined]
        link.get_target_triple = lambda: self.triple  # type: ignore[attr-defined]
        return link


def _link_error(output: str, code: int) -> str:
    """The linker's first complaint, for a one-line error: lld and GNU ld put
    the reason first, then excerpts (">>>"), notes and a summary
    ("collect2: error: ld returned 1"); warnings may come before it."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    reasons = [ln for ln in lines if "warning" not in ln.lower() and not ln.startswith((">>>", "note:"))]
    return (reasons or lines or [f"exit status {code}"])[0]


def gnu_linker(arch: str) -> Linker | None:
    """The Debian/Ubuntu cross gcc for ``arch`` when it is on PATH (first
    choice: the toolchain a distribution ships for the device)."""
    gcc, _, triple = CROSS_CC[arch]
    path = shutil.which(gcc)
    return Linker(gcc, (path,), triple) if path else None


def zig_linker(arch: str) -> Linker | None:
    """``zig cc`` from the ziglang wheel when it is installed: a clang with
    glibc stubs for every triple, so no system toolchain is needed.  -O2:
    without it zig builds a debug compiler-rt and UBSan runtime for each triple
    (about 4x longer, the first time) and links that compiler-rt unoptimized,
    where gcc links an optimized libgcc."""
    if importlib.util.find_spec("ziglang") is None:
        return None
    triple = CROSS_CC[arch][2]
    argv = (sys.executable, "-m", "ziglang", "cc", "-target", triple, "-O2")
    return Linker(f"zig cc -target {triple}", argv, triple)


def find_linker(arch: str) -> Linker | None:
    """The GNU cross compiler if on PATH, else zig, else None."""
    return gnu_linker(arch) or zig_linker(arch)


def missing_linker(arch: str) -> str:
    """How to get a linker for ``arch``, for the one-line error."""
    gcc, package, _ = CROSS_CC[arch]
    return (f"no linker for {arch}: neither {gcc} nor zig is installed "
            f"(pip install 'graphopt[cross]', or Debian/Ubuntu: apt-get install {package})")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    name: str  # preset name, or "json"
    tvm: dict[str, Any]  # the TVM target dict
    device: str  # runtime device kind: cpu, cuda, vulkan, opencl, ...
    arch: str  # machine the library runs on: x86_64, aarch64, arm, riscv64
    linker: Linker | None = None  # links the .so of a cross target; None: TVM's default (the host's compiler)

    @property
    def cross(self) -> bool:
        """Built for another machine, so the host compiler cannot link it."""
        return self.arch != host_arch()

    @property
    def cc(self) -> str | None:
        return self.linker.name if self.linker else None

    def as_dict(self) -> dict[str, Any]:
        return {"tvm": self.tvm, "device": self.device, "arch": self.arch, "cc": self.cc}


_GPU_KINDS = {"cuda", "vulkan", "opencl", "rocm", "metal"}


def host_arch() -> str:
    return normalize_arch(platform.machine())


def usable_cores() -> int:
    """Physical cores this process may run on: the CPUs of its affinity mask,
    SMT siblings counted once.  TVM's own default halves the logical CPUs on
    x86 (it assumes two threads per core), which on a VM without SMT runs a
    2-core machine on one thread."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        try:
            import psutil

            return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
        except ImportError:
            return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:  # no sysfs topology (some containers): one core per CPU
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def normalize_arch(name: str) -> str:
    name = name.lower()
    if name in ("amd64", "x86_64", "x86-64"):
        return "x86_64"
    if name in ("arm64", "aarch64"):
        return "aarch64"
    if name.startswith("arm") or name.startswith("thumb"):
        return "arm"
    return name


@functools.cache
def host_llvm() -> dict[str, Any]:
    """The host CPU as a TVM llvm target: its name, and the features that CPU
    model implies but this machine lacks (a VM often masks some) turned off."""
    import tvm
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    arch = host_arch()
    triple = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(arch) or codegen.llvm_get_system_triple()
    target: dict[str, Any] = {"kind": "llvm", "mtriple": triple, "mcpu": cpu}
    try:
        host = dict(tvm.get_global_func("tvm.codegen.llvm.GetHostCPUFeatures")())
        implied = codegen.llvm_get_cpu_features(tvm.target.Target(target))
        off = sorted(f for f, on in host.items() if not bool(on) and f in implied)
    except Exception:  # no feature query in this build: the CPU name alone
        off = []
    if off:
        target["mattr"] = [f"-{f}" for f in off]
    return target


def _x86_64() -> TargetSpec:
    if host_arch() == "x86_64":
        return TargetSpec("x86_64", host_llvm(), "cpu", "x86_64")
    return TargetSpec("x86_64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v2"}, "cpu",
                      "x86_64", find_linker("x86_64"))


def _cross(name: str, arch: str, tvm_target: dict[str, Any]) -> Callable[[], TargetSpec]:
    def make() -> TargetSpec:
        if host_arch() == arch:
            return TargetSpec(name, tvm_target, "cpu", arch)
        return TargetSpec(name, tvm_target, "cpu", arch, find_linker(arch))

    return make


def _gpu(kind: str, extra: dict[str, Any] | None = None) -> Callable[[], TargetSpec]:
    def make() -> TargetSpec:
        target = {"kind": kind, **(extra or {})}
        if kind == "cuda":
            target["arch"] = _cuda_arch()
        return TargetSpec(kind, {**target, "host": host_llvm()}, kind, host_arch())

    return make


def _cuda_arch() -> str:
    """The local GPU's compute capability, else sm_80 (compiling without a GPU)."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:
        pass
    return "sm_80"


PRESETS: dict[str, tuple[str, Callable[[], TargetSpec]]] = {
    "x86_64": ("this machine's x86-64 CPU (its CPU model and features)", _x86_64),
    "aarch64": ("64-bit Arm Linux with NEON (linked by aarch64-linux-gnu-gcc, else zig cc)",
                _cross("aarch64", "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})),
    "aarch64-dotprod": ("64-bit Arm Linux, ARMv8.2-A with dot products (Cortex-A55/A76 and later, Neoverse N1): "
                        "int8 convolutions on sdot",
                        _cross("aarch64", "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                      "mattr": ["+neon", "+dotprod"]})),
    "armv7": ("32-bit Arm Linux, hard float, NEON (linked by arm-linux-gnueabihf-gcc, else zig cc)",
              _cross("armv7", "arm", {"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mcpu": "cortex-a7",
                                      "mattr": ["+neon", "+vfp4", "+thumb2"], "mfloat-abi": "hard"})),
    "riscv64": ("64-bit RISC-V Linux, RV64GC (linked by riscv64-linux-gnu-gcc, else zig cc)",
                _cross("riscv64", "riscv64", {"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mcpu": "generic-rv64",
                                              "mattr": ["+64bit", "+m", "+a", "+f", "+d", "+c"], "mabi": "lp64d"})),
    "cuda": ("NVIDIA GPU through CUDA (this machine's GPU, else sm_80); host code for this CPU", _gpu("cuda")),
    "vulkan": ("GPU through Vulkan (SPIR-V); host code for this CPU", _gpu("vulkan")),
    "opencl": ("GPU through OpenCL; host code for this CPU", _gpu("opencl")),
}


def describe() -> dict[str, str]:
    return {name: text for name, (text, _) in PRESETS.items()} | {
        "JSON": "any TVM target dict, e.g. '{\"kind\": \"llvm\", \"mcpu\": \"skylake\"}' (or a .json file)"
    }


def resolve(text: str) -> TargetSpec:
    """A preset name or a TVM target dict as JSON (inline or a .json file);
    anything else, or a target this TVM build cannot compile, is a UsageError."""
    if text in PRESETS:
        spec = PRESETS[text][1]()
    elif text.lstrip().startswith("{") or text.endswith(".json"):
        spec = _from_json(text)
    else:
        raise UsageError(f"--target '{text}': unknown target (presets: {', '.join(PRESETS)}; "
                         "or a TVM target dict as JSON)")
    _check_buildable(spec, text)
    return spec


def _from_json(text: str) -> TargetSpec:
    source = text
    if not text.lstrip().startswith("{"):
        try:
            source = Path(text).read_text()
        except OSError as exc:
            raise UsageError(f"--target {text}: cannot read ({exc.strerror or exc})") from None
    try:
        data = json.loads(source)
    except ValueError as exc:
        raise UsageError(f"--target: not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise UsageError("--target: a TVM target dict needs a \"kind\", e.g. {\"kind\": \"llvm\"}")
    try:
        import tvm

        target = tvm.target.Target(data)
    except Exception as exc:
        raise UsageError(f"--target: TVM refuses {json.dumps(data)}: {first_line(exc)}") from None
    if data["kind"] == "llvm" and data.get("mcpu"):
        _check_mcpu(target, str(data["mcpu"]))
    kind = data["kind"]
    if kind in _GPU_KINDS:
        data.setdefault("host", host_llvm())
        return TargetSpec("json", data, kind, host_arch())
    if kind not in ("llvm", "c"):
        raise UsageError(f"--target: kind '{kind}' is not supported (llvm, c, {', '.join(sorted(_GPU_KINDS))})")
    triple = str(data.get("mtriple") or "")
    arch = normalize_arch(triple.split("-")[0]) if triple else host_arch()
    if arch == host_arch():
        return TargetSpec("json", data, "cpu", arch)
    if arch not in CROSS_CC:
        raise UsageError(f"--target: no cross compiler known for mtriple '{triple}' "
                         f"(known: {', '.join(CROSS_CC)})")
    return TargetSpec("json", data, "cpu", arch, find_linker(arch))


def _check_mcpu(target: Any, mcpu: str) -> None:
    """LLVM only warns about an unknown CPU name and then emits generic code."""
    from tvm.target import codegen

    try:
        known = list(codegen.llvm_get_cpu_archlist(target))
    except Exception:  # no CPU list in this build: trust the name
        return
    if known and mcpu not in known:
        from graphopt.pass_base import _suggest

        raise UsageError(f"--target: LLVM does not know mcpu '{mcpu}' for this triple{_suggest(mcpu, known)}")


def _check_buildable(spec: TargetSpec, text: str) -> None:
    import tvm

    kind = spec.tvm["kind"]
    if kind != "c" and tvm.get_global_func(f"target.build.{kind}", allow_missing=True) is None:
        raise UsageError(f"--target {text}: this TVM build has no {kind} code generator "
                         f"(USE_{kind.upper()} is off)")
    if spec.cross and spec.linker is None:
        raise UsageError(f"--target {text}: {missing_linker(spec.arch)}")
