"""XNNPACK's graph passes, run only where they can change something.

ExecuTorch's XNNPACK preprocessing (`XNNPACKPassManager.transform`) runs seventeen passes on
every delegated partition, and nearly every one of them ends by retracing the whole partition
through fake tensors (`ExportPass.call`), then `_transform` checks and validates the program
again. Most of them look for one operator or one pattern and rewrite it: batch norm (two
passes), 1-D convolution, PReLU, padding between quantize/dequantize pairs, the decomposed forms
of bilinear upsampling and of one attention form, a `_to_copy` that changes nothing, a `cat` of
more than five inputs, a ReLU after a linear, `max` with indices, metadata to copy onto
quantize/dequantize nodes. A transformer's partition has few or none of these; on a graph
without them such a pass rewrites nothing and its only effect is the retrace, which the next
pass repeats anyway.

`lean_xnnpack_passes` skips such a pass, decided on the graph as it stands when the pass's
turn comes (an earlier pass can create operators: batch-norm decomposition makes
convolutions). The rule is exact, not a guess:
- an operator pass is skipped when no node passes the test its `call` loop applies before
  rewriting (the same test, written here from ExecuTorch's sources);
- a pattern pass (`SubgraphMatcher`, which matches `call_function` nodes by target) is skipped
  when no pattern's operators are all in the graph, since a match needs every one of them.
The program that comes out is the same, byte for byte (tests/test_xnnpack_passes.py lowers
models both ways and compares the serialised programs). Measured in docs/export.md,
"Lowering time".
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import torch


# The rules below are the node tests of these passes as ExecuTorch 1.5.1 writes them (the
# version pyproject.toml pins); under any other version every pass runs.
RULES_FOR_EXECUTORCH = "1.5.1"


def rules_apply() -> bool:
    from importlib.metadata import version

    return version("executorch") == RULES_FOR_EXECUTORCH


def _calls(graph):
    return [n for n in graph.nodes if n.op == "call_function"]


@functools.lru_cache(maxsize=1)
def _operator_rules() -> dict:
    """Pass name -> whether its `call` finds something to rewrite in a graph: the node tests
    of its loop, read from ExecuTorch's sources (backends/xnnpack/_passes/*.py and
    backends/transforms/remove_getitem_op.py, the version pinned in pyproject.toml)."""
    from executorch.backends.xnnpack._passes.fuse_activation_pass import FuseActivationPass
    from executorch.backends.xnnpack.utils.quant_utils import is_dequant, is_quant
    from executorch.exir.dialects._ops import ops as exir_ops

    aten = exir_ops.edge.aten
    batch_norm = {aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default}

    def has(*targets):
        return lambda g: any(n.target in targets for n in _calls(g))

    def named(*names):
        return lambda g: any(getattr(n.target, "__name__", "") in names for n in _calls(g))

    def wide_cat(g):        # DecomposeConcatenate splits a cat of more than five inputs
        return any(getattr(n.target, "__name__", "") == "aten.cat.default" and len(n.args[0]) > 5
                   for n in _calls(g))

    def fusable_activation(g):   # an activation straight after an op that can absorb it
        return any(n.target in FuseActivationPass.FUSEABLE_ACTIVATIONS
                   and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "call_function"
                   and n.args[0].target in FuseActivationPass.FUSEABLE_OPS for n in _calls(g))

    def custom_meta_to_copy(g):  # a quantize/dequantize whose input carries "custom" metadata
        return any((is_quant(n) or is_dequant(n)) and isinstance(n.args[0], torch.fx.Node)
                   and "custom" in n.args[0].meta for n in _calls(g))

    return {
        "FuseBatchNormPass": has(*batch_norm),
        "DecomposeBatchNorm": has(*batch_norm),
        "Conv1dUnsqueezePass": named("aten.convolution.default"),
        "PReLUReshapePass": has(aten._prelu_kernel.default),
        "InsertPadQDQPass": has(aten.constant_pad_nd.default),
        "RemoveRedundantCopyPass": has(aten._to_copy.default),
        "RemoveGetItemPass": named("aten.max_pool2d_with_indices.default", "aten.max.dim"),
        "DecomposeConcatenate": wide_cat,
        "FuseActivationPass": fusable_activation,
        "PropagateCustomMetaPass": custom_meta_to_copy,
    }


def _pattern_passes() -> dict:
    """Pass name -> the function giving the pattern graphs it matches."""
    from executorch.backends.xnnpack.partition.graphs import bilinear_2d, sdpa

    return {"ConvertToUpsampleBilinear2d": bilinear_2d.get_graphs, "ConvertToSDPAPass": sdpa.get_graphs}


@functools.lru_cache(maxsize=None)
def _pattern_targets(name: str) -> tuple[frozenset, ...]:
    return tuple(frozenset(n.target for n in _calls(gm.graph)) for gm in _pattern_passes()[name]())


def needed(pass_name: str, graph) -> bool:
    """Whether the XNNPACK pass `pass_name` can change `graph` (a torch.fx.Graph). A pass this
    module has no rule for is always needed."""
    rules = _operator_rules()
    if pass_name in rules:
        return rules[pass_name](graph)
    if pass_name in _pattern_passes():
        present = {n.target for n in _calls(graph)}
        return any(t <= present for t in _pattern_targets(pass_name))
    return True


class PassLog:
    """What `lean_xnnpack_passes` ran and skipped, and the seconds the passes took."""

    def __init__(self, lean: bool):
        self.lean = lean          # whether passes were skipped at all
        self.ran: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.seconds = 0.0

    def to_dict(self) -> dict:
        return {"ran": dict(self.ran), "skipped": dict(self.skipped),
                "pass_seconds": round(self.seconds, 3), "lean": self.lean}


@contextlib.contextmanager
def lean_xnnpack_passes(enabled: bool | None = None):
    """While lowering to XNNPACK, skip the passes that cannot change the partition in hand.
    Yields a `PassLog`. `enabled=False` runs every pass (and still counts them): the reference
    the tests compare against. By default it is on unless the environment sets
    `PF_XNNPACK_ALL_PASSES=1` (ExecuTorch's own schedule), and off under an ExecuTorch other
    than the one its rules were read from."""
    if enabled is None:
        enabled = os.environ.get("PF_XNNPACK_ALL_PASSES", "") != "1" and rules_apply()
    from executorch.backends.xnnpack._passes import XNNPACKPassManager, XNNPACKPass
    from executorch.exir.pass_base import ExportPass
    from executorch.exir.program._program import _transform

    log = PassLog(lean=enabled)
    original = XNNPACKPassManager.transform

    def transform(self):
        ep = self.exported_program
        for pass_ in self.passes:
            name = pass_.__name__
            start = time.perf_counter()
            if enabled and not needed(name, ep.graph_module.graph):
                log.skipped[name] = log.skipped.get(name, 0) + 1
                continue
            # as XNNPACKPassManager.transform does
            if issubclass(pass_, XNNPACKPass):
                instance = pass_(ep)
            elif issubclass(pass_, ExportPass):
                instance = pass_()
            else:
                raise RuntimeError(f"expected an ExportPass, got {pass_!r}")
            ep = _transform(ep, instance)
            log.ran[name] = log.ran.get(name, 0) + 1
            log.seconds += time.perf_counter() - start
        return ep

    XNNPACKPassManager.transform = transform
    try:
        yield log
    finally:
        XNNPACKPassManager.transform = original
