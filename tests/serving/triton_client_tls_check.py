"""Drive a gpt2-deploy server with mutual TLS and token auth through the unmodified
``tritonclient.grpc`` client (``ssl=True`` + client certificate, ``headers``); print JSON results.

Run in its own interpreter by test_security.py (tritonclient's generated protos clash with the
server's in one process; see triton_client_check.py). The token is read from a file, not argv.

    python triton_client_tls_check.py HOST:PORT MODEL CA_PEM CERT_PEM KEY_PEM TOKEN_FILE
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from triton_client_check import error, text_inputs  # the sibling script (this directory is on sys.path)
from tritonclient.utils import InferenceServerException


def attempt(fn) -> dict:
    try:
        return {"ok": fn()}
    except InferenceServerException as e:
        return {"error": error(e)}


def stream(client, model: str, headers: dict | None) -> dict:
    """One streamed generation; its concatenated text, or the stream's error."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), headers=headers)
    try:
        client.async_stream_infer(model, text_inputs("Hello, my name is", 6, True), request_id="s1")
    except InferenceServerException:
        pass  # the stream failed already; its error comes through the callback
    text = ""
    try:
        while True:
            result, err = responses.get(timeout=60)
            if err is not None:
                return {"error": error(err)}
            text += result.as_numpy("text_output")[0].decode()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return {"ok": text}
    finally:
        client.stop_stream()


def main() -> None:
    url, model, ca, cert, key, token_file = sys.argv[1:7]
    lines = (line.strip() for line in Path(token_file).read_text().splitlines())
    token = next(t for t in lines if t and not t.startswith("#"))
    headers = {"authorization": f"Bearer {token}"}
    gen = model + "-generate"
    c = grpcclient.InferenceServerClient(
        url, ssl=True, root_certificates=ca, private_key=key, certificate_chain=cert
    )
    ids = np.array([[464, 3139, 286, 4881, 318]], dtype=np.int64)
    ids_input = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    ids_input.set_data_from_numpy(ids)
    out = {
        "live_no_token": attempt(lambda: c.is_server_live()),
        "live_wrong_token": attempt(lambda: c.is_server_live(headers={"authorization": "Bearer nope"})),
        "live": attempt(lambda: c.is_server_live(headers=headers)),
        "ready": attempt(lambda: c.is_server_ready(headers=headers)),
        "metadata_inputs": attempt(
            lambda: [i["name"] for i in c.get_model_metadata(model, headers=headers, as_json=True)["inputs"]]
        ),
        "infer_no_token": attempt(lambda: c.infer(model, [ids_input]).as_numpy("logits").shape),
        "infer_shape": attempt(
            lambda: list(c.infer(model, [ids_input], headers=headers).as_numpy("logits").shape)
        ),
        "generate": attempt(
            lambda: (
                c.infer(gen, text_inputs("Hello, my name is", 6), headers=headers)
                .as_numpy("text_output")[0]
                .decode()
            )
        ),
        "stream_no_token": stream(c, gen, None),
        "stream": stream(c, gen, headers),
    }
    c.close()
    # TLS without a client certificate: the server requires one, so the handshake fails.
    anonymous = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=ca)
    out["no_client_cert"] = attempt(lambda: anonymous.is_server_live(headers=headers, client_timeout=10))
    anonymous.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
