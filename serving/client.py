"""A Python client for a gpt2-deploy server (our API plus gRPC health).

    with Gpt2DeployClient("127.0.0.1:50051") as client:
        client.wait_until_serving(timeout=60)
        stream = client.generate("Hello, my name is", max_new_tokens=16)
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        print(stream.finish.reason, stream.finish.completion_tokens)

Errors are ``grpc.RpcError`` with the server's status code and message (``e.code()``,
``e.details()``): INVALID_ARGUMENT / OUT_OF_RANGE for bad requests, UNAVAILABLE while loading.

A server with TLS / mutual TLS / tokens (``serve --tls-cert ... --auth-token-file ...``):

    Gpt2DeployClient("gpt2.example:50051", tls_ca="ca.crt", tls_cert="client.crt",
                     tls_key="client.key", token=read_token("token"))   # serving.security
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto import gpt2_deploy_pb2 as pb
from serving.proto import gpt2_deploy_pb2_grpc as pb_grpc
from serving.security import BearerTokenInterceptor, channel_credentials

FINISH_REASON_NAMES = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_CANCELLED: "cancelled",
    pb.FINISH_REASON_UNSPECIFIED: "unspecified",
}


def tensor_to_numpy(t: pb.Tensor) -> np.ndarray:
    return np.frombuffer(t.data, dtype=np.dtype(t.dtype).newbyteorder("<")).reshape(tuple(t.shape))


@dataclass
class Scores:
    """``Score``'s answer with numpy arrays (see ScoreResponse in gpt2_deploy.proto)."""

    token_ids: list[int]
    token_logprobs: np.ndarray
    logits: np.ndarray | None
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None


class GenerationStream:
    """The responses of one ``Generate`` call. Iterate for chunks; ``cancel()`` stops the server's work.

    After iteration, ``finish`` holds the last message's Finish (reason, token counts, timings),
    ``text`` the concatenated text and ``token_ids`` the streamed ids.
    """

    def __init__(self, call: Any):
        self._call = call
        self.finish: pb.Finish | None = None
        self.text = ""
        self.token_ids: list[int] = []

    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        for response in self._call:
            self.text += response.text
            self.token_ids.extend(response.token_ids)
            if response.HasField("finish"):
                self.finish = response.finish
            yield response

    def cancel(self) -> None:
        self._call.cancel()

    @property
    def finish_reason(self) -> str | None:
        return None if self.finish is None else FINISH_REASON_NAMES[self.finish.reason]

    def result(self) -> GenerationStream:
        """Consume the whole stream; return self."""
        for _ in self:
            pass
        return self


def _prompt(prompt: str | Sequence[int]) -> dict:
    if isinstance(prompt, str):
        return {"text": prompt}
    return {"token_ids": pb.TokenIds(ids=[int(i) for i in prompt])}


class Gpt2DeployClient:
    """A channel to one server.

    Args:
        target: ``host:port``.
        timeout: Default deadline of each call in seconds; None for none.
        max_message_mb: Largest message accepted (full logits from Score can be large).
        tls: Use TLS. None (default): when any of ``tls_ca``/``tls_cert``/``tls_key`` is given;
            True alone trusts the system's root certificates.
        tls_ca: PEM CA bundle that signed the server's certificate.
        tls_cert, tls_key: PEM client certificate and key, for a server with mutual TLS.
        tls_server_name: Check the server's certificate for this name instead of the target's
            host (e.g. connecting to an IP address with a certificate for a DNS name).
        token: Bearer token sent as ``authorization`` metadata on every call, health included.

    Raises:
        OptionsError: a TLS file cannot be used (the message names it), or a bad token.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_mb: int = 256,
        tls: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        n = max_message_mb << 20
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", n),
            ("grpc.max_send_message_length", n),
        ]
        if tls is None:
            tls = any(f is not None for f in (tls_ca, tls_cert, tls_key))
        if tls:
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            credentials = channel_credentials(tls_ca, tls_cert, tls_key)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, BearerTokenInterceptor(token))
        self.stub = pb_grpc.Gpt2DeployStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    # --- our API -------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        do_sample: bool | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        timeout: float | None = None,
    ) -> GenerationStream:
        """Start a streaming generation.

        Greedy unless ``do_sample`` is true; when ``do_sample`` is None, giving temperature,
        top_k or top_p turns sampling on (a seed alone does not). Unset values take the server's
        defaults (16 new tokens, temperature 1, no top-k/top-p).
        """
        if do_sample is None:
            do_sample = any(v is not None for v in (temperature, top_k, top_p))
        sampling = pb.SamplingParams(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
        request = pb.GenerateRequest(
            **_prompt(prompt),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_strings=list(stop),
            stop_token_ids=list(stop_token_ids),
            ignore_eos=ignore_eos,
        )
        return GenerationStream(self.stub.Generate(request, timeout=timeout or self.timeout))

    def score(self, prompt: str | Sequence[int], top_k: int = 0, timeout: float | None = None) -> Scores:
        r = self.stub.Score(pb.ScoreRequest(**_prompt(prompt), top_k=top_k), timeout=timeout or self.timeout)
        return Scores(
            token_ids=list(r.token_ids),
            token_logprobs=np.asarray(r.token_logprobs, dtype=np.float32),
            logits=tensor_to_numpy(r.logits) if r.HasField("logits") else None,
            top_ids=tensor_to_numpy(r.top_ids) if r.HasField("top_ids") else None,
            top_logprobs=tensor_to_numpy(r.top_logprobs) if r.HasField("top_logprobs") else None,
        )

    def model_info(self, timeout: float | None = None) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout or self.timeout)

    def check_parity(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int | None = None,
        timeout: float | None = None,
        *,
        batched: bool = False,
    ) -> pb.CheckParityResponse:
        """Teacher-forced parity of the served backend; ``batched`` also runs the prompt among
        companion rows and compares it with its solo run."""
        return self.stub.CheckParity(
            pb.CheckParityRequest(**_prompt(prompt), max_new_tokens=max_new_tokens, batched=batched),
            timeout=timeout or self.timeout,
        )

    # --- health --------------------------------------------------------------------------------
    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """ "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", "UNAUTHENTICATED" (the server requires a
        token for health: ``serve --auth-health``) or "UNREACHABLE" (no answer)."""
        try:
            r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                return "UNAUTHENTICATED"
            return "UNREACHABLE"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_until_serving(
        self, timeout: float = 60.0, interval: float = 0.1, alive: Callable[[], bool] | None = None
    ) -> None:
        """Poll health until SERVING.

        Args:
            timeout: Seconds to wait.
            interval: Seconds between polls.
            alive: Optional check called each poll (e.g. that the server process still runs);
                returning False gives up at once.

        Raises:
            TimeoutError: not SERVING in time (the message says the last status seen).
        """
        deadline = time.monotonic() + timeout
        status = "UNREACHABLE"
        while time.monotonic() < deadline:
            status = self.health(timeout=max(min(1.0, deadline - time.monotonic()), 0.05))
            if status == "SERVING":
                return
            if alive is not None and not alive():
                raise TimeoutError(f"{self.target}: the server went away (last health: {status})")
            time.sleep(interval)
        raise TimeoutError(f"{self.target}: not SERVING after {timeout:g} s (last health: {status})")

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Gpt2DeployClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
