"""KServe v2 / Triton ``inference.GRPCInferenceService`` over the same AsyncLLM, so Triton
clients (``tritonclient[grpc]``) and load generators work unchanged.

The model takes the tensors Triton's LLM backends use: ``text_input`` (BYTES [1], the raw
prompt), optional ``stream`` (BOOL), ``sampling_parameters`` (BYTES [1], a JSON object of
SamplingParams fields; string values such as ``"0.7"`` are accepted, as the vLLM backend does),
``max_tokens`` (INT32) and ``exclude_input_in_output`` (BOOL); it answers ``text_output`` (BYTES).
``ModelStreamInfer`` streams text deltas, every response flagged ``triton_final_response``
(true on the last); a failed request gets ``error_message`` and the stream carries on.
Unary ``ModelInfer`` returns the whole text (prompt included unless excluded, like vLLM's backend).
"""

from __future__ import annotations

import asyncio
import json
import struct

import grpc

from dist_engine.engine.async_llm import QueueFullError
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.kserve import grpc_service_pb2 as kpb
from dist_engine.kserve import grpc_service_pb2_grpc as kpb_grpc
from dist_engine.server.frontend import (
    MAX_REQUEST_ID_BYTES,
    Frontend,
    check_request_id,
    public_error,
)
from dist_engine.server.security import ApiKeys, check_request_size, grpc_authorization
from dist_engine.worker.executor import EngineDeadError

_INPUTS = (("text_input", "BYTES", kpb.TYPE_STRING, [1], False),
           ("stream", "BOOL", kpb.TYPE_BOOL, [1], True),
           ("sampling_parameters", "BYTES", kpb.TYPE_STRING, [1], True),
           ("max_tokens", "INT32", kpb.TYPE_INT32, [1], True),
           ("exclude_input_in_output", "BOOL", kpb.TYPE_BOOL, [1], True))
_INT_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens")
FINAL = "triton_final_response"


