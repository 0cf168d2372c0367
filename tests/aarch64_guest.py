"""aarch64 TVM artifacts run under qemu-user: the arm64 userland they run in,
and running them (a Python script in the guest, or a TVM RPC server there).

benchmarks/arm_qemu.py compiles models and checks them against onnxruntime
with this; tests/test_arm_qemu.py uses it too.  It lives in tests/ so that it
exists once and tests import nothing from benchmarks/ (benchmarks put tests/
on ``sys.path``).

The artifact's ``model.so`` is loaded by the aarch64 build of the host's TVM
version inside an arm64 Debian userland, run by ``qemu-aarch64`` (user-mode
emulation: no binfmt_misc registration and no chroot needed, ``-L ROOT``
points the guest loader at the arm64 root).

Set-up, done once and reused (under :func:`download_cache.cache_dir`,
``$GRAPHOPT_BENCH_CACHE``, default ``~/.cache/graphopt-bench``, outside the
repository; ``python benchmarks/arm_qemu.py --setup-only`` does it):

1. ``qemu-aarch64`` (Debian: qemu-user) and ``debootstrap``; installed with
   apt-get when missing and this process may (root, apt-get present);
2. ``arm64-root``: ``debootstrap --arch=arm64 --foreign --variant=minbase
   --include=python3 bookworm``; the downloaded .debs are unpacked with
   ``dpkg-deb -x`` instead of the emulated second stage (Python needs no
   maintainer scripts, and this takes seconds instead of many minutes);
3. aarch64 wheels of the host's exact apache-tvm and apache-tvm-ffi versions
   and their dependencies (``pip download --platform manylinux_2_28_aarch64``)
   unpacked into ``arm64-root/opt/site``.  The guest imports TVM with
   ``TVM_USE_RUNTIME_LIB=1``: only ``libtvm_runtime.so`` is loaded, as on a
   device that only runs artifacts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

from download_cache import cache_dir

SUITE = "bookworm"
MIRROR = os.environ.get("GRAPHOPT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
GUEST_PYTHON = "usr/bin/python3.11"  # bookworm's Python; the wheels below are for cp311
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                   "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
RPC_DEPS = ["cloudpickle", "psutil"]  # imported by tvm.rpc's server side, not wheel dependencies of apache-tvm

# Runs inside the arm64 root: load the library with the TVM runtime alone,
# feed the inputs in manifest order, write the outputs and the run times.
GUEST_SCRIPT = '''\
import json, platform, sys, time
import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

lib_path, in_path, out_path, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dev = tvm.cpu(0)
vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
feed = np.load(in_path)
names = json.loads(str(feed["__order__"]))
args = [tvm.runtime.tensor(feed[n], dev) for n in names]
times = []
for i in range(runs + 1):  # the first run is a warm-up
    t0 = time.perf_counter()
    result = vm["main"](*args)
    if i:
        times.append(time.perf_counter() - t0)
values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
np.savez(out_path, *[v.numpy() for v in values])
print(json.dumps({"machine": platform.machine(), "tvm": tvm.__version__, "runtime_only": tvm.base._RUNTIME_ONLY,
                  "seconds": times}))
'''


# The TVM RPC server, started inside the arm64 root.  ``python -m
# tvm.exec.rpc_server`` runs its listener in a child started from
# ``sys.executable``, an aarch64 binary that only the qemu process itself can
# run without binfmt_misc; this runs the same listener in this process instead.
RPC_SERVER_SCRIPT = '''\
import platform, sys
from tvm.rpc import server

port = server._popen_start_rpc_server(sys.argv[1], int(sys.argv[2]), int(sys.argv[2]) + 100, silent=True)
print("RPC-READY", port, platform.machine(), flush=True)
'''


class SetupError(RuntimeError):
    """A set-up step that cannot be done here; the message says which and why."""


def cache_root() -> Path:
    return cache_dir() / "arm64-root"


def _may_apt() -> bool:
    return shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(packages: list[str]) -> None:
    if not _may_apt():
        raise SetupError(f"missing {', '.join(packages)} and cannot install them here "
                         f"(needs root and apt-get): apt-get install -y {' '.join(packages)}")
    print(f"setup: apt-get install -y {' '.join(packages)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", *packages], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", *packages], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["?"]
        raise SetupError(f"apt-get install {' '.join(packages)} failed: {tail[0]}")


def find_qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def ensure_tools() -> str:
    """qemu-aarch64's path; qemu-user and debootstrap installed when missing, and the
    GNU cross compiler only when no linker for aarch64 (zig from the ziglang wheel) is there."""
    from graphopt.backends.tvm.targets import find_linker

    missing = ["debootstrap"] if shutil.which("debootstrap") is None else []
    if find_linker("aarch64") is None:
        missing.append("gcc-aarch64-linux-gnu")
    if find_qemu() is None:
        missing.insert(0, "qemu-user")
    if missing:
        _apt_install(missing)
    qemu = find_qemu()
    if qemu is None:
        raise SetupError("qemu-aarch64 not found after installing qemu-user")
    return qemu


def host_versions() -> dict[str, str]:
    from importlib import metadata

    return {"apache-tvm": metadata.version("apache-tvm"), "apache-tvm-ffi": metadata.version("apache-tvm-ffi")}


def root_ready(root: Path | None = None) -> tuple[Path | None, str]:
    """(root, "") when an arm64 root with this host's TVM version is set up, else (None, why)."""
    root = root or cache_root()
    marker = root / ".graphopt-ready"
    if not marker.is_file():
        return None, f"no arm64 root at {root} (set it up: python benchmarks/arm_qemu.py --setup-only)"
    try:
        have = json.loads(marker.read_text())
    except ValueError:
        return None, f"{marker}: unreadable; delete {root} and set it up again"
    want = host_versions()
    if have.get("versions") != want:
        return None, (f"{root} holds TVM {have.get('versions')}, this host has {want}; "
                      "rerun python benchmarks/arm_qemu.py --setup-only")
    return root, ""


