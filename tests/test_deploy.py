"""Deployment files agree with each other and with `condgen serve`.

The Kubernetes manifests (deploy/kubernetes/) and the Dockerfile are parsed, not applied or
built: these tests check the fields that must match (selectors and labels, ports, probes, the
termination grace against --grace-seconds, the bundle mount against --bundle) and that every
argument handed to `condgen serve` is one its parser accepts.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml

from condgen.cli import build_parser

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
KUSTOMIZED = ("pvc.yaml", "deployment.yaml", "service.yaml", "pdb.yaml")


# --- helpers -----------------------------------------------------------------------------------


def load_docs(name: str) -> list[dict]:
    with open(K8S / name, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def only(name: str, kind: str) -> dict:
    docs = [d for d in load_docs(name) if d["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def flag_value(args: list[str], flag: str) -> str:
    """The value after `flag` in an argv list (`--flag value` or `--flag=value`)."""
    for i, arg in enumerate(args):
        if arg == flag:
            assert i + 1 < len(args), f"{flag} has no value in {args}"
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} missing from {args}")


def parse_serve(args: list[str]):
    """Parse `condgen serve ARGS` with the real CLI parser; unknown flags or bad values fail."""
    parser = build_parser()
    try:
        parsed, unknown = parser.parse_known_args(["serve", *args])
    except SystemExit as exc:  # argparse exits on a bad value or a missing required flag
        pytest.fail(f"`condgen serve {shlex.join(args)}` does not parse (exit {exc.code}); see stderr")
    assert not unknown, f"`condgen serve` has no flag(s) {unknown}"
    return parsed


def is_selected(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(scope="module")
def deployment() -> dict:
    return only("deployment.yaml", "Deployment")


@pytest.fixture(scope="module")
def pod_spec(deployment) -> dict:
    return deployment["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod_spec) -> dict:
    containers = pod_spec["containers"]
    assert len(containers) == 1, "the tests expect one container: the condgen server"
    return containers[0]


@pytest.fixture(scope="module")
def args(container) -> list[str]:
    assert "command" not in container, "keep the image's ENTRYPOINT (`condgen serve`); set args only"
    return [str(a) for a in container["args"]]


def container_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name in ports, f"the container has no port named {name!r} ({sorted(ports)})"
    return ports[name]


def resolve_port(container: dict, port: int | str) -> int:
    return container_port(container, port) if isinstance(port, str) else port


# --- Kubernetes manifests ----------------------------------------------------------------------


def test_kinds_and_api_versions():
    expected = {
        "deployment.yaml": [("apps/v1", "Deployment")],
        "service.yaml": [("v1", "Service"), ("v1", "Service")],
        "pdb.yaml": [("policy/v1", "PodDisruptionBudget")],
        "pvc.yaml": [("v1", "PersistentVolumeClaim")],
        "bundle-loader.yaml": [("v1", "Pod")],
    }
    for name, kinds in expected.items():
        found = [(d["apiVersion"], d["kind"]) for d in load_docs(name)]
        assert found == kinds, name


def test_kustomization_lists_the_manifests():
    kustomization = load_docs("kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    assert list(kustomization["resources"]) == list(KUSTOMIZED)
    for name in kustomization["resources"]:
        assert (K8S / name).is_file(), name
    images = [image["name"] for image in kustomization.get("images", [])]
    assert all(name == "condgen" for name in images)


def test_selectors_match_the_pod_labels(deployment):
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and is_selected(selector, labels), "the Deployment's selector misses its own pods"
    grpc_service = load_docs("service.yaml")[0]
    for service in load_docs("service.yaml"):
        assert service["spec"]["selector"] == selector, service["metadata"]["name"]
    pdb_selector = only("pdb.yaml", "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
    assert pdb_selector == selector
    for spread in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert spread["labelSelector"]["matchLabels"] == selector
    assert grpc_service["metadata"]["name"] == deployment["metadata"]["name"] == "condgen"


def test_one_gpu_per_pod(container, args):
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"].get("nvidia.com/gpu", 1)) == 1
    for key in ("cpu", "memory"):
        assert key in resources["requests"], f"request {key}: the scheduler needs it"
    assert container["image"].split(":")[0].rsplit("/", 1)[-1] == "condgen"
    assert flag_value(args, "--device") in ("cuda", "auto")


def test_threads_match_the_cpu_request(container, args):
    # ONNX Runtime's default is one thread per core of the node, not of the pod.
    assert int(flag_value(args, "--threads")) == int(container["resources"]["requests"]["cpu"])


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe", "startupProbe"])
def test_probes_are_grpc_health_checks_on_the_grpc_port(container, args, probe):
    spec = container[probe]
    assert set(spec) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, f"{probe} must be a grpc probe"
    assert spec["grpc"].get("service", "") == "", "the server reports SERVING for service ''"
    assert isinstance(spec["grpc"]["port"], int), "grpc probes take a port number, not a name"
    assert spec["grpc"]["port"] == container_port(container, "grpc") == int(flag_value(args, "--port"))


def test_startup_probe_allows_a_slow_model_load(container):
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_termination_grace_outlasts_the_drain(pod_spec, args):
    grace = float(flag_value(args, "--grace-seconds"))
    assert pod_spec["terminationGracePeriodSeconds"] > grace, (
        "the kubelet would SIGKILL the server before its drain ends"
    )


def test_bundle_is_a_read_only_mounted_volume(pod_spec, container, args):
    bundle = flag_value(args, "--bundle")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert bundle in mounts, f"--bundle {bundle} is not a mount path ({sorted(mounts)})"
    mount = mounts[bundle]
    assert mount.get("readOnly") is True
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    claim = volumes[mount["name"]]["persistentVolumeClaim"]
    assert claim["claimName"] == only("pvc.yaml", "PersistentVolumeClaim")["metadata"]["name"] == "condgen-bundle"
    loader = only("bundle-loader.yaml", "Pod")["spec"]
    assert [v["persistentVolumeClaim"]["claimName"] for v in loader["volumes"]] == [claim["claimName"]]


def test_writable_paths_are_volumes_under_a_read_only_root(pod_spec, container):
    if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts
        assert {v["name"] for v in pod_spec["volumes"]} >= {m["name"] for m in container["volumeMounts"]}


def test_runs_as_non_root(pod_spec, container):
    pod_security = pod_spec["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security.get("runAsUser", 10001) != 0
    container_security = container.get("securityContext", {})
    assert container_security.get("runAsNonRoot", True) is True
    assert container_security.get("runAsUser", 10001) != 0
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_service_is_headless_on_the_grpc_port(container, args):
    service = load_docs("service.yaml")[0]
    assert service["metadata"]["name"] == "condgen"
    assert service["spec"]["clusterIP"] == "None", "round_robin over dns:/// needs one A record per pod"
    (port,) = service["spec"]["ports"]
    grpc_port = container_port(container, "grpc")
    assert resolve_port(container, port["targetPort"]) == grpc_port
    # Headless: clients dial the pod IPs from DNS, so the service port is the container's port.
    assert port["port"] == grpc_port == int(flag_value(args, "--port"))


def test_metrics_port_is_scraped(deployment, container, args):
    metrics = container_port(container, "metrics")
    assert int(flag_value(args, "--metrics-port")) == metrics
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics
    service = [s for s in load_docs("service.yaml") if s["metadata"]["name"] == "condgen-metrics"][0]
    (port,) = service["spec"]["ports"]
    assert resolve_port(container, port["targetPort"]) == metrics


def test_pdb_allows_draining_one_pod(deployment):
    spec = only("pdb.yaml", "PodDisruptionBudget")["spec"]
    assert ("maxUnavailable" in spec) != ("minAvailable" in spec)
    if "minAvailable" in spec:  # minAvailable 1 with one replica would block every node drain
        assert deployment["spec"]["replicas"] > int(spec["minAvailable"])
    else:
        assert int(spec["maxUnavailable"]) >= 1


def test_manifest_args_are_real_serve_flags(args):
    parsed = parse_serve(args)
    assert str(parsed.bundle) == flag_value(args, "--bundle")
    assert parsed.host == "0.0.0.0", "bind all interfaces: probes and clients come from outside the pod"
    assert parsed.port == int(flag_value(args, "--port"))
    assert parsed.grace_seconds == float(flag_value(args, "--grace-seconds"))


# --- Dockerfile --------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [value for key, value in self.instructions if key == keyword]
        return values[-1] if values else None

    def all(self, keyword: str) -> list[str]:
        return [value for key, value in self.instructions if key == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    """Stages of a Dockerfile: continuation lines joined, comments and parser directives dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.strip().partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", value, re.IGNORECASE)
            assert match, f"cannot read FROM {value}"
            stages.append(Stage(match.group(1), match.group(2)))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, value))
    return stages


