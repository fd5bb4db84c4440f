"""KServe v2 / Triton protocol: an unmodified tritonclient.grpc client, and every bad request."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.generation import GenerationRequest
from serving.kserve import serialize_bytes
from serving.proto import grpc_service_pb2 as pb
from serving.proto import grpc_service_pb2_grpc as pb_grpc
from serving.server import ServeOptions, build_server

HERE = Path(__file__).resolve().parent
Input = pb.ModelInferRequest.InferInputTensor


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with build_server(ServeOptions(bundle=tiny_bundle.root, port=0, threads=1, parity="off")) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    options = [("grpc.max_receive_message_length", 256 << 20)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield pb_grpc.GRPCInferenceServiceStub(ch)


def raw_input(name: str, array: np.ndarray, datatype: str) -> tuple[Input, bytes]:
    raw = serialize_bytes(list(array.ravel())) if datatype == "BYTES" else array.tobytes()
    return Input(name=name, datatype=datatype, shape=list(array.shape)), raw


def request(model: str, *tensors: tuple[Input, bytes], outputs=()) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[t for t, _ in tensors],
        raw_input_contents=[r for _, r in tensors],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
    )


def ids_input(ids, datatype="INT64", name="input_ids"):
    dtype = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}[datatype]
    return raw_input(name, np.asarray(ids, dtype=dtype), datatype)


def generate_inputs(text="Hello", max_tokens=4, **extra):
    tensors = [raw_input("text_input", np.array([text.encode()], dtype=object), "BYTES")]
    if max_tokens is not None:
        tensors.append(raw_input("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"))
    kinds = {
        "temperature": ("FP32", np.float32),
        "top_k": ("INT32", np.int32),
        "top_p": ("FP32", np.float32),
        "stream": ("BOOL", np.bool_),
        "random_seed": ("UINT64", np.uint64),
    }
    for k, v in extra.items():
        dt, np_dt = kinds[k]
        tensors.append(raw_input(k, np.array([v], dtype=np_dt), dt))
    return tensors


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    assert out.name == "logits" and out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(out.shape))


def test_unmodified_tritonclient(server, tmp_path):
    """live/ready/metadata/infer/stream through tritonclient.grpc, in its own interpreter."""
    if importlib.util.find_spec("tritonclient") is None:  # never imported here: see the script
        pytest.skip("tritonclient[grpc] (a dev dependency) is not installed")
    rt = server.runtime
    ids = rt.encode("The capital of France is")
    npy = tmp_path / "logits.npy"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "triton_client_check.py"),
            server.address,
            "tiny",
            json.dumps(ids),
            str(npy),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"] == [True, True]
    assert out["server_metadata"]["name"] == "gpt2-deploy"
    md = out["metadata"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in md["inputs"]] == [
        ("input_ids", "INT64", ["-1", "-1"]),
        ("attention_mask", "INT64", ["-1", "-1"]),
    ]
    assert [(o["name"], o["datatype"], o["shape"]) for o in md["outputs"]] == [
        ("logits", "FP32", ["-1", "-1", "50257"])
    ]
    assert [i["name"] for i in out["gen_metadata"]["inputs"]][:2] == ["text_input", "max_tokens"]
    assert out["gen_metadata"]["outputs"][0]["datatype"] == "BYTES"

    # The left-padded batch: row 0 is the sequence, row 1 its first S-2 tokens after two pads.
    logits = np.load(npy)
    assert logits.shape == (2, len(ids), 50257) and out["logits_datatype"] == "FP32"
    want = asyncio.run(rt.forward(np.asarray([ids]), None))[0]
    np.testing.assert_allclose(logits[0], want, atol=1e-5)
    np.testing.assert_allclose(logits[1, 2:], want[:-2], atol=1e-4)  # padding changes nothing

    greedy = rt.generator.generate(GenerationRequest(rt.encode("Hello, my name is"), 12)).text
    assert out["generate"] == greedy
    by_id: dict = {}
    for r in out["stream"]:
        by_id.setdefault(r.get("id", "error"), []).append(r)
    for rid in ("r1", "r2"):  # one response per token, then the final one; errors don't end the stream
        rs = by_id[rid]
        assert [r["final"] for r in rs] == [False] * (len(rs) - 1) + [True]
        assert "".join(r["text"] for r in rs) == greedy and rs[-1]["finish_reason"] in ("length", "eos")
    (err,) = by_id["error"]
    assert "NOT_FOUND" in err["error"][1] and "tiny, tiny-generate" in err["error"][1]
    assert out["sampled"][0] == out["sampled"][1] != greedy[: len(out["sampled"][0])]  # seeded
    assert out["bad"]["unknown_model"][0] == "StatusCode.NOT_FOUND"
    assert out["bad"]["wrong_datatype"][0] == "StatusCode.INVALID_ARGUMENT"
    assert "expected INT64" in out["bad"]["wrong_datatype"][1]
    assert out["ready_after"]


def test_typed_contents_equal_raw_contents(stub):
    ids = [464, 3139, 286]
    raw = logits_of(stub.ModelInfer(request("tiny", ids_input([ids]))))
    typed = pb.ModelInferRequest(
        model_name="tiny",
        inputs=[
            Input(
                name="input_ids",
                datatype="INT64",
                shape=[1, 3],
                contents=pb.InferTensorContents(int64_contents=ids),
            )
        ],
    )
    np.testing.assert_array_equal(logits_of(stub.ModelInfer(typed)), raw)


def test_generate_model_over_model_infer(server, stub):
    rt = server.runtime
    want = rt.generator.generate(GenerationRequest(rt.encode("Hello, my name is"), 6))
    r = stub.ModelInfer(request("tiny-generate", *generate_inputs("Hello, my name is", 6)))
    (out,) = r.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("text_output", "BYTES", [1])
    assert r.raw_output_contents[0] == serialize_bytes([want.text.encode()])
    assert r.parameters["triton_final_response"].bool_param
    assert r.parameters["completion_tokens"].int64_param == want.completion_tokens
    assert r.parameters["finish_reason"].string_param == want.finish_reason


def test_logits_too_large_for_a_message(stub):
    ids = np.zeros((6, 256), dtype=np.int64)  # 6 * 256 * 50257 * 4 bytes = 309 MB of logits
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request("tiny", ids_input(ids)))
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "message limit of 255 MiB" in info.value.details() and "--max-message-mb" in info.value.details()


FORWARD_EXPECTED = "Expected inputs: input_ids INT64 [-1, -1], optional attention_mask INT64 [-1, -1]"
BAD = [
    (
        "unknown model",
        request("gpt3", ids_input([[1]])),
        grpc.StatusCode.NOT_FOUND,
        "unknown model 'gpt3'; available models: tiny, tiny-generate",
    ),
    (
        "unknown version",
        pb.ModelInferRequest(model_name="tiny", model_version="7"),
        grpc.StatusCode.NOT_FOUND,
        "available versions: 1",
    ),
    (
        "wrong tensor name",
        request("tiny", ids_input([[1, 2]], name="ids")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown input(s) ['ids']; missing required input(s) ['input_ids']. " + FORWARD_EXPECTED,
    ),
    (
        "wrong datatype",
        request("tiny", ids_input([[1.0, 2.0]], "FP32")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'input_ids' has datatype 'FP32'; expected INT64",
    ),
    (
        "wrong rank",
        request("tiny", ids_input([1, 2, 3])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has shape [3]; expected 2 dimensions [-1, -1]",
    ),
    (
        "raw size does not match the shape",
        pb.ModelInferRequest(
            model_name="tiny",
            inputs=[Input(name="input_ids", datatype="INT64", shape=[1, 3])],
            raw_input_contents=[np.zeros(2, np.int64).tobytes()],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs 24 bytes, got 16",
    ),
    (
        "mask shape",
        request("tiny", ids_input([[1, 2]]), ids_input([[1, 1, 1]], name="attention_mask")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "attention_mask has shape [1, 3]; expected the shape of input_ids [1, 2]",
    ),
    (
        "mask values",
        request("tiny", ids_input([[1, 2]]), ids_input([[1, 2]], name="attention_mask")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "0 (padding) or 1 (token)",
    ),
    (
        "ids outside the vocabulary",
        request("tiny", ids_input([[1, 50257]])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "token ids must be in [0, 50257)",
    ),
    (
        "sequence past the context",
        request("tiny", ids_input(np.ones((1, 300)))),
        grpc.StatusCode.OUT_OF_RANGE,
        "exceeds the model's context of 256 positions",
    ),
    (
        "unknown output",
        request("tiny", ids_input([[1]]), outputs=["probs"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown requested output(s) ['probs']",
    ),
    (
        "missing max_tokens",
        request("tiny-generate", *generate_inputs(max_tokens=None)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "missing required input(s) ['max_tokens']",
    ),
    (
        "two prompts",
        request(
            "tiny-generate",
            raw_input("text_input", np.array([b"a", b"b"], dtype=object), "BYTES"),
            *generate_inputs()[1:],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected [1] (one request at a time)",
    ),
    (
        "stream over ModelInfer",
        request("tiny-generate", *generate_inputs(stream=True)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "stream=true needs ModelStreamInfer",
    ),
    (
        "negative max_tokens",
        request("tiny-generate", *generate_inputs(max_tokens=-5)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_new_tokens must be an integer in [1, 4096], got -5",
    ),
    (
        "max_tokens past the context",
        request("tiny-generate", *generate_inputs(max_tokens=1000)),
        grpc.StatusCode.OUT_OF_RANGE,
        "exceeds the model's context of 256 positions",
    ),
    (
        "top_p above 1",
        request("tiny-generate", *generate_inputs(top_p=2.0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p must be in (0, 1]",
    ),
    (
        "empty prompt",
        request("tiny-generate", *generate_inputs(text="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the prompt is empty",
    ),
]


@pytest.mark.parametrize("what,req,code,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_model_infer_requests(stub, what, req, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req)
    assert info.value.code() == code, (what, info.value.details())
    assert needle in info.value.details(), (what, info.value.details())
    # The server keeps serving.
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert logits_of(stub.ModelInfer(request("tiny", ids_input([[1, 2]])))).shape == (1, 2, 50257)


def test_stream_reports_errors_in_band_and_stays_open(stub):
    reqs = [
        request("tiny-generate", *generate_inputs(max_tokens=-1)),
        request("tiny-generate", *generate_inputs("Hello", 3, stream=True)),
        request("tiny", ids_input([[1, 2, 3]])),
    ]
    for i, r in enumerate(reqs):
        r.id = f"req{i}"
    responses = list(stub.ModelStreamInfer(iter(reqs)))
    assert responses[0].error_message.startswith("INVALID_ARGUMENT: ")
    assert responses[0].infer_response.id == "req0"
    gen = [r.infer_response for r in responses[1:-1]]
    assert all(r.infer_response.id == "req1" and not r.error_message for r in responses[1:-1])
    finals = [g.parameters["triton_final_response"].bool_param for g in gen]
    assert finals == [False] * (len(gen) - 1) + [True]
    assert len(gen) in (2, 3, 4)  # up to 3 tokens + the final response
    last = responses[-1].infer_response
    assert last.id == "req2" and logits_of(last).shape == (1, 3, 50257)
    assert last.parameters["triton_final_response"].bool_param