def ensure_root(qemu: str) -> Path:
    """The arm64 root with Python and the aarch64 TVM wheels (built once, atomically)."""
    root, _ = root_ready()
    if root is not None:
        return root
    root = cache_root()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if os.geteuid() != 0:
        raise SetupError("debootstrap needs root to build the arm64 userland")
    print(f"setup: debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 {SUITE} {tmp}",
          file=sys.stderr, flush=True)
    proc = subprocess.run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3",
                           SUITE, str(tmp), MIRROR], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()][-1:] or ["?"]
        raise SetupError(f"debootstrap failed (is {MIRROR} reachable?): {tail[0]}")
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    print(f"setup: unpacking {len(debs)} arm64 packages with dpkg-deb -x", file=sys.stderr, flush=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    for deb in debs:  # the .debs are no longer needed
        deb.unlink()
    _install_wheels(tmp)
    versions = host_versions()
    check = guest_python(qemu, tmp, ["-c", "import platform, tvm; print(platform.machine(), tvm.__version__)"])
    if check.returncode != 0 or "aarch64" not in check.stdout:
        raise SetupError(f"the arm64 Python under {qemu} cannot import TVM: "
                         f"{(check.stderr.strip().splitlines() or ['?'])[-1]}")
    (tmp / ".graphopt-ready").write_text(json.dumps({"versions": versions, "suite": SUITE,
                                                     "guest": check.stdout.strip()}) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.rename(tmp, root)
    return root


def _install_wheels(root: Path) -> None:
    versions = host_versions()
    # One folder per TVM version, so that only matching wheels are unpacked.
    wheels = cache_dir() / "arm64-wheels" / f"tvm-{versions['apache-tvm']}"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
           "--implementation", "cp", *sum((["--platform", p] for p in WHEEL_PLATFORMS), []), "-d", str(wheels),
           *(f"{name}=={v}" for name, v in versions.items()), *RPC_DEPS]
    print(f"setup: pip download aarch64 wheels: {' '.join(f'{n}=={v}' for n, v in versions.items())} (+ deps)",
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["?"]
        raise SetupError(f"pip download of the aarch64 wheels failed: {tail[0]}")
    site = root / "opt/site"
    site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)


def _guest_command(qemu: str, root: Path, args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root / "opt/site"), "PYTHONNOUSERSITE": "1",
           "TVM_USE_RUNTIME_LIB": "1", "HOME": str(root / "root"), "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    return [qemu, "-L", str(root), str(root / GUEST_PYTHON), *args], env


def guest_python(qemu: str, root: Path, args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the arm64 Python of ``root`` under qemu with a clean environment."""
    cmd, env = _guest_command(qemu, root, args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


class GuestRPCServer:
    """A TVM RPC server in the arm64 Python under qemu, on 127.0.0.1 (a context manager)."""

    def __init__(self, qemu: str, root: Path, port: int = 9190, start_timeout: float = 300):
        self._tmp = tempfile.TemporaryDirectory(prefix="arm-qemu-rpc-")
        script = Path(self._tmp.name) / "rpc_server.py"
        script.write_text(RPC_SERVER_SCRIPT)
        cmd, env = _guest_command(qemu, root, [str(script), "127.0.0.1", str(port)])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(start_timeout)
        if not ready or not ready[0].startswith("RPC-READY"):
            self.close()
            err = [ln for ln in (self.proc.stderr.read() or "").splitlines() if ln.strip()] if self.proc.stderr else []
            raise RuntimeError(f"the TVM RPC server under qemu did not start: {err[-1] if err else 'no output'}")
        self.port, self.machine = int(ready[0].split()[1]), ready[0].split()[2]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._tmp.cleanup()

    def __enter__(self) -> "GuestRPCServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_artifact_rpc(server: GuestRPCServer, artifact: Path, feed: dict[str, np.ndarray], runs: int = 1,
                     timeout: float = 1800) -> tuple[dict[str, np.ndarray], dict]:
    """As :func:`run_artifact`, through a TVM RPC session: upload, load, run on the remote CPU."""
    import tvm
    from tvm import relax, rpc

    manifest = json.loads((artifact / "manifest.json").read_text())
    session = rpc.connect("127.0.0.1", server.port, session_timeout=timeout)
    library = artifact / manifest["files"]["library"]
    session.upload(str(library), library.name)
    dev = session.cpu(0)
    vm = relax.VirtualMachine(session.load_module(library.name), dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(feed[spec["name"]]), dev) for spec in manifest["inputs"]]
    times = []
    for i in range(runs + 1):  # the first run is a warm-up
        t0 = time.perf_counter()
        result = vm["main"](*args)
        dev.sync()
        if i:
            times.append(time.perf_counter() - t0)
    values = [result] if isinstance(result, tvm.runtime.Tensor) else list(result)
    outputs = {spec["name"]: v.numpy() for spec, v in zip(manifest["outputs"], values)}
    # runtime_only: the server's environment has TVM_USE_RUNTIME_LIB=1 (see _guest_command)
    return outputs, {"machine": f"{server.machine} (RPC)", "tvm": tvm.__version__, "runtime_only": True,
                     "seconds": times}


def run_artifact(qemu: str, root: Path, artifact: Path, feed: dict[str, np.ndarray], runs: int = 1,
                 timeout: float = 1800) -> tuple[dict[str, np.ndarray], dict]:
    """Outputs (by manifest name) of an aarch64 artifact run under qemu, and the guest's report."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    if manifest.get("target", {}).get("arch") != "aarch64":
        raise ValueError(f"{artifact}: not an aarch64 artifact (target {manifest.get('target', {}).get('name')})")
    order = [spec["name"] for spec in manifest["inputs"]]
    with tempfile.TemporaryDirectory(prefix="arm-qemu-") as tmp:
        script, inp, out = Path(tmp) / "guest_run.py", Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        script.write_text(GUEST_SCRIPT)
        np.savez(inp, __order__=np.array(json.dumps(order)), **{n: np.ascontiguousarray(feed[n]) for n in order})
        library = artifact / manifest["files"]["library"]
        proc = guest_python(qemu, root, [str(script), str(library), str(inp), str(out), str(runs)], timeout)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise RuntimeError(f"guest run failed (exit {proc.returncode}): {lines[-1] if lines else '?'}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(out) as data:
            values = [data[f"arr_{i}"] for i in range(len(data.files))]
    names = [spec["name"] for spec in manifest["outputs"]]
    return dict(zip(names, values)), report


def compile_aarch64(model: Path, out: Path, flags: list[str], timeout: float, target: str = "aarch64") -> dict:
    """``graphopt compile --target aarch64`` (or another aarch64 ``target``) in
    its own process; one retry after a crash (signal)."""
    cmd = [sys.executable, "-m", "graphopt.cli", "compile", str(model), "--backend", "tvm", "--target", target,
           "-o", str(out), "-q", *flags]
    crashes = []
    for _ in range(2):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"compile timed out after {timeout:.0f} s"}
        if proc.returncode >= 0:
            break
        crashes.append(f"signal {-proc.returncode}")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        return {"error": f"compile exit {proc.returncode}: {lines[-1] if lines else ''}"[:300]}
    return {"compile_s": round(time.perf_counter() - t0, 1), "compile_crashes": crashes}
