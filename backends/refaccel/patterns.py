"""What refaccel claims: Relax dataflow patterns plus checks on dtypes and shapes.

The checks are the contract with codegen.py: a match that passes them is
something the generated C handles exactly; anything else stays on the host."""
from __future__ import annotations

from typing import Any

from tvm.relax.dpl import is_op, wildcard

CLAIMS = ("conv2d(+bias)(+relu)", "matmul(+bias)(+relu)", "relu", "clip")


def _ty(expr) -> Any:
    return getattr(expr, "ty", None)


def _static_f32(expr) -> tuple[int, ...] | None:
    ty = _ty(expr)
    if ty is None or str(getattr(ty, "dtype", "")) != "float32" or getattr(ty, "shape", None) is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape)
    except (TypeError, ValueError):
        return None


def _bias_ok(bias, out_shape: tuple[int, ...], axis: int) -> bool:
    shape = _static_f32(bias)
    if shape is None or len(shape) > len(out_shape):
        return False
    want = [1] * len(out_shape)
    want[axis] = out_shape[axis]
    return list(shape) == want[len(out_shape) - len(shape):]


def _check_conv(ctx) -> bool:
    ann = ctx.annotated_expr
    root = ann["root"]
    attrs = root.attrs
    out = _static_f32(root)
    if out is None or _static_f32(ann["data"]) is None or _static_f32(ann["weight"]) is None:
        return False
    if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW" or \
            str(attrs.out_layout) != "NCHW" or str(attrs.out_dtype) not in ("", "None", "float32", "void"):
        return False
    return "bias" not in ann or _bias_ok(ann["bias"], out, 1)


def _check_matmul(ctx) -> bool:
    ann = ctx.annotated_expr
    out = _static_f32(ann["root"])
    x, w = _static_f32(ann["data"]), _static_f32(ann["weight"])
    if out is None or x is None or w is None or len(w) != 2 or len(x) < 2:
        return False
    return "bias" not in ann or _bias_ok(ann["bias"], out, len(out) - 1)


def _check_relu(ctx) -> bool:
    return _static_f32(ctx.annotated_expr["root"]) is not None


def _check_clip(ctx) -> bool:
    root = ctx.annotated_expr["root"]
    try:  # the bounds are baked into the generated code
        float(root.args[1].value), float(root.args[2].value)
    except (AttributeError, TypeError, ValueError):
        return False
    return _static_f32(root) is not None


def _kernel(op: str, bias: bool, relu: bool) -> tuple[Any, dict]:
    data, weight = wildcard(), wildcard()
    root = is_op(op)(data, weight)
    ann: dict[str, Any] = {"root": root, "data": data, "weight": weight}
    out = root
    if bias:
        b = wildcard()
        out = is_op("relax.add")(out, b)
        ann["bias"] = b
    if relu:
        out = is_op("relax.nn.relu")(out)
        ann["relu"] = out
    return out, ann


def patterns() -> list[tuple[str, Any, dict, Any]]:
    """(name, pattern, annotations, check), largest fusions first."""
    out = []
    for op, short, check in (("relax.nn.conv2d", "conv2d", _check_conv), ("relax.matmul", "matmul", _check_matmul)):
        for bias, relu in ((True, True), (True, False), (False, True), (False, False)):
            name = short + ("_bias" if bias else "") + ("_relu" if relu else "")
            pattern, ann = _kernel(op, bias, relu)
            out.append((name, pattern, ann, check))
    relu = is_op("relax.nn.relu")(wildcard())
    out.append(("relu", relu, {"root": relu}, _check_relu))
    clip = is_op("relax.clip")(wildcard(), wildcard(), wildcard())
    out.append(("clip", clip, {"root": clip}, _check_clip))
    return out
