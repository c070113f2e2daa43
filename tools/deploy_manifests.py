"""`python -m tools.deploy_manifests`: write deploy/k8s/base from the services' own settings.

Each service gets a ServiceAccount, a ConfigMap of its settings, a Deployment (gRPC readiness and
liveness probes on the health port, requests and limits, a hardened security context), a headless
Service (clients resolve every pod and spread their calls), a PodDisruptionBudget and a
HorizontalPodAutoscaler; one Job runs every service's migrations before a rollout; the OpenTelemetry
Collector runs as its own Deployment. Ports, variable names and downstream addresses come from the
settings classes, so the manifests cannot drift from the code (`--check` fails if the committed files
are stale; CI runs it, and tests/test_deploy.py validates them offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr

from runtime.config import DEFAULT_PORT_BASE, SUITE_PLACES, ServiceSettings
from runtime.health import LIVENESS
from services.gifting.settings import GiftingSettings
from services.payout.settings import PayoutSettings
from services.promotion.settings import PromotionSettings
from services.wallet.settings import WalletSettings

BASE = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "base"
SETTINGS: dict[str, type[ServiceSettings]] = {
    "wallet": WalletSettings,
    "gifting": GiftingSettings,
    "payout": PayoutSettings,
    "promotion": PromotionSettings,
}
CERTS_DIR = "/etc/coins/certs"
JWT_DIR = "/etc/coins/jwt"
DATA_DIR = "/var/lib/coins"
"""Where the image points every <SVC>_DATA_DIR (deploy/Dockerfile)."""
COLLECTOR = "http://otel-collector:4317"


def ports(name: str) -> tuple[int, int]:
    place = SUITE_PLACES[name]
    return DEFAULT_PORT_BASE + place, DEFAULT_PORT_BASE + 10 + place


def metrics_port(name: str) -> int:
    """The Prometheus scrape port (`<SVC>_METRICS_PORT`): 20 above the API's."""
    return DEFAULT_PORT_BASE + 20 + SUITE_PLACES[name]


def labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "coins"}


def config(name: str) -> dict[str, str]:
    """The service's settings in its ConfigMap (database URL and keys come from Secrets)."""
    settings = SETTINGS[name]
    prefix = str(settings.model_config.get("env_prefix", ""))
    api, health = ports(name)
    data = {
        f"{prefix}HOST": "0.0.0.0",
        f"{prefix}PORT": str(api),
        f"{prefix}HEALTH_PORT": str(health),
        f"{prefix}METRICS_PORT": str(metrics_port(name)),
        f"{prefix}MIGRATE_ON_START": "false",
        f"{prefix}LOG_FORMAT": "json",
        "COINS_CERTS_DIR": CERTS_DIR,
        "COINS_JWT_KEYS_DIR": JWT_DIR,
        "COINS_DEV_PKI": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": COLLECTOR,
    }
    for field in sorted(settings.model_fields):
        if field.endswith("_address"):
            target = field.removesuffix("_address")
            data[f"{prefix}{field.upper()}"] = f"dns:///{target}:{ports(target)[0]}"
    return data


def database_env(name: str) -> dict[str, Any]:
    prefix = str(SETTINGS[name].model_config.get("env_prefix", ""))
    return {
        "name": f"{prefix}DATABASE_URL",
        "valueFrom": {"secretKeyRef": {"name": f"coins-{name}-database", "key": "url"}},
    }


def secret_envs(name: str) -> list[dict[str, Any]]:
    """The service's secret settings (SecretStr: the payout webhook's signing key), each from a
    Secret `coins-<service>-<setting>` (key `value`), never from the ConfigMap or a default."""
    settings = SETTINGS[name]
    prefix = str(settings.model_config.get("env_prefix", ""))
    return [
        {
            "name": f"{prefix}{field.upper()}",
            "valueFrom": {
                "secretKeyRef": {"name": f"coins-{name}-{field.replace('_', '-')}", "key": "value"}
            },
        }
        for field, info in sorted(settings.model_fields.items())
        if info.annotation is SecretStr
    ]


SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def certs_secret(name: str) -> str:
    """The service's own certificate Secret: `ca.pem`, `<service>.pem`, `<service>-key.pem`. One
    Secret per service, never one for all: a pod that could read every service's key could call
    as any of them (review r25: a promotion pod presenting gifting's certificate credited diamonds
    with no gift)."""
    return f"coins-{name}-certs"


def volumes(name: str) -> list[dict[str, Any]]:
    return [
        {"name": "certs", "secret": {"secretName": certs_secret(name), "defaultMode": 0o440}},
        *VOLUMES,
    ]


VOLUMES = [
    {"name": "jwt", "secret": {"secretName": "coins-jwt-keys", "defaultMode": 0o440}},
    {"name": "tmp", "emptyDir": {}},
    # The image's <SVC>_DATA_DIR: the sandbox processors' files and the ledger anchors (the root
    # filesystem is read-only). Pod-local here; anchors meant to outlive a pod go on storage of
    # their own (<SVC>_LEDGER_ANCHOR_DIR, README "Security model").
    {"name": "data", "emptyDir": {}},
]
MOUNTS = [
    {"name": "certs", "mountPath": CERTS_DIR, "readOnly": True},
    {"name": "jwt", "mountPath": JWT_DIR, "readOnly": True},
    {"name": "tmp", "mountPath": "/tmp"},
    {"name": "data", "mountPath": DATA_DIR},
]