def exec_form(value: str) -> list[str]:
    assert value.startswith("["), f"use the JSON (exec) form, so that signals reach condgen: {value}"
    return json.loads(value)


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    parsed = dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(parsed) >= 2, "multi-stage: a builder and the runtime images"
    named = {s.name: s for s in parsed}
    assert {"builder", "cpu", "gpu"} <= set(named), f"stages: {[s.name for s in parsed]}"
    assert parsed[-1].name == "gpu", "`docker build .` builds the last stage: it must be the GPU image"
    return named


def test_dockerfile_bases(stages):
    assert stages["gpu"].base.startswith("nvidia/cuda:") and "runtime" in stages["gpu"].base
    assert stages["cpu"].base.startswith("python:") and "slim" in stages["cpu"].base
    for stage in stages.values():
        assert ":" in stage.base and not stage.base.endswith(":latest"), f"pin a tag: {stage.base}"


def test_builder_copies_every_package_folder(stages):
    # A package folder missing from the build context fails `pip wheel` ("package directory ... does not exist").
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = {path.split("/")[0] for path in config["tool"]["setuptools"]["package-dir"].values()}
    copied = set()
    for value in stages["builder"].all("COPY"):
        parts = value.split()
        copied.update(p.rstrip("/").removeprefix("./") for p in parts[:-1] if not p.startswith("--"))
    assert folders | {"pyproject.toml", "setup.py", "protos"} <= copied, sorted(folders - copied)
    readme = config["project"].get("readme")
    if readme:
        assert readme in copied
    assert any("pip wheel" in run for run in stages["builder"].all("RUN"))


