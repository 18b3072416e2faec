"""Decoder layers' outputs returned with the final-norm hidden states
(``EngineConfig.hidden_state_layers``; a DFlash drafter's trainer reads its ``target_layer_ids``
this way while the base model answers the graft prompts).

Forward hooks keep the named layers' outputs of the last main pass; a sequence that asks for
hidden states (``SamplingParams.return_hidden_states``) then gets rows
``[final-norm state | layer i0 output | layer i1 output | ...]`` ``[n, H * (1 + len(layers))]``.
The CPU decoder's one C call per decode step hides the layers' outputs, so it is turned off
while taps are set (CUDA graphs are already skipped for such requests).
"""

from __future__ import annotations

import torch


class LayerTaps:
    def __init__(self, model: torch.nn.Module, layer_ids: tuple[int, ...]) -> None:
        self.layer_ids = layer_ids
        self._out: dict[int, torch.Tensor] = {}
        layers = model.model.layers
        for i in layer_ids:
            layers[i].register_forward_hook(self._keeper(i))
        if getattr(model.model, "cpu_decoder", None) is not None:
            model.model.cpu_decoder = None

    def _keeper(self, i: int):
        def keep(module, args, out) -> None:
            self._out[i] = out
        return keep

    def widen(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[T, H]`` with the last pass's tapped layer outputs appended ``[T, H * (1 + n)]``."""
        return torch.cat([hidden] + [self._out[i].to(hidden.dtype) for i in self.layer_ids], dim=-1)
