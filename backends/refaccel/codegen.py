"""refaccel's codegen: claimed Relax functions -> C source -> TVM C source module.

``relax.ext.refaccel`` (registered by byoc.Accelerator.register) receives the
functions MergeCompositeFunctions built, each calling one or more composite
functions (patterns.py).  For each it writes one C function with TVM's FFI
calling convention, exported as ``__tvm_ffi_<global_symbol>``: arguments are
the inputs then the output tensors (destination-passing style, as
``call_dps_packed`` passes them).  Shapes and attributes are known here, so
they are baked into the code as constants; intermediate results between two
composites live in scratch buffers.  The module is a ``"c"`` source module:
TVM compiles and links it into the library with the host C compiler when the
executable is exported or jitted, next to the host code.
"""
from __future__ import annotations

import tvm
from tvm import relax

_PRELUDE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <tvm/ffi/c_api.h>

#ifdef __cplusplus
#define RA_EXTERN extern "C"
#else
#define RA_EXTERN
#endif

/* A tensor argument: a DLTensor pointer or a TVM Tensor object. */
static float* ra_data(const TVMFFIAny* a) {
  DLTensor* t = 0;
  if (a->type_index == kTVMFFIDLTensorPtr) t = (DLTensor*)a->v_ptr;
  else if (a->type_index == kTVMFFITensor) t = (DLTensor*)((char*)a->v_obj + sizeof(TVMFFIObject));
  if (t == 0 || t->dtype.code != kDLFloat || t->dtype.bits != 32) return 0;
  return (float*)((char*)t->data + t->byte_offset);
}

static void ra_conv2d(const float* x, const float* w, const float* b, float* y, int relu,
                      int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW,
                      int sh, int sw, int pt, int pl, int dh, int dw, int groups) {
  int cg = C / groups, og = O / groups;
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < O; ++o) {
      int g = o / og;
      for (int oh = 0; oh < OH; ++oh)
        for (int ow = 0; ow < OW; ++ow) {
          float acc = b ? b[o] : 0.0f;
          for (int c = 0; c < cg; ++c)
            for (int kh = 0; kh < KH; ++kh) {
              int ih = oh * sh - pt + kh * dh;
              if (ih < 0 || ih >= H) continue;
              for (int kw = 0; kw < KW; ++kw) {
                int iw = ow * sw - pl + kw * dw;
                if (iw < 0 || iw >= W) continue;
                acc += x[((long)(n * C + g * cg + c) * H + ih) * W + iw] *
                       w[((long)(o * cg + c) * KH + kh) * KW + kw];
              }
            }
          y[((long)(n * O + o) * OH + oh) * OW + ow] = (relu && acc < 0.0f) ? 0.0f : acc;
        }
    }
}

static void ra_matmul(const float* x, const float* w, const float* b, float* y, int relu,
                      long M, int K, int N) {
  for (long m = 0; m < M; ++m)
    for (int j = 0; j < N; ++j) {
      float acc = b ? b[j] : 0.0f;
      for (int k = 0; k < K; ++k) acc += x[m * K + k] * w[(long)k * N + j];
      y[m * N + j] = (relu && acc < 0.0f) ? 0.0f : acc;
    }
}

