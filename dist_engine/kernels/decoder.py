"""Python side of ``decoder.c``: a Llama-family model's layers run in one C call on CPU.

``CPUDecoder.attach(model)`` checks once that every layer is the plain form the C driver runs
(one rank, no MoE, no q/k norm, no o_proj bias, products in the C kernels' layouts) and builds
the per-layer descriptors (``attach_block``: the same for an MTP layer's block alone); ``forward`` then takes a step's residual stream through all layers
when the step fits (decode and verification steps: queries attended by the paged kernel,
caches of the model dtype). Anything else returns None and the model runs its Python path,
which computes the same bits.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from dist_engine.kernels import linear as dense
from dist_engine.kernels import load, qlinear
from dist_engine.kernels.paged_attention import PagedGroup

P, I64 = ctypes.c_void_p, ctypes.c_int64


class _Product(ctypes.Structure):
    _fields_ = [("fn", P), ("quant", I64), ("weight", P), ("bias", P), ("n", I64), ("k", I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", P), ("post_norm", P), ("qkv", _Product), ("o", _Product),
                ("gate_up", _Product), ("down", _Product), ("k_cache", P), ("v_cache", P)]


class _Decoder(ctypes.Structure):
    _fields_ = [("rms_norm", P), ("add_rms_norm", P), ("rope_store", P), ("silu_mul", P),
                ("attention", P), ("n_layers", I64), ("H", I64), ("Hq", I64), ("Hk", I64),
                ("D", I64), ("I", I64), ("esz", I64), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("cos", P),
                ("sin", P), ("T", I64), ("positions", P), ("slots", P), ("q_start", P),
                ("q_len", P), ("ctx", P), ("tables", P), ("width", I64), ("B", I64),
                ("block_size", I64), ("window", I64), ("threads", I64)]


SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@functools.cache
def _addresses(dtype: torch.dtype) -> dict[str, int] | None:
    """Entry points of the kernels the driver calls, for activations of ``dtype``."""
    sfx = SUFFIX[dtype]
    libs = {name: load(name) for name in ("decoder", "rms_norm", "fused", "paged_attention", "linear", "qlinear")}
    if any(lib is None for lib in libs.values()):
        return None
    addr = lambda lib, sym: ctypes.cast(getattr(libs[lib], sym), P).value  # noqa: E731
    libs["decoder"].decoder_layers.argtypes = [ctypes.POINTER(_Decoder), P]
    libs["decoder"].decoder_layers.restype = ctypes.c_int
    return {"run": libs["decoder"].decoder_layers, "rms_norm": addr("rms_norm", f"rms_norm_{sfx}"),
            "add_rms_norm": addr("rms_norm", f"add_rms_norm_{sfx}"),
            "rope_store": addr("fused", f"rope_store_{sfx}"), "silu_mul": addr("fused", f"silu_mul_{sfx}"),
            "attention": addr("paged_attention", f"paged_attention_{sfx}"),
            "dense": addr("linear", {torch.float32: "linear_f32", torch.bfloat16: "linear_bf16"}[dtype]),
            "dense_bf16w": addr("linear", "linear_f32_bf16w"), "dense_f16w": addr("linear", "linear_f32_f16w"),
            "quant": addr("qlinear", f"qlinear_{sfx}"), "quant_i8": addr("qlinear", f"qlinear_{sfx}_i8")}


def _product(module, dtype: torch.dtype, fns: dict, keep: list) -> _Product | None:
    """The C view of one projection, or None where the driver cannot run it."""
    packed = module.weight_packed
    bias = getattr(module, "bias", None)
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    b = None if bias is None else bias.data_ptr()
    if isinstance(packed, qlinear.QWeight):
        if packed.in_perm is not None or packed.device.type != "cpu":
            return None
        keep.append(packed)
        fn = fns["quant_i8"] if packed.int8_activations else fns["quant"]
        return _Product(fn, 1, ctypes.addressof(packed.struct), b, packed.out_features, packed.in_features)
    if isinstance(packed, dense.PanelWeight) and packed.panels.dtype == dtype:
        return _Product(fns["dense"], 0, packed.panels.data_ptr(), b, packed.out_features, packed.panels.shape[1])
    mixed = ({torch.bfloat16: "dense_bf16w", torch.float16: "dense_f16w"}.get(packed.panels.dtype)
             if isinstance(packed, dense.PanelWeight) else None)
    if mixed and dtype == torch.float32:
        # 16-bit panels read into fp32 activations (a 16-bit checkpoint's weights, the MTP layer's)
        return _Product(fns[mixed], 0, packed.panels.data_ptr(), b, packed.out_features, packed.panels.shape[1])
    return None


def _layer(layer, dtype: torch.dtype, fns: dict, keep: list) -> _Layer | None:
    """The C view of one decoder block (``LlamaDecoderLayer``'s arithmetic), or None where the
    driver cannot run it: attention or MLP of another kind, q/k norms, TP, an o_proj bias."""
    from dist_engine.layers.norm import RMSNorm
    from dist_engine.models.llama import LlamaAttention, LlamaMLP

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if (type(attn) is not LlamaAttention or type(mlp) is not LlamaMLP or attn.qk_norm
            or attn.o_proj.comm.world_size != 1 or attn.o_proj.bias is not None
            or attn.rotary_emb.cos.dtype != dtype):
        return None
    prods = [_product(m, dtype, fns, keep) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(p is None for p in prods) or prods[1].bias or prods[2].bias or prods[3].bias:
        return None
    for ln in (layer.input_layernorm, layer.post_attention_layernorm):
        if type(ln) is not RMSNorm or not ln.use_kernel or ln.weight.dtype != dtype:
            return None
    return _Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                  *prods, None, None)


def _functions(dtype: torch.dtype) -> dict | None:
    """The kernels' entry points for activations of ``dtype``, or None (no C build, not CPU)."""
    if dtype not in SUFFIX or not qlinear.available():
        return None
    return _addresses(dtype)


class CPUDecoder:
    def __init__(self, blocks: list, layers: list[_Layer], keep: list, fns: dict, dtype: torch.dtype) -> None:
        self.fns, self.dtype, self._keep = fns, dtype, keep  # keep: weights the structs point into
        self.layers = (_Layer * len(layers))(*layers)
        attn, first = blocks[0].self_attn, blocks[0]
        self.args = _Decoder(
            fns["rms_norm"], fns["add_rms_norm"], fns["rope_store"], fns["silu_mul"], fns["attention"],
            len(layers), first.input_layernorm.weight.shape[0], attn.local_num_heads, attn.local_num_kv_heads,
            attn.head_dim, first.mlp.down_proj.local_in, dtype.itemsize, first.input_layernorm.eps, attn.scale,
            self.layers, attn.rotary_emb.cos.data_ptr(), attn.rotary_emb.sin.data_ptr())
        self.cache_ptrs = None  # the caches (list or tuple) the layer structs point into

    @classmethod
    def attach(cls, model) -> CPUDecoder | None:
        """The driver for ``model`` (a ``LlamaModel``), or None where it does not apply."""
        from dist_engine.layers.norm import RMSNorm
        from dist_engine.models.llama import LlamaDecoderLayer

        norm = getattr(model, "norm", None)
        if type(norm) is not RMSNorm:  # e.g. Qwen3.5's (1 + w) norm: not the C driver's arithmetic
            return None
        # exact types: the driver encodes LlamaDecoderLayer's forward, so a layer kind it does
        # not know (a subclass, a linear-attention or MLA layer, MoE) keeps the Python path
        if any(type(layer) is not LlamaDecoderLayer for layer in model.layers):
            return None
        return cls.for_blocks(list(model.layers))

    @classmethod
    def for_blocks(cls, blocks: list) -> CPUDecoder | None:
        """The driver for a stack of blocks computing ``LlamaDecoderLayer``'s forward (the
        model's layers; an MTP layer's block after its input projection), or None."""
        if not blocks:
            return None
        dtype = blocks[0].input_layernorm.weight.dtype
        fns = _functions(dtype) if blocks[0].input_layernorm.weight.device.type == "cpu" else None
        if fns is None:
            return None
        keep: list = []
        layers = [_layer(block, dtype, fns, keep) for block in blocks]
        return None if any(layer is None for layer in layers) else cls(blocks, layers, keep, fns, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_caches, meta) -> torch.Tensor | None:
        """The residual stream after every layer (``x`` ``[T, H]`` updated in place), or None
        where this step is not one the driver runs."""
        g = meta.groups[0] if len(meta.groups) == 1 else None
        if (not isinstance(g, PagedGroup) or not g.covers_all or meta.write_index is not None
                or meta.cp is not None or meta.dcp is not None or meta.split_tokens is not None
                or meta.by_group or meta.state is not None
                or x.dtype != self.dtype or not x.is_contiguous() or torch.is_grad_enabled()):
            return None
        known = self.cache_ptrs  # the same list each step for a model; an MTP block's one cache
        if known is None or (known is not kv_caches and any(a is not b for a, b in zip(known, kv_caches))):
            # K/V stored as they are in the model's dtype (not FP8, not TurboQuant codes)
            if any(kv.observe or kv.shared or not kv.plain or kv.k.dtype != self.dtype for kv in kv_caches):
                return None
            for layer, kv in zip(self.layers, kv_caches):
                layer.k_cache, layer.v_cache = kv.k.data_ptr(), kv.v.data_ptr()
            self.cache_ptrs = kv_caches
        a = self.args
        positions, slots = positions.contiguous(), meta.slot_mapping.contiguous()
        a.T, a.positions, a.slots = x.shape[0], positions.data_ptr(), slots.data_ptr()
        a.q_start, a.q_len, a.ctx, a.tables = (g.q_start.data_ptr(), g.q_len.data_ptr(),
                                               g.ctx.data_ptr(), g.tables.data_ptr())
        a.width, a.B, a.block_size, a.window = g.tables.shape[1], g.tables.shape[0], g.block_size, g.window
        a.threads = torch.get_num_threads()
        rc = self.fns["run"](ctypes.byref(a), x.data_ptr())
        if rc:
            raise MemoryError("CPU decoder: out of memory for a step's scratch buffers")
        return x


def attach(causal_lm) -> None:
    """Give a Llama-family model (``model.model.cpu_decoder``) its C driver where it applies;
    models without the attribute (Qwen3.5's hybrid layers) always run their Python path."""
    inner = getattr(causal_lm, "model", None)
    if inner is not None and hasattr(inner, "cpu_decoder"):
        inner.cpu_decoder = CPUDecoder.attach(inner)


def attach_block(block) -> None:
    """Give an MTP layer whose block is a plain Llama block (``block.cpu_decoder``) the C driver
    for that block, so that drafting costs one C call per step; others keep the Python path."""
    if hasattr(block, "cpu_decoder"):
        block.cpu_decoder = CPUDecoder.for_blocks([block])
