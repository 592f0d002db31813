"""Find ops on the gradient path that ONNX Runtime 1.19 cannot differentiate, before
generate_artifacts fails with a C++ error. Reported by op, node and layer."""

from __future__ import annotations

import re

from ..errors import ExportError  # defined in errors.py (the one exit-code table)

# Ops seen without a gradient builder in onnxruntime-training 1.19.2.
NO_GRADIENT = {"CastLike", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "Loop", "If", "Scan", "Einsum", "CumSum"}


def gradient_path(model, trainable: list[str], loss: str = "loss") -> list:
    """Nodes downstream of a trainable initializer and upstream of the loss."""
    nodes = list(model.graph.node)
    live = set(trainable)
    forward = []
    for node in nodes:  # exported graphs are topologically sorted
        if any(i in live for i in node.input):
            live.update(node.output)
            forward.append(node)
    needed = {loss}
    path = []
    for node in reversed(forward):
        if any(o in needed for o in node.output):
            needed.update(node.input)
            path.append(node)
    return path[::-1]


def _where(node) -> str:
    name = node.name or node.output[0]
    layer = re.search(r"(layers?|layer)[./_](\d+)", name)
    return f"{node.op_type} at {name}" + (f" (layer {layer.group(2)})" if layer else "")


def preflight(model, trainable: list[str], blocked: set[str] = NO_GRADIENT) -> None:
    bad = [n for n in gradient_path(model, trainable) if n.op_type in blocked]
    if bad:
        listing = "; ".join(_where(n) for n in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ExportError(f"ONNX Runtime cannot compute gradients through: {listing}",
                          "these ops sit between the adapters and the loss; use another architecture, fewer --target-modules, "
                          "or report the model so edgeft can rewrite the op")


def explain_generation_error(error: Exception, model, trainable: list[str]) -> ExportError | None:
    """Map ORT's 'gradient builder has not been registered' into the same named report."""
    m = re.search(r"not been registered[:\s]+(\w+)", str(error))
    if not m:
        return None
    try:
        preflight(model, trainable, blocked={m.group(1)})
    except ExportError as e:
        return e
    return ExportError(f"ONNX Runtime has no gradient for op {m.group(1)}", "report the model so edgeft can rewrite the op")