@pytest.mark.parametrize("target, extra, device", [("cpu", "serve", "cpu"), ("gpu", "gpu", "auto")])
def test_runtime_stages(stages, target, extra, device):
    stage = stages[target]
    install = " ".join(stage.all("RUN"))
    assert "from=builder" in install or any("--from=builder" in c for c in stage.all("COPY")), (
        f"{target} installs the builder's wheel"
    )
    assert f"[{extra}]" in install, f"{target} installs the `{extra}` extra"
    assert "grpcio-tools" not in install and "torch" not in install

    user = stage.last("USER")
    assert user is not None, f"{target}: no USER, the server would run as root"
    assert user.split(":")[0] not in ("root", "0")

    assert exec_form(stage.last("ENTRYPOINT")) == ["condgen", "serve"]
    cmd = exec_form(stage.last("CMD"))
    parsed = parse_serve(cmd)
    assert str(parsed.bundle) == "/bundle" and parsed.host == "0.0.0.0" and parsed.device == device

    exposed = {int(p.split("/")[0]) for value in stage.all("EXPOSE") for p in value.split()}
    assert {parsed.port, int(flag_value(cmd, "--metrics-port"))} <= exposed

    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck is not None, f"{target}: no HEALTHCHECK"
    probe = exec_form(healthcheck.split(" CMD ", 1)[1].strip())
    assert probe[:2] == ["condgen", "health"]
    health_args = build_parser().parse_args(probe[1:])
    assert health_args.target == f"127.0.0.1:{parsed.port}"


def test_dockerfile_header_documents_the_bundle_mount():
    header = DOCKERFILE.read_text(encoding="utf-8").split("\nFROM ", 1)[0]
    assert "/bundle" in header and "read-only" in header and "--target cpu" in header
