"""The gRPC Generation servicer: proto <-> the server's ``Frontend``, nothing else.

Bad input is INVALID_ARGUMENT with the validation message; a full queue is RESOURCE_EXHAUSTED;
a dead engine is UNAVAILABLE. A client that cancels, disconnects or runs past its deadline has
its handler cancelled by grpc, which closes the AsyncLLM stream and aborts the request.
"""

from __future__ import annotations

import uuid

import grpc

from dist_engine.engine.async_llm import QueueFullError
from dist_engine.engine.outputs import CompletionOutput, RequestOutput
from dist_engine.engine.sampling_params import SamplingParams
from dist_engine.server.frontend import Frontend, check_request_id, public_error
from dist_engine.server.security import ApiKeys, check_request_size, grpc_authorization
from dist_engine.v1 import generation_pb2 as pb
from dist_engine.v1 import generation_pb2_grpc as pb_grpc
from dist_engine.worker.executor import EngineDeadError

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "max_tokens", "min_tokens", "logprobs", "n")


def sampling_params(opts: pb.SamplingOptions) -> SamplingParams:
    """Unset optional fields keep SamplingParams' defaults; raises ValueError on bad values."""
    kw = {name: getattr(opts, name) for name in _OPTIONAL if opts.HasField(name)}
    return SamplingParams(**kw, stop=tuple(opts.stop), stop_token_ids=tuple(opts.stop_token_ids),
                          ignore_eos=opts.ignore_eos)


def _response(rid: str, out: RequestOutput, c: CompletionOutput, final: bool) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=rid, index=c.index, token_ids=c.token_ids_delta,
                              text=c.text_delta, finished=final)
    if c.logprobs is not None and c.token_ids_delta:
        start = len(c.token_ids) - len(c.token_ids_delta)
        for tok, entry in zip(c.token_ids_delta, c.logprobs[start:]):
            msg.logprobs.append(pb.TokenLogprobs(
                token_id=tok, logprob=entry.get(tok, 0.0),
                top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.items() if t != tok]))
    if final:
        m = out.metrics
        msg.finish_reason = c.finish_reason or ""
        msg.stop_reason = "" if c.stop_reason is None else str(c.stop_reason)
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=len(out.prompt_token_ids),
                                    completion_tokens=len(c.token_ids),
                                    cached_prompt_tokens=m.prefix_hit_tokens))
        end = m.finished_time or m.last_token_time or m.arrival_time
        msg.timings.CopyFrom(pb.Timings(queue_s=m.queue_time or 0.0,
                                        time_to_first_token_s=m.time_to_first_token or 0.0,
                                        mean_inter_token_latency_s=m.time_per_output_token or 0.0,
                                        total_s=end - m.arrival_time))
        if m.spec.num_steps:
            msg.speculative.CopyFrom(spec_stats(m.spec.as_dict()))
    return msg


def expert_stats(d: dict) -> pb.ExpertCacheStats:
    return pb.ExpertCacheStats(**{f.name: d[f.name] for f in pb.ExpertCacheStats.DESCRIPTOR.fields})


def spec_stats(d: dict) -> pb.SpeculativeStats:
    return pb.SpeculativeStats(
        num_steps=d["num_steps"], num_draft_tokens=d["num_draft_tokens"],
        num_accepted_tokens=d["num_accepted_tokens"], mean_accepted_length=d["mean_accepted_length"],
        per_position_acceptance=d["per_position"], accepted_histogram=d["histogram"])


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, front: Frontend, keys: ApiKeys | None = None,
                 max_request_bytes: int | None = None) -> None:
        self.front = front
        self.llm = front.llm
        self.keys = keys
        self.max_request_bytes = max_request_bytes
        self.name = front.name

    def _input(self, request) -> dict:
        which = request.WhichOneof("input")
        if which is None:
            raise ValueError("the request has no input: set text, token_ids or chat")
        if which == "text":
            return {"prompt": request.text}
        if which == "token_ids":
            return {"prompt_token_ids": list(request.token_ids.ids)}
        return {"messages": [{"role": m.role, "content": m.content} for m in request.chat.messages]}

    def _tenant(self, context) -> str | None:
        return self.keys.identify(grpc_authorization(context)) if self.keys else None

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            check_request_size(request, self.max_request_bytes)
            # echoed only (the engine's own id is made by the frontend), so it cannot collide
            rid = check_request_id(request.request_id) or uuid.uuid4().hex
            self.front.check_model(request.model)
            params = sampling_params(request.sampling)
            stream = self.front.generate(params, tenant=self._tenant(context),
                                         cache_salt=request.cache_salt or None, prefix="grpc",
                                         **self._input(request))
            reported: set[int] = set()
            async for out in stream:
                for c in out.outputs:
                    if c.index in reported:
                        continue
                    final = c.finished
                    if final:
                        reported.add(c.index)
                    if c.token_ids_delta or c.text_delta or final:
                        yield _response(rid, out, c, final)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{e} (--max-queued-requests counts each of a request's n)")
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, public_error(e))

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        try:
            check_request_size(request, self.max_request_bytes)
            which = request.WhichOneof("input")
            if which is None:
                raise ValueError("the request has no input: set text or chat")
            messages = ([{"role": m.role, "content": m.content} for m in request.chat.messages]
                        if which == "chat" else None)
            ids = await self.llm.encode_async(request.text if which == "text" else None, None, messages)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        cfg, info = self.llm.config, self.llm.engine.cache_info
        return pb.ModelInfo(
            served_model_name=self.name, architecture=cfg.model.architecture,
            max_model_len=cfg.scheduler.max_model_len, vocab_size=cfg.model.vocab_size,
            tensor_parallel_size=cfg.parallel.tensor_parallel_size,
            context_parallel_size=cfg.parallel.context_parallel_size,
            decode_context_parallel_size=cfg.parallel.decode_context_parallel_size,
            kv_cache_dtype=cfg.cache.kv_cache_dtype, dtype=cfg.dtype,
            device=cfg.device, kv_cache_blocks=info["num_blocks"], kv_block_size=info["block_size"],
            kv_cache_tokens=info["num_blocks"] * info["block_size"],
            speculative_method=cfg.speculative.method if cfg.speculative else "",
            num_speculative_tokens=cfg.speculative.num_speculative_tokens if cfg.speculative else 0,
            speculative_model=(cfg.speculative.model or "") if cfg.speculative else "")

    async def GetServerStats(self, request, context) -> pb.ServerStats:
        s = self.llm.stats()
        return pb.ServerStats(
            num_requests_running=s["num_seqs_running"], num_requests_waiting=s["num_seqs_waiting"],
            kv_cache_usage=s["kv_cache_usage"], prefix_cache_query_tokens=s["prefix_cache_query_tokens"],
            prefix_cache_hit_tokens=s["prefix_cache_hit_tokens"], num_preemptions=s["num_preemptions"],
            prompt_tokens_total=s["prompt_tokens_computed"], generation_tokens_total=s["generation_tokens"],
            requests_finished_total=s["num_finished"], requests_aborted_total=s["num_aborted"],
            speculative=spec_stats(s["spec_decode"]) if s["spec_decode"] else None,
            expert_cache=expert_stats(s["expert_cache"]) if s.get("expert_cache") else None)