def decode_bytes(raw: bytes) -> list[bytes]:
    """Elements of a BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("malformed BYTES tensor: truncated length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ValueError("malformed BYTES tensor: element runs past the end")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def read_inputs(req: kpb.ModelInferRequest) -> dict:
    """Input name -> first element, from raw contents or typed contents."""
    values = {}
    for i, t in enumerate(req.inputs):
        raw = req.raw_input_contents[i] if i < len(req.raw_input_contents) else None
        c = t.contents
        if t.datatype == "BYTES":
            items = decode_bytes(raw) if raw is not None else list(c.bytes_contents)
        elif t.datatype == "BOOL":
            items = [bool(b) for b in raw] if raw is not None else list(c.bool_contents)
        elif t.datatype in ("INT32", "UINT32", "INT64"):
            fmt = {"INT32": "<i", "UINT32": "<I", "INT64": "<q"}[t.datatype]
            items = ([v for (v,) in struct.iter_unpack(fmt, raw)] if raw is not None else
                     list(c.int_contents or c.uint_contents or c.int64_contents))
        else:
            raise ValueError(f"input {t.name!r}: datatype {t.datatype} is not accepted")
        if len(items) != 1:
            raise ValueError(f"input {t.name!r} must hold exactly one element, got {len(items)}")
        values[t.name] = items[0]
    known = {name for name, *_ in _INPUTS}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown inputs {sorted(unknown)}; this model takes {sorted(known)}")
    if "text_input" not in values:
        raise ValueError("input 'text_input' (BYTES [1], the prompt) is required")
    return values


def _coerce(name: str, value):
    if name in _INT_FIELDS:
        return int(value)
    if name in _FLOAT_FIELDS:
        return float(value)
    if name in _BOOL_FIELDS:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if name == "stop":
        return [value] if isinstance(value, str) else list(value)
    if name == "stop_token_ids":
        return [int(v) for v in value]
    raise ValueError(f"unknown sampling parameter {name!r}; known: "
                     f"{', '.join(_INT_FIELDS + _FLOAT_FIELDS + _BOOL_FIELDS + ('stop', 'stop_token_ids'))}")


def request_params(values: dict) -> tuple[str, SamplingParams, bool, bool]:
    """(prompt, sampling params, stream, exclude_input) from decoded inputs."""
    try:
        prompt = values["text_input"].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("text_input is not valid UTF-8") from None
    kw = {}
    if "sampling_parameters" in values:
        try:
            raw = json.loads(values["sampling_parameters"] or b"{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"sampling_parameters is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError("sampling_parameters must be a JSON object")
        try:
            kw = {k: _coerce(k, v) for k, v in raw.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"sampling_parameters: {e}") from None
    if "max_tokens" in values:
        kw["max_tokens"] = int(values["max_tokens"])
    if kw.get("n", 1) != 1:
        raise ValueError("n > 1 is not available over this protocol; use the Generation service")
    stream = bool(values.get("stream", False))
    exclude = bool(values.get("exclude_input_in_output", stream))
    if stream and not exclude:
        raise ValueError("streaming with exclude_input_in_output=false is not supported")
    return prompt, SamplingParams(**kw), stream, exclude


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, front: Frontend, ready, keys: ApiKeys | None = None,
                 max_request_bytes: int | None = None) -> None:
        self.front, self.llm, self.name, self.ready, self.keys = (
            front, front.llm, front.name, ready, keys)
        self.max_request_bytes = max_request_bytes

    # ---- health and metadata ---------------------------------------------------------------
    async def ServerLive(self, request, context):
        return kpb.ServerLiveResponse(live=not self.llm.is_dead)

    async def ServerReady(self, request, context):
        return kpb.ServerReadyResponse(ready=self.ready())

    async def ModelReady(self, request, context):
        return kpb.ModelReadyResponse(ready=request.name == self.name and self.ready())

    async def ServerMetadata(self, request, context):
        from dist_engine import __version__

        return kpb.ServerMetadataResponse(name="dist_engine", version=__version__,
                                          extensions=["model_stream_infer"])

    async def _check_model(self, name: str, context) -> None:
        if name != self.name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown model {name!r}; this server serves {self.name!r}")

    async def ModelMetadata(self, request, context):
        await self._check_model(request.name, context)
        meta = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=self.name, versions=["1"], platform="dist_engine",
            inputs=[meta(name=n, datatype=d, shape=s) for n, d, _, s, _ in _INPUTS],
            outputs=[meta(name="text_output", datatype="BYTES", shape=[-1])])

    async def ModelConfig(self, request, context):
        await self._check_model(request.name, context)
        return kpb.ModelConfigResponse(config=kpb.ModelConfig(
            name=self.name, backend="dist_engine", max_batch_size=0,
            input=[kpb.ModelInput(name=n, data_type=t, dims=s, optional=o) for n, _, t, s, o in _INPUTS],
            output=[kpb.ModelOutput(name="text_output", data_type=kpb.TYPE_STRING, dims=[-1])],
            model_transaction_policy=kpb.ModelTransactionPolicy(decoupled=True)))

    # ---- inference -------------------------------------------------------------------------
    def _response(self, req, text: str | None, final: bool) -> kpb.ModelInferResponse:
        rid = req.id if len(req.id.encode()) <= MAX_REQUEST_ID_BYTES else ""  # never amplify
        resp = kpb.ModelInferResponse(model_name=self.name, model_version=req.model_version, id=rid)
        resp.parameters[FINAL].bool_param = final
        if text is not None:
            resp.outputs.add(name="text_output", datatype="BYTES", shape=[1])
            resp.raw_output_contents.append(encode_bytes([text.encode("utf-8")]))
        return resp

    def _parse(self, req) -> tuple[str, SamplingParams, bool, bool]:
        """(prompt, params, stream, exclude_input); ValueError for bad input."""
        check_request_size(req, self.max_request_bytes)
        check_request_id(req.id)  # echoed in every response
        if req.model_name != self.name:
            raise ValueError(f"unknown model {req.model_name!r}; this server serves {self.name!r}")
        return request_params(read_inputs(req))

    async def _generate(self, prompt: str, params: SamplingParams, tenant: str | None):
        """Yield (text delta, finished) for one parsed request."""
        async for out in self.front.generate(params, tenant=tenant, prefix="kserve", prompt=prompt):
            yield out.outputs[0].text_delta, out.finished

    def _tenant(self, context) -> str | None:
        return self.keys.identify(grpc_authorization(context)) if self.keys else None

    async def ModelInfer(self, request, context):
        try:
            prompt, params, stream, exclude = self._parse(request)
            if stream:
                raise ValueError("stream=true needs ModelStreamInfer")
            text = [] if exclude else [prompt]
            async for delta, _ in self._generate(prompt, params, self._tenant(context)):
                text.append(delta)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, public_error(e))
        return self._response(request, "".join(text), True)

    async def _stream_one(self, req, out: asyncio.Queue, tenant: str | None) -> None:
        try:
            prompt, params, stream, exclude = self._parse(req)
            empty_final = req.parameters["triton_enable_empty_final_response"].bool_param \
                if "triton_enable_empty_final_response" in req.parameters else False
            if stream:
                async for delta, finished in self._generate(prompt, params, tenant):
                    if finished and empty_final:
                        if delta:
                            await out.put(kpb.ModelStreamInferResponse(
                                infer_response=self._response(req, delta, False)))
                        await out.put(kpb.ModelStreamInferResponse(
                            infer_response=self._response(req, None, True)))
                    elif delta or finished:
                        await out.put(kpb.ModelStreamInferResponse(
                            infer_response=self._response(req, delta, finished)))
            else:
                text = [] if exclude else [prompt]
                async for delta, _ in self._generate(prompt, params, tenant):
                    text.append(delta)
                await out.put(kpb.ModelStreamInferResponse(
                    infer_response=self._response(req, "".join(text), True)))
        except (ValueError, QueueFullError, EngineDeadError) as e:
            msg = public_error(e) if isinstance(e, EngineDeadError) else str(e)
            err = kpb.ModelStreamInferResponse(error_message=msg,
                                               infer_response=self._response(req, None, True))
            await out.put(err)

    async def ModelStreamInfer(self, request_iterator, context):
        tenant = self._tenant(context)
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        done_reading = asyncio.Event()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    t = asyncio.create_task(self._stream_one(req, out, tenant))
                    tasks.add(t)
                    t.add_done_callback(lambda t: (tasks.discard(t), out.put_nowait(None)))
            finally:
                done_reading.set()
                out.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while True:
                item = await out.get()
                if item is not None:
                    yield item
                elif done_reading.is_set() and not tasks and out.empty():
                    return
        finally:  # cancelled (client gone) or finished: abort whatever still runs
            reader.cancel()
            for t in list(tasks):
                t.cancel()
