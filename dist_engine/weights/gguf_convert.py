"""GGUF (llama.cpp) -> Hugging Face folder (``dist-engine convert --gguf``).

The same reader that serves GGUF files kept quantized (``quant/gguf.py``: HF names, Llama's
q/k rows back in HF's rotary order, stacked experts split) with every tensor dequantized to
float32; the tokenizer (with its chat template) is rebuilt by transformers from the metadata.
"""

from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from dist_engine.weights.gguf_meta import GGUF_LINK, gguf_config, save_tokenizer, write_config


def convert_gguf(gguf_file: str, out_dir: str, progress: bool = True) -> str:
    """Write config.json, model.safetensors and tokenizer files for ``gguf_file`` into ``out_dir``."""
    from gguf import GGUFReader

    from dist_engine.quant.gguf import iter_tensors
    from dist_engine.quant.lazy import QuantTensor

    config = gguf_config(GGUFReader(gguf_file))
    os.makedirs(out_dir, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:  # the reader's view: config + a link to the file
        write_config(config, tmp)
        os.symlink(os.path.abspath(gguf_file), os.path.join(tmp, GGUF_LINK))
        for name, t in tqdm(iter_tensors(tmp), desc="dequantizing GGUF", disable=not progress,
                            unit="tensor"):
            tensors[name] = (t[:].dequantize() if isinstance(t, QuantTensor) else t.float()).contiguous()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    write_config(config, out_dir)
    save_tokenizer(gguf_file, out_dir)
    return out_dir
