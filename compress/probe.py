"""Layer probes: run the model once recording every layer's input, then re-run only a suffix of
the stack from any recorded point. Scoring "the network without layer l" then costs the layers
after l, not a whole forward pass, for every criterion that needs it (ours and SLEB alike)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from pocketformer.models import LoadedModel, layer_hidden


@dataclass
class Trace:
    """One batch through the active layers: inputs[i] enters active layer i; `final` leaves the last."""
    batch: tuple[torch.Tensor, ...]
    active: list[int]
    inputs: list[torch.Tensor]
    final: torch.Tensor
    layer_args: tuple = ()
    layer_kwargs: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.inputs[0].shape[0] * self.inputs[0].shape[1])


class LayerProbe:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.layers = list(self.adapter.layers(loaded.model))
        self.module = self.adapter.export_module(loaded)
        self.layer_evals = 0   # layer forward passes x tokens, the cost unit reported

    @torch.inference_mode()
    def trace(self, batch: tuple[torch.Tensor, ...], active: Sequence[int]) -> Trace:
        active = list(active)
        inputs: list[torch.Tensor] = []
        call: dict = {}
        out: dict = {}

        def pre(mod, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])
            call["args"], call["kwargs"] = args[1:], dict(kwargs)

        def post(mod, args, kwargs, output):
            out["final"] = layer_hidden(output)

        handles = [self.layers[i].register_forward_pre_hook(pre, with_kwargs=True) for i in active]
        handles.append(self.layers[active[-1]].register_forward_hook(post, with_kwargs=True))
        try:
            with self.adapter.active_layers(self.loaded.model, active):
                self.module(*batch)
        finally:
            for h in handles:
                h.remove()
        t = Trace(batch, active, inputs, out["final"], call["args"], call["kwargs"])
        self.layer_evals += len(active) * t.tokens
        return t

    @torch.inference_mode()
    def run_from(self, trace: Trace, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Feed `hidden` into active layer `position` and return the last layer's output."""
        for i in trace.active[position:]:
            out = self.layers[i](hidden, *trace.layer_args, **trace.layer_kwargs)
            hidden = layer_hidden(out)
        self.layer_evals += (len(trace.active) - position) * trace.tokens
        return hidden

    def without(self, trace: Trace, position: int, count: int = 1) -> torch.Tensor:
        """The last layer's output with active layers [position, position + count) skipped."""
        start = position + count
        if start >= len(trace.active):
            return trace.inputs[position]
        return self.run_from(trace, trace.inputs[position], start)

    def features(self, trace: Trace, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.output_features(self.loaded, hidden, trace.batch)