def service_documents(name: str) -> list[dict[str, Any]]:
    api, health = ports(name)
    meta = {"name": name, "labels": labels(name)}
    probe = {"grpc": {"port": health}, "periodSeconds": 5, "timeoutSeconds": 2}
    container = {
        "name": name,
        "image": "coins",
        "args": [f"services.{name}"],
        "ports": [
            {"name": "grpc", "containerPort": api},
            {"name": "health", "containerPort": health},
            {"name": "metrics", "containerPort": metrics_port(name)},
        ],
        "envFrom": [{"configMapRef": {"name": f"{name}-settings"}}],
        "env": [database_env(name), *secret_envs(name)],
        "readinessProbe": {**probe, "failureThreshold": 2},
        # Liveness asks for the process alone: a database outage takes pods out of rotation
        # (readiness) and never restarts them (a restarted pod exits until the database is back).
        "livenessProbe": {
            **probe,
            "grpc": {"port": health, "service": LIVENESS},
            "failureThreshold": 6,
            "initialDelaySeconds": 10,
        },
        "resources": {
            "requests": {"cpu": "250m", "memory": "192Mi"},
            "limits": {"cpu": "1", "memory": "320Mi"},
        },
        "securityContext": SECURITY_CONTEXT,
        "volumeMounts": MOUNTS,
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": meta,
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-settings", "labels": labels(name)},
            "data": config(name),
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels(name)},
                "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {
                        "labels": labels(name),
                        "annotations": {  # for a Prometheus that discovers pods by annotation
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(metrics_port(name)),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "automountServiceAccountToken": False,
                        "terminationGracePeriodSeconds": 15,
                        "securityContext": {"fsGroup": 10001},
                        "containers": [container],
                        "volumes": volumes(name),
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "clusterIP": "None",  # headless: clients resolve every pod and round-robin
                "selector": labels(name),
                "ports": [
                    {"name": "grpc", "port": api, "targetPort": "grpc", "appProtocol": "grpc"},
                    {"name": "health", "port": health, "targetPort": "health"},
                ],
            },
        },
        {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": meta,
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels(name)}},
        },
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta,
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": 2,
                "maxReplicas": 8,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 70},
                        },
                    }
                ],
            },
        },
    ]


MIGRATIONS_JOB_TTL_SECONDS = 600
"""How long a finished migrations Job (and its pod's logs) is kept before Kubernetes deletes it."""


def migrations_job() -> dict[str, Any]:
    """Every service's migrations, as the database owner, before a rollout (the services start
    with <SVC>_MIGRATE_ON_START=false)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "coins-migrations", "labels": labels("migrations")},
        "spec": {
            "backoffLimit": 3,
            # A Job's pod template cannot change: the next rollout's `kubectl apply` (a new image)
            # would be refused while this one exists. It deletes itself once done and read.
            "ttlSecondsAfterFinished": MIGRATIONS_JOB_TTL_SECONDS,
            "template": {
                "metadata": {"labels": labels("migrations")},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "migrate",
                            "image": "coins",
                            "args": ["tools.migrate"],
                            "env": [database_env(name) for name in SETTINGS],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"cpu": "1", "memory": "256Mi"},
                            },
                            "securityContext": SECURITY_CONTEXT,
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def collector_documents() -> list[dict[str, Any]]:
    name = "otel-collector"
    config_text = yaml.safe_dump(
        {
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": "0.0.0.0:4317"}}}},
            "processors": {"batch": {}},
            # debug: stands in for the cluster's own backends (Tempo/Jaeger, Prometheus/Mimir,
            # Loki); an overlay replaces it.
            "exporters": {"debug": {}},
            "service": {
                "pipelines": {
                    signal: {
                        "receivers": ["otlp"],
                        "processors": ["batch"],
                        "exporters": ["debug"],
                    }
                    for signal in ("traces", "metrics", "logs")
                }
            },
        },
        sort_keys=False,
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels(name)},
            "data": {"config.yaml": config_text},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels(name)},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels(name)},
                "template": {
                    "metadata": {"labels": labels(name)},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": name,
                                "image": "otel/opentelemetry-collector-contrib:0.115.1",
                                "args": ["--config=/etc/otelcol/config.yaml"],
                                "ports": [{"name": "otlp", "containerPort": 4317}],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"cpu": "1", "memory": "512Mi"},
                                },
                                "securityContext": SECURITY_CONTEXT,
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/otelcol"}],
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": name}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels(name)},
            "spec": {
                "selector": labels(name),
                "ports": [
                    {"name": "otlp", "port": 4317, "targetPort": "otlp", "appProtocol": "grpc"}
                ],
            },
        },
    ]


HEADER = (
    "# Generated by `python -m tools.deploy_manifests` from the services' settings: do not edit.\n"
)


def files() -> dict[str, str]:
    """Every file of deploy/k8s/base, by name."""

    def dump(documents: list[dict[str, Any]]) -> str:
        return HEADER + yaml.safe_dump_all(documents, sort_keys=False)

    out = {f"{name}.yaml": dump(service_documents(name)) for name in SETTINGS}
    out["migrations-job.yaml"] = dump([migrations_job()])
    out["otel-collector.yaml"] = dump(collector_documents())
    out["kustomization.yaml"] = HEADER + yaml.safe_dump(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [n for n in sorted(out) if n != "kustomization.yaml"],
        },
        sort_keys=False,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.deploy_manifests", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed files differ")
    args = parser.parse_args(argv)
    stale = []
    for name, text in files().items():
        path = BASE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run python -m tools.deploy_manifests)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
