"""Where a rank's routed experts live in the checkpoint, and reading one expert at a time.

The safetensors headers are parsed once (the format: an 8-byte little-endian header length, a
JSON header of ``name -> {dtype, shape, data_offsets}``, then the data), and every expert of a
paged layer becomes a dict of ``TensorRef`` by suffix: its checkpoint tensors under the names
its module loads (``gate_proj.weight``, ``down_proj.weight``, FP8's ``..._scale_inv``, whatever
a quantized format stores), each one contiguous byte range of one file. The source never looks
inside: it yields tensors, and the expert module's own ``load`` turns them into its weights, so
any format the resident layer reads pages the same way. Two layouts are indexed:

- one tensor per expert, ``{prefix}{e}.{suffix}`` (DeepSeek-V3, Qwen3-MoE checkpoints);
- fused 3-D tensors, ``{prefix}gate_up_proj`` ``[E, 2I, H]`` and ``{prefix}down_proj``
  ``[E, H, I]`` (Qwen3.5-MoE, transformers 5's own layout): expert e is the contiguous slice
  ``[e]``, gate its first half of rows and up its second, so one expert is read, never the tensor.

``FileReader`` reads with ``os.preadv`` into one reusable buffer (no mmap, so no mapping of the
checkpoint stays resident) without readahead (``POSIX_FADV_RANDOM``) and then drops the range
from the page cache (``posix_fadvise(DONTNEED)``), so a checkpoint larger than memory is not kept
there by the kernel either. ``HostReader`` (CUDA
hosts) reads every expert once into pinned host memory, the tier device loads copy from.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_engine.weights.loader import checkpoint_files

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "F8_E8M0": torch.float8_e8m0fnu, "I64": torch.int64,
             "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool}
# fused 3-D tensor -> the per-expert suffixes its rows split into (in order, equal parts)
FUSED = {"gate_up_proj": ("gate_proj.weight", "up_proj.weight"), "down_proj": ("down_proj.weight",),
         "gate_up_proj_scale_inv": ("gate_proj.weight_scale_inv", "up_proj.weight_scale_inv"),
         "down_proj_scale_inv": ("down_proj.weight_scale_inv",)}
ALIGN = 64  # bytes; each tensor of a read starts aligned in the buffer
PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class TensorRef:
    """One expert's checkpoint tensor: ``nbytes`` at ``offset`` of ``file``."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(file: str) -> tuple[dict, int]:
    """A safetensors file's header (``name -> {dtype, shape, data_offsets}``) and the file
    offset its data starts at."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _ref(file: str, base: int, meta: dict, name: str) -> TensorRef:
    if meta["dtype"] not in ST_DTYPES:
        raise ValueError(f"checkpoint tensor {name!r} has dtype {meta['dtype']}, which expert paging cannot read")
    begin, end = meta["data_offsets"]
    return TensorRef(file, base + begin, end - begin, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]))


def _fused_slices(ref: TensorRef, name: str, expert: int, parts: int) -> list[TensorRef]:
    """Expert ``expert``'s rows of a fused ``[E, rows, cols]`` tensor, split into ``parts``."""
    if len(ref.shape) != 3 or ref.shape[1] % parts:
        raise ValueError(f"fused expert tensor {name!r} has shape {ref.shape}; expected [experts, "
                         f"rows divisible by {parts}, cols]")
    E, rows, cols = ref.shape
    if expert >= E:
        raise ValueError(f"fused expert tensor {name!r} holds {E} experts, expert {expert} is missing")
    per = ref.nbytes // E // parts
    start = ref.offset + expert * (ref.nbytes // E)
    return [TensorRef(ref.file, start + i * per, per, ref.dtype, (rows // parts, cols)) for i in range(parts)]


class ExpertIndex:
    """Every paged expert's tensors: ``refs[(prefix, e)] = {suffix: TensorRef}``.

    ``layers``: checkpoint prefix (``model.layers.3.mlp.experts.``) -> this rank's expert range
    ``(first, count)``; ``rename`` maps a stored name to ours as the model's ``checkpoint_name``
    does for the loader (a multimodal Qwen3.5 checkpoint keeps its text model under
    ``model.language_model.``). Other ranks' experts under a prefix are ignored (they read them);
    anything else under a prefix that is neither layout is an error, as the loader treats an
    unconsumed tensor."""

    def __init__(self, path: str, layers: dict[str, tuple[int, int]],
                 rename: Callable[[str], str | None] | None = None) -> None:
        self.refs: dict[tuple[str, int], dict[str, TensorRef]] = {
            (p, e): {} for p, (first, n) in layers.items() for e in range(first, first + n)}
        pattern = re.compile("^(" + "|".join(re.escape(p) for p in layers) + r")(?:(\d+)\.(.+)|([a-z_]+))$")
        for file in checkpoint_files(path):
            header, base = read_header(file)
            for stored, meta in header.items():
                name = rename(stored) if rename is not None else stored  # our name, as the loader's
                m = pattern.match(name) if name is not None else None
                if m is None:
                    continue
                prefix, expert, suffix, fused = m.groups()
                if expert is not None:
                    if (prefix, int(expert)) in self.refs:
                        self.refs[prefix, int(expert)][suffix] = _ref(file, base, meta, name)
                    continue
                if fused not in FUSED:
                    raise ValueError(f"checkpoint tensor {name!r} is under the routed experts but is "
                                     f"neither one expert's tensor nor a fused {' / '.join(FUSED)}")
                whole = _ref(file, base, meta, name)
                first, n = layers[prefix]
                for e in range(first, first + n):
                    parts = _fused_slices(whole, name, e, len(FUSED[fused]))
                    self.refs[prefix, e].update(zip(FUSED[fused], parts))

    def check_complete(self, required: set[str], logical: Callable[[str], str] = lambda s: s) -> None:
        """Every expert has exactly the ``required`` suffixes (what its module loads), its
        stored names taken through ``logical`` (a quantized weight's parts -> ``.weight``)."""
        for (prefix, e), refs in self.refs.items():
            have = {logical(s) for s in refs}
            missing, extra = required - have, have - required
            if missing:
                raise ValueError(f"checkpoint is missing routed expert tensors {prefix}{e}.{sorted(missing)}")
            if extra:
                raise ValueError(f"checkpoint tensors {prefix}{e}.{sorted(extra)} match no parameter of "
                                 "the expert module")

    def expert_nbytes(self) -> int:
        """Bytes of the largest expert's tensors as stored (what one read moves)."""
        return max((sum(r.nbytes for r in refs.values()) for refs in self.refs.values()), default=0)


def drop_page_cache(files: list[str]) -> None:
    """Ask the kernel to drop ``files`` from the page cache: loading the other weights through
    mmap read ahead megabytes of the experts stored next to them."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class FileReader:
    """Reads one expert's tensors into a reusable buffer (pinned on CUDA hosts); the tensors it
    returns are views of that buffer, valid until the next read. One reader per loading thread."""

    def __init__(self, max_bytes: int, pin: bool, drop_page_cache: bool = True) -> None:
        cap = max_bytes + ALIGN * 8
        self.buffer = torch.empty(cap, dtype=torch.uint8, pin_memory=pin)
        self.view = memoryview(self.buffer.numpy())
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.fds: dict[str, int] = {}

    def read(self, refs: dict[str, TensorRef]) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for suffix, ref in refs.items():
            fd = self.fds.get(ref.file)
            if fd is None:
                fd = self.fds[ref.file] = os.open(ref.file, os.O_RDONLY)
                if self.drop_page_cache:  # no readahead: it would cache the experts next to this one
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            done = 0
            while done < ref.nbytes:  # preadv may return short counts
                n = os.preadv(fd, [self.view[pos + done:pos + ref.nbytes]], ref.offset + done)
                if n <= 0:
                    raise OSError(f"{ref.file}: short read at byte {ref.offset + done} (file truncated?)")
                done += n
            if self.drop_page_cache:  # whole pages: the kernel keeps a partly covered one
                start = ref.offset - ref.offset % PAGE
                os.posix_fadvise(fd, start, ref.offset + ref.nbytes - start, os.POSIX_FADV_DONTNEED)
            out[suffix] = self.buffer[pos:pos + ref.nbytes].view(ref.dtype).view(ref.shape)
            pos += _aligned(ref.nbytes)
        return out

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class HostReader:
    """Every expert of the index in pinned host memory (read once, page cache dropped): the host
    tier of a GPU host, where device loads are copies from pinned memory."""

    def __init__(self, index: ExpertIndex) -> None:
        reader = FileReader(index.expert_nbytes(), pin=False)
        self.experts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        try:
            for key, refs in index.refs.items():
                tensors = reader.read(refs)
                self.experts[key] = {s: torch.empty_like(t, pin_memory=True).copy_(t) for s, t in tensors.items()}
        finally:
            reader.close()

    def read_key(self, key: tuple[str, int]) -> dict[str, torch.Tensor]:
        return self.experts[key]
