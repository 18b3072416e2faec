"""A grafted MTP layer on disk, and how the engine finds and checks it.

A graft folder holds ``mtp.safetensors`` (the layer in DeepSeek-V3 naming,
``model.layers.{num_hidden_layers}.*``, plus ``draft_vocab``: token ids by frequency) and
``mtp_config.json`` (the layer's settings, the base model's fingerprint, how it was trained and
its held-out acceptance). A graft only fits the exact base weights it was trained on, so the
fingerprint is checked before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from dist_engine.config import SpeculativeConfig
from dist_engine.weights.loader import checkpoint_files

GRAFT_CONFIG = "mtp_config.json"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "mtp")
SETTINGS = ("concat_order", "hidden_stage", "feedback")


def base_fingerprint(model_path: str) -> str:
    """sha256 over the base checkpoint's files (safetensors or GGUF; names and bytes)."""
    h = hashlib.sha256()
    for file in checkpoint_files(model_path):
        h.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def read_graft(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, GRAFT_CONFIG)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not an MTP graft folder (no {GRAFT_CONFIG}); make one with "
                         "`dist-engine graft-mtp`")
    with open(path) as f:
        return json.load(f)


def read_graft_for(folder: str, model_path: str, fingerprint: str | None = None) -> dict[str, Any]:
    """A graft folder's settings, refused unless it was trained on ``model_path``'s exact
    weights (``fingerprint``: that model's, when the caller has it already). A graft may list
    ``equivalent_base_fingerprints``: other files holding the same weights (the default model's
    GGUF, served kept quantized, for a graft trained on its float32 conversion)."""
    meta = read_graft(folder)
    fp = fingerprint or base_fingerprint(model_path)
    if fp not in (meta.get("base_fingerprint"), *meta.get("equivalent_base_fingerprints", ())):
        raise ValueError(
            f"the MTP graft in {folder} was trained on a different base model "
            f"(fingerprint {str(meta.get('base_fingerprint'))[:12]}..., this one {fp[:12]}...); "
            "graft it again for these weights"
        )
    return meta


def check_drafter_base(folder: str, model_path: str) -> None:
    """A drafter folder whose config.json records ``base_fingerprint`` (``graft-dflash`` writes
    it; published drafters do not) is refused for other base weights, as a graft is."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        meta = json.load(f)
    if meta.get("base_fingerprint") is None:
        return
    fp = base_fingerprint(model_path)
    if fp not in (meta["base_fingerprint"], *meta.get("equivalent_base_fingerprints", ())):
        raise ValueError(f"the drafter in {folder} was trained on a different base model (fingerprint "
                         f"{meta['base_fingerprint'][:12]}..., this one {fp[:12]}...); train one for "
                         "these weights with `dist-engine graft-dflash`")


def shipped_graft(model_name: str) -> str | None:
    """The graft that ships with the package for a known model name (or its converted folder,
    named after it; the base fingerprint is checked on use anyway), if any."""
    folder = os.path.join(ASSETS, os.path.basename(os.path.normpath(model_name)))
    return folder if os.path.isfile(os.path.join(folder, GRAFT_CONFIG)) else None


def speculative_config(spec: dict[str, Any] | SpeculativeConfig, model_path: str,
                       model_name: str, has_native_mtp: bool) -> SpeculativeConfig:
    """Build the config from the user's dict: a graft folder's settings fill what the user left
    out; without a folder, the model's own MTP layers or the graft shipped for ``model_name``."""
    if isinstance(spec, SpeculativeConfig):
        return spec
    spec = dict(spec)
    folder = spec.get("model")
    if folder is None and not has_native_mtp:
        folder = shipped_graft(model_name)
        if folder is None:
            raise ValueError(f"{model_path} has no MTP layer and no graft ships for it: graft one "
                             "with `dist-engine graft-mtp` and pass speculative_config={'model': DIR}")
    if folder is not None:
        meta = read_graft_for(folder, model_path)
        for key in SETTINGS:
            spec.setdefault(key, meta[key])
        spec["model"] = folder
    return SpeculativeConfig(**spec)
