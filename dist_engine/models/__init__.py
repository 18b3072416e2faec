"""Architecture registry: config.json's ``architectures[0]`` -> model class."""

from __future__ import annotations

from torch import nn

from dist_engine.models.deepseek_v3 import DeepseekV3ForCausalLM
from dist_engine.models.deepseek_v4 import DeepseekV4ForCausalLM
from dist_engine.models.gemma4 import Gemma4ForCausalLM
from dist_engine.models.llama import LlamaForCausalLM
from dist_engine.models.qwen3_5 import Qwen3_5ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "Gemma4ForCausalLM": Gemma4ForCausalLM,
    "Gemma4ForConditionalGeneration": Gemma4ForCausalLM,
    "DeepseekV4ForCausalLM": DeepseekV4ForCausalLM,
    # Qwen3.5 / Qwen 3.6; the multimodal checkpoints' text part (the vision tower is not loaded)
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5MoeForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForCausalLM,
    "Qwen3_5MoeForConditionalGeneration": Qwen3_5ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
