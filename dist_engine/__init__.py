"""dist_engine: distributed LLM inference (tensor parallel on Ray, paged KV, gRPC)."""

from dist_engine.engine.async_llm import AsyncLLM
from dist_engine.engine.llm import LLM
from dist_engine.engine.outputs import CompletionOutput, RequestOutput
from dist_engine.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
