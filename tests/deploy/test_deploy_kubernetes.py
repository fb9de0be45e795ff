"""deploy/kubernetes: the manifests as ``kubectl apply -k`` would send them, validated offline.

- The kustomization is rendered here (its resources, its configMapGenerator, its images), the
  subset of kustomize it uses.
- Built-in kinds: kubernetes-validate's schemas of ``KUBERNETES_VERSION`` in strict mode (an
  unknown field is an error).
- The ServiceMonitor: the models of the prometheus-operator CRD's OpenAPI schema
  (cloudcoil-models-prometheus-operator, generated from the operator's CRDs): types and
  patterns are checked by validation, unknown fields by comparing the object with what the
  model kept of it.
- What the schemas cannot say: probes on the admin port, the grace period above fastproxy's
  drain, non-root and read-only root, selectors that match, the ConfigMap's configuration
  passing ``fastproxy check``, and the reloader sidecar reloading a real fastproxy on a change.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor
from pydantic import ValidationError
from support.certs import Authority
from support.proxy import ProxyFactory

from fastproxy import config

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
#: the oldest Kubernetes release the manifests are meant for (autoscaling/v2, policy/v1, and
#: the HPA's behavior field are older)
KUBERNETES_VERSION = "1.29"

Object = dict[str, Any]


# -- rendering the kustomization ----------------------------------------------------------------


def kustomization() -> Object:
    loaded: Object = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    return loaded


def render() -> list[Object]:
    """The objects of ``kubectl kustomize deploy/kubernetes``, for the features it uses."""
    spec = kustomization()
    assert set(spec) <= {"apiVersion", "kind", "resources", "configMapGenerator", "images"}, (
        "the kustomization uses a feature this rendering does not know"
    )
    objects: list[Object] = []
    for generator in spec.get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash") is True, "a hashed name is not rendered here"
        data = {name: (KUBERNETES / name).read_text() for name in generator["files"]}
        metadata: Object = {"name": generator["name"]}
        if "labels" in options:
            metadata["labels"] = options["labels"]
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        )
    for resource in spec["resources"]:
        objects.extend(d for d in yaml.safe_load_all((KUBERNETES / resource).read_text()) if d)
    images = {image["name"]: image for image in spec.get("images", [])}
    for obj in objects:
        for container in containers(obj):
            name = container["image"].split(":")[0]
            if name in images:
                image = images[name]
                container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return objects


def containers(obj: Object) -> list[Object]:
    if obj["kind"] != "Deployment":
        return []
    found: list[Object] = obj["spec"]["template"]["spec"]["containers"]
    return found


def one(objects: list[Object], kind: str, name: str | None = None) -> Object:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def test_kustomization_lists_every_manifest() -> None:
    spec = kustomization()
    listed = set(spec["resources"])
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = sorted(o["kind"] for o in render())
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceMonitor",
        ]
    )


# -- schemas ------------------------------------------------------------------------------------


def validate_builtin(obj: Object) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_service_monitor(obj: Object) -> None:
    """Validate against the CRD's models; a field the models do not know is an error too."""
    model = ServiceMonitor.model_validate(obj)
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert kept == obj, f"fields the ServiceMonitor CRD does not have: {kept} != {obj}"


@pytest.mark.parametrize(
    "obj", [o for o in render() if o["kind"] != "ServiceMonitor"], ids=lambda o: o["kind"]
)
def test_builtin_kinds_validate(obj: Object) -> None:
    validate_builtin(obj)


def test_service_monitor_validates_against_the_crd() -> None:
    validate_service_monitor(one(render(), "ServiceMonitor"))


