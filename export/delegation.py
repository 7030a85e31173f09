"""What runs in the XNNPACK delegate and what is left to ExecuTorch's portable kernels,
counted in operators and in FLOPs.

FLOPs are counted per node of the edge-dialect graph from the shapes recorded at export
(`node.meta["val"]`): matrix products (mm/addmm/bmm/linear/matmul/convolution/SDPA) count
2 x multiply-adds; element-wise ops and reductions count one per element they read or write;
data movement (views, copies, gathers, index, cat, embedding lookups) counts zero. Delegated
FLOPs are counted the same way inside each lowered partition's original graph, so the share
compares like with like. Ops that move data but do no arithmetic still show up in the operator
list, where the app team can see them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

_MATMUL = ("mm", "addmm", "bmm", "linear", "matmul", "baddbmm")
_ZERO = ("view", "reshape", "permute", "transpose", "expand", "slice", "select", "squeeze",
         "unsqueeze", "clone", "copy", "cat", "stack", "split", "index", "gather", "embedding",
         "arange", "full", "zeros", "ones", "scalar_tensor", "alias", "dim_order", "to_copy",
         "narrow", "repeat", "getitem", "sym_size", "_local_scalar_dense", "detach", "empty",
         "lift_fresh", "item", "constant_pad", "pad", "scatter", "flip", "roll", "masked_fill",
         "where", "tril", "triu")


def _short(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.replace("aten.", "").replace(".default", "").replace(".Tensor", "").replace(".Scalar", "")


def _dim(s) -> int:
    """A size without touching the shape environment: int() on a symbolic size would add a
    guard that specialises the dynamic dimension to the example's value (and ExecuTorch would
    then plan memory for that size only). Symbolic sizes count at their example value."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if hint is not None else 0


def _numel(val) -> int:
    if isinstance(val, torch.Tensor):
        return int(math.prod(_dim(s) for s in val.shape))
    if isinstance(val, (list, tuple)):
        return sum(_numel(v) for v in val)
    return 0


def _shape(node) -> list[int] | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if isinstance(val, torch.Tensor):
        return [_dim(s) for s in val.shape]
    return None


_REDUCE = ("mean", "sum", "amax", "amin", "var", "any", "all", "cumsum", "_softmax",
           "_log_softmax", "max", "min", "argmax", "norm")


def node_flops(node) -> int:
    if node.op != "call_function":
        return 0
    base = _short(node.target)
    head = base.split(".")[0]
    out = node.meta.get("val")
    if head in _MATMUL:
        a = node.args[1] if head in ("addmm", "baddbmm") else node.args[0]
        shape = _shape(a) if hasattr(a, "meta") else None
        return 2 * _numel(out) * shape[-1] if shape else 0
    if "convolution" in base:
        w = _shape(node.args[1]) if hasattr(node.args[1], "meta") else None
        return 2 * _numel(out) * int(math.prod(w[1:])) if w else 0
    if "scaled_dot_product" in base:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        return 4 * int(math.prod(q[:-1])) * k[-2] * q[-1] if q and k else 0
    if "call_delegate" in base or "quantize" in base or any(z in base for z in _ZERO):
        return 0
    if head in _REDUCE and node.args and hasattr(node.args[0], "meta"):
        return _numel(node.args[0].meta.get("val"))
    return _numel(out)


@dataclass
class DelegationReport:
    backend: str
    delegated_nodes: int
    portable_nodes: int
    delegated_flops: int
    portable_flops: int
    portable_ops: dict = field(default_factory=dict)   # op -> {"count", "flops"}
    partitions: int = 0

    @property
    def flops_share(self) -> float | None:
        total = self.delegated_flops + self.portable_flops
        return self.delegated_flops / total if total else None

    @property
    def node_share(self) -> float | None:
        total = self.delegated_nodes + self.portable_nodes
        return self.delegated_nodes / total if total else None

    def to_dict(self) -> dict:
        return {**asdict(self), "delegated_flops_share": _round(self.flops_share),
                "delegated_node_share": _round(self.node_share)}


def _round(x):
    return None if x is None else round(x, 6)


def _compute_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == "call_function" and _short(n.target) != "getitem"]


def delegation_report(graph_module, backend: str = "xnnpack") -> DelegationReport:
    """Walk a lowered edge graph (`edge.exported_program().graph_module`)."""
    report = DelegationReport(backend, 0, 0, 0, 0)
    for node in _compute_nodes(graph_module.graph):
        if "call_delegate" in _short(node.target):
            report.partitions += 1
            lowered = getattr(graph_module, node.args[0].target)
            # the private field, not the `original_module` property: that property rebuilds an
            # ExportedProgram, which resets the dynamic-shape bounds memory planning relies on
            original = getattr(lowered, "_original_exported_program", None) or lowered.original_module
            inner = original.graph_module
            for sub in _compute_nodes(inner.graph):
                report.delegated_nodes += 1
                report.delegated_flops += node_flops(sub)
            continue
        f = node_flops(node)
        report.portable_nodes += 1
        report.portable_flops += f
        op = _short(node.target)
        entry = report.portable_ops.setdefault(op, {"count": 0, "flops": 0})
        entry["count"] += 1
        entry["flops"] += f
    report.portable_ops = dict(sorted(report.portable_ops.items(), key=lambda kv: -kv[1]["flops"]))
    return report
