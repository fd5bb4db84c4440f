"""``gpt2_deploy.v1.Gpt2Deploy``: our own API, translated to ``ModelRuntime`` calls (grpc.aio).

Thin on purpose: messages in, runtime call, messages out. Errors are raised as
``serving.errors`` types and become status codes in ``serving.grpc_errors``. Handlers are
coroutines: a stream awaits its row's events, so no thread waits on a client.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import grpc
import numpy as np

from serving.errors import InvalidInput
from serving.generation import (
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    FinalEvent,
    GenerationRequest,
    remaining_text,
)
from serving.proto import gpt2_deploy_pb2 as pb
from serving.proto import gpt2_deploy_pb2_grpc as pb_grpc
from serving.runtime import ModelRuntime
from serving.sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 16

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def prompt_ids(runtime: ModelRuntime, msg, field: str) -> list[int]:
    """The token ids of a ``oneof`` prompt (``text`` or ``token_ids``) of ``msg``."""
    which = msg.WhichOneof(field)
    if which == "text":
        return runtime.encode(msg.text)
    if which == "token_ids":
        runtime.check_token_count(len(msg.token_ids.ids))
        return list(msg.token_ids.ids)
    raise InvalidInput(f"no {field}: set either `text` or `token_ids`")


def sampling_params(s: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        do_sample=s.do_sample,
    )


def generation_request(runtime: ModelRuntime, request: pb.GenerateRequest) -> GenerationRequest:
    if len(request.stop_strings) > MAX_STOP_STRINGS or len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidInput(
            f"at most {MAX_STOP_STRINGS} stop strings and {MAX_STOP_TOKEN_IDS} stop token ids are allowed, "
            f"got {len(request.stop_strings)} and {len(request.stop_token_ids)}"
        )
    return GenerationRequest(
        prompt_ids=prompt_ids(runtime, request, "prompt"),
        max_new_tokens=(
            request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        ),
        sampling=sampling_params(request.sampling),
        stop_token_ids=list(request.stop_token_ids),
        stop_strings=list(request.stop_strings),
        stop_at_eos=not request.ignore_eos,
    )


def finish_message(final: FinalEvent) -> pb.Finish:
    return pb.Finish(
        reason=FINISH_REASONS.get(final.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=final.prompt_tokens,
        completion_tokens=final.completion_tokens,
        token_ids=final.token_ids,
        text=final.text,
        time_to_first_token_s=final.time_to_first_token_s,
        per_token_s=final.per_token_s,
    )


def tensor(a: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(a.shape), dtype=a.dtype.name, data=a.tobytes())


def parity_response(report, served: str) -> pb.CheckParityResponse:
    tol = report.tolerance
    first = report.first_diverging_step
    response = pb.CheckParityResponse(
        passed=bool(report),
        tolerance=tol.name,
        atol=tol.atol,
        min_top1=tol.min_top1,
        max_abs=report.max_abs,
        top1_agreement=report.top1_agreement,
        first_diverging_step=-1 if first is None else first,
        steps=[
            pb.ParityStep(
                case=c.case,
                max_abs=c.max_abs,
                mean_abs=c.mean_abs,
                top1_agreement=c.top1_agreement,
                positions=c.positions,
                passed=c.passed,
            )
            for c in report.cases
        ],
        report=str(report),
        report_json=json.dumps(report.to_json()),
        served_backend=served,
        reference_backend="torch",
        batch_sizes=list(report.batch_sizes),
        notes=list(report.notes),
    )
    vs_solo = getattr(report, "vs_solo", None)
    if vs_solo is not None:
        solo_first = vs_solo.first_diverging_step
        response.batched = True
        response.batched_vs_solo_passed = bool(vs_solo)
        response.batched_vs_solo_max_abs = vs_solo.max_abs
        response.batched_vs_solo_first_diverging_step = -1 if solo_first is None else solo_first
    return response


class Gpt2DeployServicer(pb_grpc.Gpt2DeployServicer):
    def __init__(self, runtime: ModelRuntime, kserve_models: list[str] | None = None):
        self.runtime = runtime
        self.kserve_models = list(kserve_models or [])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        req = generation_request(self.runtime, request)
        streamed = ""
        async for event in self.runtime.generate(req):
            if isinstance(event, FinalEvent):
                yield pb.GenerateResponse(
                    text=remaining_text(event.text, streamed), finish=finish_message(event)
                )
            else:
                streamed += event.text
                yield pb.GenerateResponse(token_ids=event.token_ids, text=event.text)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        ids = prompt_ids(self.runtime, request, "input")
        result = await self.runtime.score(ids, request.top_k)
        response = pb.ScoreResponse(token_ids=ids, token_logprobs=result.token_logprobs.tolist())
        if result.logits is not None:
            response.logits.CopyFrom(tensor(result.logits.astype(np.float32)))
        if result.top_ids is not None and result.top_logprobs is not None:
            response.top_ids.CopyFrom(tensor(result.top_ids.astype(np.int64)))
            response.top_logprobs.CopyFrom(tensor(result.top_logprobs.astype(np.float32)))
        return response

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        rt = self.runtime
        info = rt.info()
        d = rt.bundle.dims
        report = rt.canary_report
        return pb.ModelInfoResponse(
            name=info["name"],
            source=info["source"],
            precision=info["precision"],
            backend=info["backend"],
            device=info["device"],
            n_layer=d.n_layer,
            n_head=d.n_head,
            n_embd=d.n_embd,
            vocab_size=d.vocab_size,
            n_positions=d.n_positions,
            eos_token_id=d.eos_token_id,
            parity_mode=rt.parity_mode,
            canary=rt.canary,
            backend_info_json=json.dumps(info["backend_info"], default=str),
            canary_report_json=json.dumps(report.to_json()) if report is not None else "",
            ready=rt.ready,
            kserve_models=self.kserve_models,
            not_serving_reason=rt.not_serving_reason or ("" if rt.ready else info["state"]),
        )

    async def CheckParity(
        self, request: pb.CheckParityRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckParityResponse:
        ids = prompt_ids(self.runtime, request, "prompt")
        n = request.max_new_tokens if request.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
        gone = threading.Event()  # the client went away: the check in the worker thread stops
        try:
            report = await asyncio.to_thread(
                self.runtime.check_parity, ids, n, gone.is_set, batched=request.batched
            )
        finally:
            gone.set()
        return parity_response(report, self.runtime.backend.name)