def test_validation_refuses_bad_objects() -> None:
    """Both validations can fail: a wrong type, an unknown field, a malformed duration."""
    objects = render()
    deployment = one(objects, "Deployment")
    bad = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(bad)
    pdb = one(objects, "PodDisruptionBudget")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin({**pdb, "spec": {**pdb["spec"], "minAvailabel": 1}})
    monitor = one(objects, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    with pytest.raises(ValidationError):
        validate_service_monitor(
            {
                **monitor,
                "spec": {**monitor["spec"], "endpoints": [{**endpoint, "interval": "15 s"}]},
            }
        )
    with pytest.raises(AssertionError, match="fields the ServiceMonitor CRD does not have"):
        validate_service_monitor(
            {**monitor, "spec": {**monitor["spec"], "endpoints": [{**endpoint, "intervall": "1m"}]}}
        )


# -- what the schemas cannot say ----------------------------------------------------------------


def fastproxy_toml() -> str:
    text: str = one(render(), "ConfigMap", "fastproxy")["data"]["fastproxy.toml"]
    return text


def test_configmap_configuration_passes_check(tmp_path: Path) -> None:
    text = fastproxy_toml()
    pair = Authority(tmp_path / "pki").issue("gateway.example.com")
    # the projected volume puts the Secret's tls.crt and tls.key beside fastproxy.toml
    for key in ("tls.crt", "tls.key"):
        assert f'"/etc/fastproxy/{key}"' in text
    path = tmp_path / "fastproxy.toml"
    path.write_text(
        text.replace("/etc/fastproxy/tls.crt", str(pair.cert)).replace(
            "/etc/fastproxy/tls.key", str(pair.key)
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "fastproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _port(container: Object, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name])


def test_deployment_probes_the_admin_listener() -> None:
    document = tomllib.loads(fastproxy_toml())
    container = containers(one(render(), "Deployment"))[0]
    assert container["name"] == "fastproxy"
    bind = str(document["admin"]["bind"])
    host, port = bind.rsplit(":", 1)
    assert host == "0.0.0.0", "the kubelet probes the pod's IP: the admin must not bind loopback"
    assert _port(container, "admin") == int(port)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "admin"}
    for name in ("sdk", "agent"):
        listener = document["listeners"][name]
        assert _port(container, name) == int(str(listener["bind"]).rsplit(":", 1)[1])


def test_grace_period_covers_the_drain() -> None:
    document = tomllib.loads(fastproxy_toml())
    graceful = float(document.get("graceful_timeout_s", config.GRACEFUL_TIMEOUT_S))
    spec = one(render(), "Deployment")["spec"]["template"]["spec"]
    container = containers(one(render(), "Deployment"))[0]
    command = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    match = re.search(r"time\.sleep\((\d+(?:\.\d+)?)\)", command)
    assert match, command
    pause = float(match[1])
    assert spec["terminationGracePeriodSeconds"] >= pause + graceful + 5


def test_pods_run_non_root_with_a_read_only_root() -> None:
    deployment = one(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["shareProcessNamespace"] is True, "the reloader signals the master"
    for container in containers(deployment):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "resources" in container and "requests" in container["resources"]
        name, _, tag = container["image"].rpartition(":")
        assert name and tag and tag != "latest", container["image"]
        for mount in container.get("volumeMounts", []):
            assert "subPath" not in mount, "a subPath mount never sees a ConfigMap update"
    fastproxy = containers(deployment)[0]
    env = {e["name"]: e["value"] for e in fastproxy["env"]}
    mounts = {m["mountPath"] for m in fastproxy["volumeMounts"]}
    assert Path(env["PROMETHEUS_MULTIPROC_DIR"]).parent.as_posix() in mounts
    assert "/tmp" in mounts


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_selectors_and_references_match() -> None:
    objects = render()
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(
        one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels
    )
    target = one(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    port_names = {p["name"] for c in containers(deployment) for p in c.get("ports", [])}
    services = [o for o in objects if o["kind"] == "Service"]
    for service in services:
        assert _matches(service["spec"]["selector"], pod_labels)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, port
    monitor = one(objects, "ServiceMonitor")["spec"]
    scraped = [
        s for s in services if _matches(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["fastproxy"], "job=fastproxy in the alerts"
    assert {p["name"] for p in scraped[0]["spec"]["ports"]} >= {
        e["port"] for e in monitor["endpoints"]
    }
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    sources = volumes["config"]["projected"]["sources"]
    assert (
        sources[0]["configMap"]["name"]
        == one(objects, "ConfigMap", "fastproxy")["metadata"]["name"]
    )
    reloader = one(objects, "ConfigMap", "fastproxy-reloader")
    assert volumes["reloader"]["configMap"]["name"] == reloader["metadata"]["name"]
    sidecar = containers(deployment)[1]
    assert sidecar["command"][-1] == "/reloader/" + next(iter(reloader["data"]))


# -- the reloader sidecar, against a real fastproxy ---------------------------------------------


@pytest.mark.e2e
def test_reloader_reloads_the_master_on_a_change(factory: ProxyFactory, tmp_path: Path) -> None:
    proxy = factory()
    workers = sorted(proxy.worker_pids())
    assert workers
    script = KUBERNETES / "reload-on-change.sh"
    env = dict(os.environ)
    env.update(
        FASTPROXY_CONFIG=str(proxy.config_path),
        RELOAD_WATCH=str(proxy.config_path),
        RELOAD_INTERVAL_S="0.2",
    )
    log = tmp_path / "reloader.log"
    with log.open("wb") as err:
        reloader = subprocess.Popen(
            ["/bin/sh", str(script)], env=env, stdin=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.monotonic() + 30
        while b"watching" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        proxy.config_path.write_text(proxy.config_path.read_text() + "\n# changed\n")
        proxy.wait_for_message("generation 2 applied by every worker")
        assert f"SIGHUP sent to the fastproxy master ({proxy.pid})" in log.read_text()
        # a reload, not a restart: the same workers, and no signal reached them
        assert sorted(proxy.worker_pids()) == workers
        assert proxy.process.poll() is None
    finally:
        reloader.send_signal(signal.SIGTERM)
        reloader.wait(timeout=30)
