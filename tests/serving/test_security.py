"""TLS, mutual TLS and bearer tokens against real servers on real ports.

A throwaway PKI is made per test session with the ``cryptography`` package (two CAs, a server
certificate for 127.0.0.1 and localhost, a client certificate from each CA); nothing is committed.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from export.errors import OptionsError
from serving.cli import app
from serving.client import Gpt2DeployClient
from serving.generation import GenerationRequest
from serving.proto import grpc_service_pb2 as kserve_pb
from serving.proto import grpc_service_pb2_grpc as kserve_grpc
from serving.security import TOKEN_REJECTED, TOKEN_REQUIRED, SecurityOptions, TokenFile
from serving.server import API_SERVICE, ServeOptions, build_server

x509 = pytest.importorskip(
    "cryptography.x509", reason="the cryptography package (dev extra) makes the test PKI"
)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

HERE = Path(__file__).resolve().parent
TOKEN_A, TOKEN_B = "tok-a-3f9c0b7e5d1a2c4b6e8f0a1b2c3d4e5f", "tok-b-9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"
runner = CliRunner()


# --- the throwaway PKI ----------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert, key) -> tuple[Path, Path]:
    crt, pem = path.with_suffix(".crt"), path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return crt, pem


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, usage=None, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    return b.sign(issuer_key, hashes.SHA256())


class Pki:
    """ca.crt signs server.crt (127.0.0.1, localhost) and client.crt; other-ca.crt signs rogue.crt
    and server2.crt (a renewed server certificate from another CA)."""

    def __init__(self, root: Path):
        self.root = root
        keys = {
            n: ec.generate_private_key(ec.SECP256R1())
            for n in ("ca", "other", "server", "server2", "client", "rogue")
        }
        ca = _certificate("test CA", keys["ca"], "test CA", keys["ca"], ca=True)
        other = _certificate("other CA", keys["other"], "other CA", keys["other"], ca=True)
        signers = {"test CA": keys["ca"], "other CA": keys["other"]}
        sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH

        def leaf(subject: str, key: str, issuer: str, usage, sans=()):
            return _certificate(subject, keys[key], issuer, signers[issuer], ca=False, usage=usage, sans=sans)

        server = leaf("gpt2-deploy", "server", "test CA", server_auth, sans)
        client = leaf("client", "client", "test CA", client_auth)
        rogue = leaf("client", "rogue", "other CA", client_auth)
        self.ca, self.ca_key = _write(root / "ca", ca, keys["ca"])
        self.other_ca, _ = _write(root / "other-ca", other, keys["other"])
        self.server, self.server_key = _write(root / "server", server, keys["server"])
        self.client, self.client_key = _write(root / "client", client, keys["client"])
        self.rogue, self.rogue_key = _write(root / "rogue", rogue, keys["rogue"])
        server2 = leaf("gpt2-deploy", "server2", "other CA", server_auth, sans)
        self.server2, self.server2_key = _write(root / "server2", server2, keys["server2"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def token_file(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """Two accepted tokens (a rotation in progress), with a comment and blank lines."""
    return token_file(tmp_path_factory.mktemp("tokens") / "tokens", "# rotated 2024-06", TOKEN_A, "", TOKEN_B)


def serve(bundle, **security):
    return build_server(ServeOptions(bundle=bundle.root, port=0, threads=1, parity="off", **security))


@pytest.fixture(scope="module")
def tls_server(tiny_bundle, pki, tokens):
    """TLS (no client certificates) + tokens."""
    with serve(tiny_bundle, tls_cert=pki.server, tls_key=pki.server_key, auth_token_file=tokens) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(tiny_bundle, pki, tokens):
    """Mutual TLS + tokens."""
    with serve(
        tiny_bundle,
        tls_cert=pki.server,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
        auth_token_file=tokens,
    ) as running:
        yield running


def local(server) -> str:
    return f"127.0.0.1:{server.port}"


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# --- options -------------------------------------------------------------------------------------
def test_bad_security_options_name_every_file(pki, tmp_path, tiny_bundle):
    missing = tmp_path / "nope.crt"
    not_pem = token_file(tmp_path / "junk.crt", "not a certificate")
    empty = token_file(tmp_path / "empty", "# only a comment", "")
    with pytest.raises(OptionsError) as info:
        SecurityOptions(tls_cert=missing, tls_key=not_pem, tls_client_ca=tmp_path).check()
    message = str(info.value)
    assert f"tls_cert {missing}: no such file" in message
    assert f"tls_key {not_pem}: not a PEM file with a PRIVATE KEY block" in message
    assert f"tls_client_ca {tmp_path}: is a directory" in message
    with pytest.raises(OptionsError, match="does not match the certificate"):
        SecurityOptions(tls_cert=pki.server, tls_key=pki.client_key).check()
    with pytest.raises(OptionsError) as info:
        SecurityOptions(tls_key=pki.server_key, auth_token_file=empty, auth_health=True).check()
    message = str(info.value)
    assert "tls_key needs tls_cert" in message and f"auth_token_file {empty}: holds no token" in message
    with pytest.raises(OptionsError, match="tls_client_ca needs tls_cert and tls_key"):
        SecurityOptions(tls_client_ca=pki.ca).check()
    with pytest.raises(OptionsError, match="auth_health needs auth_token_file"):
        SecurityOptions(auth_health=True).check()
    bad = token_file(tmp_path / "bad", TOKEN_A, "two words")
    with pytest.raises(OptionsError, match=r"line\(s\) 2 are not valid tokens") as info:
        SecurityOptions(auth_token_file=bad).check()
    assert TOKEN_A not in str(info.value)  # a token file's problems never quote it
    SecurityOptions(
        tls_cert=pki.server, tls_key=pki.server_key, tls_client_ca=pki.ca
    ).check()  # good ones pass

    # build_server refuses them, and `serve` exits 2 with the file named, before loading anything
    with pytest.raises(OptionsError, match="tls_cert"):
        serve(tiny_bundle, tls_cert=missing, tls_key=pki.server_key)
    res = runner.invoke(
        app,
        [
            "serve",
            str(tiny_bundle.root),
            "--port",
            "0",
            "--tls-cert",
            str(missing),
            "--tls-key",
            str(pki.server_key),
        ],
    )
    assert res.exit_code == 2 and f"tls_cert {missing}: no such file" in res.output


# --- TLS -----------------------------------------------------------------------------------------
def test_tls_serves_and_plaintext_fails(tls_server, pki):
    with Gpt2DeployClient(local(tls_server), tls_ca=str(pki.ca), token=TOKEN_A, timeout=30) as c:
        assert c.health() == "SERVING"
        assert len(c.generate("Hello", max_new_tokens=3).result().token_ids) == 3
    # the certificate carries localhost too; another name fails verification unless overridden
    with Gpt2DeployClient(f"localhost:{tls_server.port}", tls_ca=str(pki.ca), token=TOKEN_A) as c:
        assert c.model_info(timeout=10).name == "tiny"
    with Gpt2DeployClient(local(tls_server), tls_ca=str(pki.ca), tls_server_name="example.com") as c:
        assert c.health(timeout=5) == "UNREACHABLE"
    with Gpt2DeployClient(local(tls_server), tls_ca=str(pki.ca), tls_server_name="localhost") as c:
        assert c.health(timeout=5) == "SERVING"
    # plaintext to the TLS port, and TLS that does not trust the test CA: no connection
    with Gpt2DeployClient(local(tls_server), token=TOKEN_A) as c:
        assert c.health(timeout=5) == "UNREACHABLE"
        assert rpc_error(lambda: c.model_info(timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    with Gpt2DeployClient(local(tls_server), tls_ca=str(pki.other_ca), token=TOKEN_A) as c:
        assert rpc_error(lambda: c.model_info(timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
    with Gpt2DeployClient(local(tls_server), tls=True, token=TOKEN_A) as c:  # system roots only
        assert rpc_error(lambda: c.model_info(timeout=5)).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_certificate_from_the_client_ca(mtls_server, pki):
    good = dict(tls_ca=str(pki.ca), tls_cert=str(pki.client), tls_key=str(pki.client_key), token=TOKEN_A)
    with Gpt2DeployClient(local(mtls_server), **good) as c:
        assert c.health() == "SERVING"
        assert c.generate("Hello", max_new_tokens=2).result().finish_reason == "length"
    for kind, extra in (
        ("no client certificate", {}),
        ("a certificate from another CA", dict(tls_cert=str(pki.rogue), tls_key=str(pki.rogue_key))),
    ):
        with Gpt2DeployClient(local(mtls_server), tls_ca=str(pki.ca), token=TOKEN_A, **extra) as c:
            err = rpc_error(lambda c=c: c.model_info(timeout=10))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (kind, err)
            assert c.health(timeout=5) == "UNREACHABLE", kind  # the handshake fails: health too


def test_certificate_files_are_reloaded_for_new_connections(tiny_bundle, pki, tmp_path, caplog):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.server, cert)
    shutil.copy(pki.server_key, key)

    def health(ca: Path) -> str:
        with Gpt2DeployClient(local(running), tls_ca=str(ca)) as c:
            return c.health(timeout=5)

    with serve(tiny_bundle, tls_cert=cert, tls_key=key) as running:
        assert health(pki.ca) == "SERVING"
        shutil.copy(pki.client_key, key)  # half a renewal: the key no longer matches
        time.sleep(1.2)
        assert health(pki.ca) == "SERVING"  # the certificate read before stays
        assert "TLS files changed but cannot be used" in caplog.text and "does not match" in caplog.text
        shutil.copy(pki.server2, cert)  # the renewal complete: a certificate from another CA
        shutil.copy(pki.server2_key, key)
        time.sleep(1.2)
        assert health(pki.other_ca) == "SERVING"
        assert health(pki.ca) == "UNREACHABLE"


def test_client_tls_files_are_checked(pki, tmp_path):
    with pytest.raises(OptionsError, match=f"tls_ca {tmp_path / 'nope'}: no such file"):
        Gpt2DeployClient("127.0.0.1:1", tls_ca=str(tmp_path / "nope"))
    with pytest.raises(OptionsError, match="tls_cert and tls_key go together"):
        Gpt2DeployClient("127.0.0.1:1", tls_ca=str(pki.ca), tls_cert=str(pki.client))
    with pytest.raises(OptionsError, match="does not match"):
        Gpt2DeployClient("127.0.0.1:1", tls_cert=str(pki.client), tls_key=str(pki.rogue_key))


# --- tokens --------------------------------------------------------------------------------------
def test_tokens_on_our_api(tls_server, pki):
    target, ca = local(tls_server), str(pki.ca)
    before = tls_server.metrics.value(
        "gpt2_deploy_errors_total", {"method": f"/{API_SERVICE}/ModelInfo", "code": "UNAUTHENTICATED"}
    )
    with Gpt2DeployClient(target, tls_ca=ca) as c:
        err = rpc_error(lambda: c.model_info(timeout=10))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, TOKEN_REQUIRED)
        err = rpc_error(lambda: c.generate("Hello", max_new_tokens=2).result())  # server streaming
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"  # health is open by default (Kubernetes probes send no token)
        # reflection too: list the services without a token
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        assert API_SERVICE in [s.name for s in answer.list_services_response.service]
    with Gpt2DeployClient(target, tls_ca=ca, token="tok-wrong") as c:
        err = rpc_error(lambda: c.model_info(timeout=10))
        assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, TOKEN_REJECTED)
        assert "tok-wrong" not in err.details()
    for token in (TOKEN_A, TOKEN_B):  # both tokens of the rotated file work
        with Gpt2DeployClient(target, tls_ca=ca, token=token) as c:
            assert c.model_info(timeout=10).name == "tiny"
            assert len(c.generate("Hello", max_new_tokens=3).result().token_ids) == 3
            assert len(c.score("Hello there").token_ids) == 2
    # not a Bearer credential, and a request that is not even a valid message: refused before it
    # is read (UNAUTHENTICATED, not a decode error)
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(pki.ca.read_bytes())) as ch:
        raw = ch.unary_unary(f"/{API_SERVICE}/ModelInfo")
        err = rpc_error(
            lambda: raw(b"\xff\xff\xff", metadata=[("authorization", f"Basic {TOKEN_A}")], timeout=10)
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = rpc_error(lambda: ch.unary_unary("/no.Such/Method")(b"", metadata=[], timeout=10))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED  # unknown methods stay unknown
    after = tls_server.metrics.value(
        "gpt2_deploy_errors_total", {"method": f"/{API_SERVICE}/ModelInfo", "code": "UNAUTHENTICATED"}
    )
    assert after - before == 3


def kserve_infer_request() -> kserve_pb.ModelInferRequest:
    ids = np.asarray([[464, 3139, 286]], dtype=np.int64)
    tensor = kserve_pb.ModelInferRequest.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, 3])
    return kserve_pb.ModelInferRequest(model_name="tiny", inputs=[tensor], raw_input_contents=[ids.tobytes()])


def test_tokens_on_kserve_unary_and_bidi_streams(mtls_server, pki):
    creds = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client.read_bytes()
    )
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.secure_channel(local(mtls_server), creds, options=options) as ch:
        stub = kserve_grpc.GRPCInferenceServiceStub(ch)
        auth = [("authorization", f"Bearer {TOKEN_B}")]
        for metadata in ([], [("authorization", "Bearer nope")]):
            err = rpc_error(
                lambda m=metadata: stub.ServerLive(kserve_pb.ServerLiveRequest(), metadata=m, timeout=10)
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            err = rpc_error(
                lambda m=metadata: stub.ModelInfer(kserve_infer_request(), metadata=m, timeout=10)
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            err = rpc_error(
                lambda m=metadata: list(
                    stub.ModelStreamInfer(iter([kserve_infer_request()]), metadata=m, timeout=10)
                )
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ServerLive(kserve_pb.ServerLiveRequest(), metadata=auth, timeout=10).live
        r = stub.ModelInfer(kserve_infer_request(), metadata=auth, timeout=30)
        assert list(r.outputs[0].shape) == [1, 3, 50257]
        (s,) = list(stub.ModelStreamInfer(iter([kserve_infer_request()]), metadata=auth, timeout=30))
        assert not s.error_message and list(s.infer_response.outputs[0].shape) == [1, 3, 50257]


def test_auth_health_and_token_file_reload(tiny_bundle, tmp_path, caplog):
    """Plaintext + tokens + --auth-health; the file is re-read when it changes; no token is logged."""
    caplog.set_level(logging.DEBUG)
    path = token_file(tmp_path / "tokens", TOKEN_A)
    with serve(tiny_bundle, auth_token_file=path, auth_health=True) as running:
        target = local(running)
        with Gpt2DeployClient(target) as c:
            assert c.health() == "UNAUTHENTICATED"
            stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)  # reflection stays open
            assert list(
                stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            )
        with Gpt2DeployClient(target, token=TOKEN_B) as c:
            assert c.health() == "UNAUTHENTICATED"
        with Gpt2DeployClient(target, token=TOKEN_A) as c:
            c.wait_until_serving(timeout=10)
            assert c.health(API_SERVICE) == "SERVING"
        # rotate: B added, later A removed; each change is picked up within the reload interval
        token_file(path, TOKEN_A, TOKEN_B)
        time.sleep(1.2)
        for token in (TOKEN_A, TOKEN_B):
            with Gpt2DeployClient(target, token=token) as c:
                assert c.health() == "SERVING", token
        token_file(path, "# A retired", TOKEN_B)
        time.sleep(1.2)
        with Gpt2DeployClient(target, token=TOKEN_A) as c:
            assert c.health() == "UNAUTHENTICATED"
        # an emptied file is not used: the tokens read before stay (and a warning says why)
        token_file(path, "")
        time.sleep(1.2)
        with Gpt2DeployClient(target, token=TOKEN_B) as c:
            assert c.health() == "SERVING"
            assert c.model_info(timeout=10).name == "tiny"
    assert "holds no token" in caplog.text and "keeping the 1 token(s)" in caplog.text
    assert "refused /grpc.health.v1.Health/Check" in caplog.text  # refusals are logged ...
    for token in (TOKEN_A, TOKEN_B):  # ... and no token ever is, in any form
        assert token not in caplog.text
        assert not any(token in str(r.args) or token in r.getMessage() for r in caplog.records)


def test_token_file_compares_every_token(tmp_path):
    tf = TokenFile(token_file(tmp_path / "t", TOKEN_A, TOKEN_B, "# c"))
    assert len(tf) == 2 and tf.accepts(TOKEN_A) and tf.accepts(TOKEN_B.encode())
    assert not tf.accepts(TOKEN_A[:-1]) and not tf.accepts("") and not tf.accepts("# c")
    assert TOKEN_A not in repr(vars(tf))  # only digests are kept


# --- the commands --------------------------------------------------------------------------------
def test_generate_and_health_commands_with_mtls_and_a_token(mtls_server, pki, tokens, tmp_path):
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client), "--tls-key", str(pki.client_key)]
    mine = token_file(tmp_path / "my-token", "# mine", TOKEN_B)
    res = runner.invoke(
        app, ["generate", "-s", local(mtls_server), "-n", "3", *tls, "--token-file", str(mine), "Hi"]
    )
    assert res.exit_code == 0, res.output
    assert "3 new tokens" in res.output
    res = runner.invoke(app, ["generate", "-s", local(mtls_server), "-n", "3", *tls, "Hi"])
    assert res.exit_code == 1 and "error: UNAUTHENTICATED: a bearer token is required" in res.output
    res = runner.invoke(app, ["health", "-s", local(mtls_server), *tls])
    assert res.exit_code == 0 and res.output.strip().endswith("SERVING")
    res = runner.invoke(app, ["health", "-s", local(mtls_server), "--tls-ca", str(pki.ca)])
    assert res.exit_code == 1 and "UNREACHABLE" in res.output  # no client certificate
    res = runner.invoke(app, ["health", "-s", local(mtls_server), *tls[:2], "--tls-cert", str(pki.client)])
    assert res.exit_code == 2 and "tls_cert and tls_key go together" in res.output
    res = runner.invoke(
        app, ["generate", "-s", local(mtls_server), *tls, "--token-file", str(tmp_path / "x"), "Hi"]
    )
    assert res.exit_code == 2 and f"--token-file {tmp_path / 'x'}: no such file" in res.output


def test_health_command_with_auth_health(tiny_bundle, tokens):
    with serve(tiny_bundle, auth_token_file=tokens, auth_health=True) as running:
        res = runner.invoke(app, ["health", "-s", local(running)])
        assert res.exit_code == 1 and "UNAUTHENTICATED" in res.output
        res = runner.invoke(app, ["health", "-s", local(running), "--token-file", str(tokens)])
        assert res.exit_code == 0 and "SERVING" in res.output


def test_entrypoint_health_passes_tls_flags(mtls_server, pki):
    """The images' HEALTHCHECK (`entrypoint.sh health`) against a mutual-TLS server."""
    entrypoint = HERE.parents[1] / "deploy" / "images" / "entrypoint.sh"
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2_DEPLOY_")}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", GPT2_DEPLOY_PORT=str(mtls_server.port))
    flags = (
        f"--tls-ca {pki.ca} --tls-server-name localhost --tls-cert {pki.client} --tls-key {pki.client_key}"
    )
    run = lambda **extra: subprocess.run(  # noqa: E731
        [str(entrypoint), "health"], env={**env, **extra}, capture_output=True, text=True, timeout=60
    )
    ok = run(GPT2_DEPLOY_HEALTH_ARGS=flags)
    assert (ok.returncode, ok.stdout.strip()) == (0, f"127.0.0.1:{mtls_server.port} (server): SERVING"), ok
    plain = run()
    assert plain.returncode == 1 and "UNREACHABLE" in plain.stdout, plain


# --- tritonclient ----------------------------------------------------------------------------------
def test_tritonclient_with_mutual_tls_and_headers(mtls_server, pki, tokens):
    if importlib.util.find_spec("tritonclient") is None:  # never imported here: see the script
        pytest.skip("tritonclient[grpc] (a dev dependency) is not installed")
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "triton_client_tls_check.py"),
            local(mtls_server),
            "tiny",
            str(pki.ca),
            str(pki.client),
            str(pki.client_key),
            str(tokens),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for key in ("live_no_token", "live_wrong_token", "infer_no_token", "stream_no_token"):
        assert out[key]["error"][0] == "StatusCode.UNAUTHENTICATED", (key, out[key])
    assert out["live"] == {"ok": True} and out["ready"] == {"ok": True}
    assert out["metadata_inputs"]["ok"][0] == "input_ids"
    assert out["infer_shape"] == {"ok": [1, 5, 50257]}
    rt = mtls_server.runtime
    greedy = rt.generator.generate(GenerationRequest(rt.encode("Hello, my name is"), 6)).text
    assert out["generate"] == {"ok": greedy} and out["stream"] == {"ok": greedy}
    assert out["no_client_cert"]["error"][0] == "StatusCode.UNAVAILABLE"
