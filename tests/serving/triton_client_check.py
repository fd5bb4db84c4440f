"""Drive a gpt2-deploy server with the unmodified ``tritonclient.grpc`` client; print JSON results.

Run in its own interpreter by test_kserve.py: tritonclient registers the protocol's messages
(package ``inference``) in protobuf's process-wide descriptor pool, and so does the server's
generated code; one process cannot hold both.

    python triton_client_check.py HOST:PORT MODEL PROMPT_IDS_JSON OUT_NPY
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def error(e: InferenceServerException) -> list:
    return [str(e.status()), e.message()]


def text_inputs(prompt: str, max_tokens: int, stream: bool | None = None, **sampling) -> list:
    def scalar(name, value, dtype, np_dtype):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np_dtype))
        return t

    inputs = [
        scalar("text_input", prompt.encode(), "BYTES", np.object_),
        scalar("max_tokens", max_tokens, "INT32", np.int32),
    ]
    if stream is not None:
        inputs.append(scalar("stream", stream, "BOOL", np.bool_))
    kinds = {
        "temperature": ("FP32", np.float32),
        "top_k": ("INT32", np.int32),
        "top_p": ("FP32", np.float32),
        "random_seed": ("UINT64", np.uint64),
    }
    for k, v in sampling.items():
        inputs.append(scalar(k, v, *kinds[k]))
    return inputs


def stream_generate(client, model: str, prompts: list[tuple[str, str]], **kw) -> list[dict]:
    """Send several requests on one stream; collect each one's responses until its final one."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for request_id, m in prompts:
        client.async_stream_infer(m, text_inputs("Hello, my name is", 12, True, **kw), request_id=request_id)
    out, pending = [], len(prompts)
    while pending:
        result, err = responses.get(timeout=60)
        if err is not None:
            out.append({"error": error(err)})
            pending -= 1
            continue
        r = result.get_response()
        final = r.parameters["triton_final_response"].bool_param
        out.append(
            {
                "id": r.id,
                "text": result.as_numpy("text_output")[0].decode(),
                "final": final,
                "finish_reason": r.parameters["finish_reason"].string_param if final else None,
            }
        )
        pending -= final
    client.stop_stream()
    return out


def main() -> None:
    url, model, ids_json, npy = sys.argv[1:5]
    gen = model + "-generate"
    c = grpcclient.InferenceServerClient(url)
    out: dict = {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "model_ready": [c.is_model_ready(model), c.is_model_ready(gen)],
        "server_metadata": c.get_server_metadata(as_json=True),
        "metadata": c.get_model_metadata(model, as_json=True),
        "gen_metadata": c.get_model_metadata(gen, as_json=True),
    }

    # A left-padded batch of two through the single-forward model.
    ids = json.loads(ids_json)
    batch = np.zeros((2, len(ids)), dtype=np.int64)
    mask = np.zeros((2, len(ids)), dtype=np.int64)
    batch[0], mask[0] = ids, 1
    batch[1, 2:], mask[1, 2:] = ids[:-2], 1
    i1 = grpcclient.InferInput("input_ids", list(batch.shape), "INT64")
    i1.set_data_from_numpy(batch)
    i2 = grpcclient.InferInput("attention_mask", list(mask.shape), "INT64")
    i2.set_data_from_numpy(mask)
    res = c.infer(model, [i1, i2], outputs=[grpcclient.InferRequestedOutput("logits")])
    np.save(npy, res.as_numpy("logits"))
    out["logits_datatype"] = res.get_output("logits").datatype

    res = c.infer(gen, text_inputs("Hello, my name is", 12))
    out["generate"] = res.as_numpy("text_output")[0].decode()
    out["stream"] = stream_generate(c, gen, [("r1", gen), ("bad", "nope-generate"), ("r2", gen)])
    out["sampled"] = [
        c.infer(gen, text_inputs("Once upon a time", 10, temperature=0.9, top_k=40, top_p=0.9, random_seed=7))
        .as_numpy("text_output")[0]
        .decode()
        for _ in range(2)
    ]

    bad = {}
    try:
        c.get_model_metadata("nope")
    except InferenceServerException as e:
        bad["unknown_model"] = error(e)
    wrong = grpcclient.InferInput("input_ids", [1, 3], "INT32")
    wrong.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
    try:
        c.infer(model, [wrong])
    except InferenceServerException as e:
        bad["wrong_datatype"] = error(e)
    out["bad"] = bad
    out["ready_after"] = c.is_server_ready()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
