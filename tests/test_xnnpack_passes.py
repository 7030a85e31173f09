"""export/xnnpack_passes.py: XNNPACK passes skipped where they cannot change a partition, with
the lowered program the same, byte for byte, as ExecuTorch's full schedule gives."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pocketformer.export.quantize import quantize_for_executorch, xnnpack_int4_per_channel
from pocketformer.export.xnnpack_passes import lean_xnnpack_passes, needed


def _lower(module, inputs, *, lean: bool):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        ep = torch.export.export(module, inputs, strict=False)
        with xnnpack_int4_per_channel(), lean_xnnpack_passes(enabled=lean) as log:
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        return edge.to_executorch().buffer, log


class Block(nn.Module):
    """A pre-norm decoder block with a causal mask and a SiLU MLP, the ops of this project's
    models."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(nn.functional.silu(self.up(self.norm2(x))))


class Convs(nn.Module):
    """Operators the skipped passes look for: batch norm after a convolution, ReLU after a
    convolution, padding, bilinear upsampling and a cat of six inputs. (PReLU and max pooling
    reach XNNPACK's partition in other forms, a `where` and `max_pool2d`, so their passes stay
    skipped here too, and the bytes still match.)"""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.prelu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8)
        self.bn.eval()
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = nn.functional.max_pool2d(nn.functional.pad(y, (1, 1, 1, 1)), 2)
        y = self.prelu(nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False))
        return torch.cat([y * (i + 1) for i in range(6)], dim=1)


class Conv1d(nn.Module):
    """A 1-D convolution (XNNPACK runs it as a 2-D one, after Conv1dUnsqueezePass)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_a_transformer_block_skips_passes_and_lowers_to_the_same_bytes():
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 16, 64)
    lean, log = _lower(block, (x,), lean=True)
    full, full_log = _lower(block, (x,), lean=False)
    assert lean == full
    # the reference ran ExecuTorch's seventeen passes on every partition
    assert not full_log.skipped and len(full_log.ran) == 17 and len(set(full_log.ran.values())) == 1
    partitions = next(iter(full_log.ran.values()))
    assert all(log.ran.get(n, 0) + log.skipped.get(n, 0) == partitions for n in full_log.ran)
    # what a transformer lacks is skipped; what it has runs
    for name in ("FuseBatchNormPass", "DecomposeBatchNorm", "Conv1dUnsqueezePass", "PReLUReshapePass",
                 "ConvertToUpsampleBilinear2d", "InsertPadQDQPass", "RemoveGetItemPass"):
        assert name in log.skipped and name not in log.ran, (name, log.to_dict())
    for name in ("ConvertToLinearPass", "ConstPropPass", "ChannelsLastTaggedReshapePass"):
        assert name in log.ran


def test_an_8da4w_block_lowers_to_the_same_bytes():
    torch.manual_seed(1)
    block, _ = quantize_for_executorch(Block().eval(), "8da4w", group_size=32)
    x = torch.randn(1, 8, 64)
    lean, log = _lower(block, (x,), lean=True)
    full, _ = _lower(block, (x,), lean=False)
    assert lean == full and log.skipped


@pytest.mark.parametrize("model, shape, passes", [
    (Convs, (1, 3, 8, 8), ("FuseBatchNormPass", "FuseActivationPass", "InsertPadQDQPass",
                           "ConvertToUpsampleBilinear2d", "DecomposeConcatenate")),
    (Conv1d, (1, 8, 16), ("Conv1dUnsqueezePass",)),
])
def test_a_graph_with_their_operators_runs_those_passes_and_lowers_to_the_same_bytes(model, shape, passes):
    torch.manual_seed(2)
    module = model().eval()
    x = torch.randn(*shape)
    lean, log = _lower(module, (x,), lean=True)
    full, _ = _lower(module, (x,), lean=False)
    assert lean == full
    for name in passes:
        assert name in log.ran, (name, log.to_dict())


@pytest.mark.parametrize("op, pass_name", [
    ("relu_after_add", "FuseActivationPass"),
    ("cat6", "DecomposeConcatenate"),
])
def test_needed_reads_the_condition_not_just_the_operator(op, pass_name):
    """A ReLU that follows an add can be fused, one that follows a sum cannot; a cat is split
    only above five inputs."""
    from executorch.exir import to_edge

    class Yes(nn.Module):
        def forward(self, x, y):
            return torch.relu(x + y) if op == "relu_after_add" else torch.cat([x] * 6)

    class No(nn.Module):
        def forward(self, x, y):
            return torch.relu(x.sum(0)) if op == "relu_after_add" else torch.cat([x] * 5)

    args = (torch.randn(4, 8), torch.randn(4, 8))
    graphs = [to_edge(torch.export.export(m(), args)).exported_program().graph for m in (Yes, No)]
    assert needed(pass_name, graphs[0]) and not needed(pass_name, graphs[1])
    assert needed("NoSuchPass", graphs[1])     # a pass without a rule always runs


def test_every_pass_runs_when_asked_or_under_another_executorch(monkeypatch):
    from pocketformer.export import xnnpack_passes

    assert xnnpack_passes.rules_apply()            # the pinned ExecuTorch: rules in force
    with lean_xnnpack_passes() as log:
        assert log.lean
    monkeypatch.setenv("PF_XNNPACK_ALL_PASSES", "1")
    with lean_xnnpack_passes() as log:
        assert not log.lean
    monkeypatch.delenv("PF_XNNPACK_ALL_PASSES")
    monkeypatch.setattr(xnnpack_passes, "RULES_FOR_EXECUTORCH", "0.0.0")
    with lean_xnnpack_passes() as log:
        assert not log.lean
