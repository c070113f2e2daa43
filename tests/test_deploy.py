"""deploy/ validated offline (no container engine or cluster here): the compose file against the
compose-spec schema, every Kubernetes manifest with kubernetes-validate --strict, the generated base
fresh, and every variable and port in them one the services really read."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from runtime.config import DEFAULT_PORT_BASE, SUITE_PLACES, SecuritySettings
from tools import deploy_manifests

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def known_variables() -> set[str]:
    """Every environment variable a service, coinsctl or the OpenTelemetry SDK reads."""
    names = {f"COINS_{f.upper()}" for f in SecuritySettings.model_fields} | {"COINS_PORT_BASE"}
    for settings in deploy_manifests.SETTINGS.values():
        prefix = str(settings.model_config.get("env_prefix", ""))
        names |= {f"{prefix}{field.upper()}" for field in settings.model_fields}
    return names | {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"}


def test_the_generated_base_is_fresh() -> None:
    for name, text in deploy_manifests.files().items():
        path = DEPLOY / "k8s" / "base" / name
        assert path.exists() and path.read_text() == text, (
            f"{path} is stale: run python -m tools.deploy_manifests"
        )


def test_every_manifest_is_valid_kubernetes() -> None:
    manifests = sorted((DEPLOY / "k8s").rglob("*.yaml"))
    manifests = [p for p in manifests if p.name != "kustomization.yaml"]
    assert len(manifests) >= 10
    done = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", *map(str, manifests)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_overlay_renders_to_valid_kubernetes(tmp_path: Path) -> None:
    """With kubectl's kustomize where the machine has it (the pieces are validated above either
    way)."""
    kubectl = shutil.which("kubectl")
    overlays = sorted((DEPLOY / "k8s" / "overlays").iterdir())
    assert [o.name for o in overlays] == ["dev", "prod"]
    if kubectl is None:
        return
    for overlay in overlays:
        rendered = subprocess.run(
            [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
        )
        assert rendered.returncode == 0, rendered.stderr
        out = tmp_path / f"{overlay.name}.yaml"
        out.write_text(rendered.stdout)
        checked = subprocess.run(
            [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        objects = documents(out)
        if overlay.name == "prod":
            settings = [
                o
                for o in objects
                if o["kind"] == "ConfigMap" and "settings" in o["metadata"]["name"]
            ]
            for config in settings:
                data = config["data"]
                assert any(k.endswith("_REFLECTION") and v == "false" for k, v in data.items())
                assert data["COINS_DEV_PKI"] == "false"
                assert data["COINS_JWT_ISSUER"] != "coins-dev"
            images = {
                c["image"]
                for o in objects
                if o["kind"] == "Deployment"
                for c in o["spec"]["template"]["spec"]["containers"]
            }
            assert "registry.example.com/coins:1.0.0" in images


def test_every_service_pod_can_write_its_data_dir() -> None:
    """The image points every <SVC>_DATA_DIR at one folder and the pods' root filesystem is
    read-only: each Deployment mounts a writable volume there (R6: the wallet and payout crashed at
    start, unable to open their sandbox processors' files)."""
    image = dict(re.findall(r"(\w+)_DATA_DIR=(\S+)", (DEPLOY / "Dockerfile").read_text()))
    assert set(image) == {name.upper() for name in deploy_manifests.SETTINGS}, image
    for name in deploy_manifests.SETTINGS:
        (deployment,) = [
            d
            for d in documents(DEPLOY / "k8s" / "base" / f"{name}.yaml")
            if d["kind"] == "Deployment"
        ]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert image[name.upper()] in writable, (name, writable)


def test_each_service_pod_mounts_only_its_own_certificate_secret() -> None:
    """One Secret per service's identity: every pod mounting one `coins-certs` held every service's
    private key, so a compromised promotion pod could call payout as gifting and credit diamonds
    with no gift (review r25)."""
    mounted = {}
    for name in deploy_manifests.SETTINGS:
        (deployment,) = [
            d
            for d in documents(DEPLOY / "k8s" / "base" / f"{name}.yaml")
            if d["kind"] == "Deployment"
        ]
        pod = deployment["spec"]["template"]["spec"]
        secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        mounted[name] = secrets - {"coins-jwt-keys"}
    assert mounted == {name: {f"coins-{name}-certs"} for name in deploy_manifests.SETTINGS}


def test_the_migrations_job_makes_way_for_the_next_rollouts() -> None:
    """A Job's pod template cannot change, so the next `kubectl apply` with a new image would be
    refused while the last rollout's Job exists (review A4): it deletes itself once finished."""
    (job,) = documents(DEPLOY / "k8s" / "base" / "migrations-job.yaml")
    assert job["kind"] == "Job"
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 3600


def test_the_compose_file_is_valid_compose_spec() -> None:
    done = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose" / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_variables_and_ports_match_the_services_settings() -> None:
    known = known_variables()
    used: dict[str, set[str]] = {}
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        for doc in documents(path):
            if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"].endswith("-settings"):
                used.setdefault(str(path), set()).update(doc["data"])
            for container in _containers(doc):
                used.setdefault(str(path), set()).update(
                    e["name"] for e in container.get("env", [])
                )
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    ours = {"certs", *SUITE_PLACES}  # the others are PostgreSQL, the collector and Jaeger
    for name, service in compose["services"].items():
        if name in ours:
            used.setdefault(f"compose:{name}", set()).update(service.get("environment", {}))
    for where, names in used.items():
        assert names <= known, f"{where}: {sorted(names - known)} are read by no service"
    # Ports: what each Deployment exposes and probes is what its service listens on.
    for name, place in SUITE_PLACES.items():
        (deployment,) = [
            d
            for d in documents(DEPLOY / "k8s" / "base" / f"{name}.yaml")
            if d["kind"] == "Deployment"
        ]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        exposed = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert exposed == {
            "grpc": DEFAULT_PORT_BASE + place,
            "health": DEFAULT_PORT_BASE + 10 + place,
            "metrics": DEFAULT_PORT_BASE + 20 + place,
        }
        assert container["readinessProbe"]["grpc"]["port"] == exposed["health"]
        (settings,) = [
            d
            for d in documents(DEPLOY / "k8s" / "base" / f"{name}.yaml")
            if d["kind"] == "ConfigMap"
        ]
        assert settings["data"][f"{name.upper()}_METRICS_PORT"] == str(exposed["metrics"])
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(exposed["metrics"])
        assert container["args"] == [f"services.{name}"]
        compose_ports = compose["services"][name]["ports"]
        assert compose_ports == [f"{exposed['grpc']}:{exposed['grpc']}"]


def test_payout_off_a_dev_pki_is_given_a_webhook_secret_of_its_own() -> None:
    """Compose and Kubernetes run the services with COINS_DEV_PKI=false, where payout refuses the
    public default webhook secret: compose takes it from the environment it is started in (no
    default: `docker compose up` without it stops saying what to set), Kubernetes from a Secret."""
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    environment = compose["services"]["payout"]["environment"]
    assert environment["COINS_DEV_PKI"] == "false"
    secret = environment.get("PAYOUT_PROCESSOR_WEBHOOK_SECRET", "")
    assert secret.startswith("${PAYOUT_PROCESSOR_WEBHOOK_SECRET:?") and secret.endswith("}")
    docs = documents(DEPLOY / "k8s" / "base" / "payout.yaml")
    (settings,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert settings["data"]["COINS_DEV_PKI"] == "false"
    assert "PAYOUT_PROCESSOR_WEBHOOK_SECRET" not in settings["data"]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = _containers(deployment)
    (from_secret,) = [e for e in container["env"] if e["name"] == "PAYOUT_PROCESSOR_WEBHOOK_SECRET"]
    assert (
        from_secret["valueFrom"]["secretKeyRef"]["name"] == "coins-payout-processor-webhook-secret"
    )


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    template = spec.get("template", {}).get("spec", {})
    return list(template.get("containers", []))