static void ra_clip(const float* x, float* y, long n, float lo, float hi) {
  for (long i = 0; i < n; ++i) y[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
}
"""


class CodegenError(ValueError):
    """A claimed function the C emitter cannot express (patterns.py let it through)."""


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def _numel(expr) -> int:
    n = 1
    for d in _shape(expr):
        n *= d
    return n


def _op_name(expr) -> str | None:
    return getattr(getattr(expr, "op", None), "name", None) if isinstance(expr, relax.Call) else None


def _bindings(func: relax.Function):
    body = func.body
    for block in body.blocks:
        yield from block.bindings


def _step(comp: relax.Function, args: list[str], out: str, out_expr) -> str:
    """One C call for one composite function."""
    kind = str(comp.attrs["Composite"]).split(".", 1)[1]
    params = {p: a for p, a in zip(comp.params, args)}
    calls = {}
    for binding in _bindings(comp):
        name = _op_name(binding.value)
        if name is not None:
            calls[name] = binding.value

    def arg(expr) -> str:
        if expr in params:
            return params[expr]
        raise CodegenError(f"composite {kind}: operand is not a parameter")

    relu = 1 if "relax.nn.relu" in calls else 0
    bias = arg(calls["relax.add"].args[1]) if "relax.add" in calls else "0"
    if kind.startswith("conv2d"):
        conv = calls["relax.nn.conv2d"]
        a = conv.attrs
        n, c, h, w = _shape(conv.args[0])
        o, _, kh, kw = _shape(conv.args[1])
        _, _, oh, ow = _shape(conv)
        pt, pl = int(a.padding[0]), int(a.padding[1])
        return (f"  ra_conv2d({arg(conv.args[0])}, {arg(conv.args[1])}, {bias}, {out}, {relu}, "
                f"{n}, {c}, {h}, {w}, {o}, {kh}, {kw}, {oh}, {ow}, {int(a.strides[0])}, {int(a.strides[1])}, "
                f"{pt}, {pl}, {int(a.dilation[0])}, {int(a.dilation[1])}, {int(a.groups)});")
    if kind.startswith("matmul"):
        mm = calls["relax.matmul"]
        k, nn = _shape(mm.args[1])
        m = _numel(mm.args[0]) // k
        return f"  ra_matmul({arg(mm.args[0])}, {arg(mm.args[1])}, {bias}, {out}, {relu}, {m}L, {k}, {nn});"
    if kind == "relu":
        x = calls["relax.nn.relu"].args[0]
        return f"  ra_clip({arg(x)}, {out}, {_numel(x)}L, 0.0f, INFINITY);"
    if kind == "clip":
        cl = calls["relax.clip"]
        lo, hi = float(cl.args[1].value), float(cl.args[2].value)
        return f"  ra_clip({arg(cl.args[0])}, {out}, {_numel(cl.args[0])}L, {_c_float(lo)}, {_c_float(hi)});"
    raise CodegenError(f"unknown composite {kind}")


def _c_float(v: float) -> str:
    if v == float("inf"):
        return "INFINITY"
    if v == float("-inf"):
        return "-INFINITY"
    return f"{float(v)!r}f".replace("inff", "INFINITY")


def emit_function(func: relax.Function) -> tuple[str, str]:
    """(symbol, C source) for one merged function."""
    symbol = str(func.attrs["global_symbol"])
    names: dict = {}
    lines: list[str] = []
    nin = len(func.params)
    for i, p in enumerate(func.params):
        names[p] = f"a{i}"
        lines.append(f"  float* a{i} = ra_data(&args[{i}]);")
    result = func.body.body
    outs = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    for j, o in enumerate(outs):
        names[o] = f"r{j}"
        lines.append(f"  float* r{j} = ra_data(&args[{nin + j}]);")
    nargs = nin + len(outs)
    checks = " || ".join([f"!a{i}" for i in range(nin)] + [f"!r{j}" for j in range(len(outs))])
    lines.append(f"  if ({checks}) {{ TVMFFIErrorSetRaisedFromCStr(\"TypeError\", "
                 f"\"{symbol}: expects float32 tensors\"); return -1; }}")
    local: dict = {}
    scratch: list[str] = []
    for binding in _bindings(func):
        value, var = binding.value, binding.var
        if isinstance(value, relax.Function):
            local[var] = value
            continue
        if isinstance(value, relax.Call) and value.op in local:
            comp = local[value.op]
        elif isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
            raise CodegenError(f"{symbol}: call to a global function inside a claimed region")
        else:
            raise CodegenError(f"{symbol}: unexpected binding {type(value).__name__}")
        if var not in names:
            names[var] = f"t{len(scratch)}"
            scratch.append(names[var])
            lines.append(f"  float* {names[var]} = (float*)malloc(sizeof(float) * {_numel(var)}L);")
        lines.append(_step(comp, [names[a] for a in value.args], names[var], var))
    for t in scratch:
        lines.append(f"  free({t});")
    lines.append("  return 0;")
    head = (f"RA_EXTERN TVM_FFI_DLL_EXPORT int __tvm_ffi_{symbol}(void* self, const TVMFFIAny* args, "
            f"int32_t num_args, TVMFFIAny* result) {{\n"
            f"  if (num_args != {nargs}) {{ TVMFFIErrorSetRaisedFromCStr(\"ValueError\", "
            f"\"{symbol}: expects {nargs} tensors\"); return -1; }}\n")
    return symbol, head + "\n".join(lines) + "\n}\n"


def generate(functions) -> tuple[str, list[str]]:
    """C source and exported symbols for the claimed functions."""
    parts, symbols = [_PRELUDE], []
    for func in functions:
        symbol, src = emit_function(func)
        symbols.append(symbol)
        parts.append(src)
    return "\n".join(parts), symbols


def codegen(functions, options=None, constant_names=None) -> list:
    """``relax.ext.refaccel``: one C source module for all claimed functions."""
    if not functions:
        return []
    source, symbols = generate(functions)
    create = tvm.get_global_func("runtime.CSourceModuleCreate")
    return [create(source, "c", symbols, [])]
