"""KubeRay manifests from the same configuration as local start-up.

`render_rayservice` turns a HybridServeConfig into a `ray.io/v1` RayService whose `serveConfigV2`
runs `hybrid_serve.deployments.app:build_app` with that configuration as its args; `render_all`
adds the index volume, the Ingress and a NetworkPolicy. Secrets are only ever referenced
(`secretKeyRef`), never rendered. Ray's own control plane is closed: token authentication
(KubeRay's `authOptions`, which generates the token Secret and sets it in every Ray container)
and a NetworkPolicy that lets only the cluster's own pods and the KubeRay operator reach the
dashboard (its jobs API runs any code), the GCS and the Ray client port.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from hybrid_serve.config import HybridServeConfig, WorkerGroupConfig
from hybrid_serve.deployments.tunables import BY_DEPLOYMENT, without_tunables
from hybrid_serve.engines.vllm_options import gpus_per_replica, tier_gpus

IMPORT_PATH = "hybrid_serve.deployments.app:build_app"
LLM_TIER_IMPORT_PATH = "hybrid_serve.deployments.llm_tier:build_app"
SERVE_PORT = 8000
# Ray's control plane: GCS, dashboard (and its jobs API), client server, dashboard agent.
RAY_CONTROL_PORTS = (6379, 8265, 10001, 52365)
# The KubeRay operator's pods (its Helm chart's label), in whatever namespace it runs.
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}
# Ray's metrics export port, which KubeRay sets on every node (`--metrics-export-port`). Named in
# the pod spec, because KubeRay exposes only the ports a spec lists once it lists any.
METRICS_PORT = 8080
DATA_DIR = "/data/hybrid-serve"
# Read from the pods' environment (a Secret), so never part of the rendered args.
SECRET_FIELDS = {"http": ["api_keys"]}
SECRET_ENV = [
    ("ANTHROPIC_API_KEY", "anthropic-api-key"),
    # The cluster's own LLM tier (llm.deploy), as llm.api_key_env names it in the profile.
    ("HYBRID_SERVE_LLM_TIER_KEY", "llm-tier-key"),
    ("HYBRID_SERVE_HTTP__API_KEYS", "api-keys"),  # a JSON list; plain keys or sha256:<hex>
    ("HF_TOKEN", "hf-token"),  # gated model weights for vLLM
]
CPU_NODE_RESOURCE_UNITS = 1000


def for_kubernetes(cfg: HybridServeConfig) -> HybridServeConfig:
    """The configuration as it runs in the cluster: listening on every interface, Serve's port,
    the index on the shared volume."""
    return cfg.model_copy(
        update={
            "data_dir": Path(DATA_DIR),
            "http": cfg.http.model_copy(update={"host": "0.0.0.0", "port": SERVE_PORT}),
        }
    )


def serve_args(cfg: HybridServeConfig) -> dict[str, Any]:
    """The application's arguments: the configuration but its secrets and its tunables (those
    go per deployment, below), so that a tunable's change leaves Serve's code version — a hash
    of the arguments — alone, and no replica restarts for it."""
    args = without_tunables(cfg.to_args())
    args.pop("k8s", None)
    for section, fields in SECRET_FIELDS.items():
        for name in fields:
            args[section].pop(name, None)
    return args


def serve_config(cfg: HybridServeConfig) -> dict[str, Any]:
    """Ray Serve's config file format (what `serve deploy` takes and `serveConfigV2` holds): the
    application, its deployments' tunables (applied in place when they change), and the LLM
    tier's application beside it when the cluster serves its own."""
    public = cfg.model_copy(update={"http": cfg.http.model_copy(update={"api_keys": []})})
    applications = [
        {
            "name": cfg.app_name,
            "import_path": IMPORT_PATH,
            "route_prefix": "/",
            "args": serve_args(cfg),
            "deployments": [
                {"name": name, "user_config": of(public)} for name, of in BY_DEPLOYMENT.items()
            ],
        }
    ]
    if cfg.llm.deploy.enabled:
        applications.append(
            {
                "name": cfg.llm_app_name,
                "import_path": LLM_TIER_IMPORT_PATH,
                "route_prefix": cfg.llm.deploy.route_prefix,
                "args": serve_args(cfg),
            }
        )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": applications,
    }


def _env(secret: str, gpu: bool, required: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    # Optional but for `required`: without the Anthropic key the cluster runs and says
    # `claude_unavailable`; the cluster's own LLM tier does not start without its key.
    env: list[dict[str, Any]] = [
        {
            "name": var,
            "valueFrom": {
                "secretKeyRef": {"name": secret, "key": key, "optional": key not in required}
            },
        }
        for var, key in SECRET_ENV
    ]
    if not gpu:  # the bundled embedding model is in the image; never reach for the Hub
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    return env


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    amount: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        amount["nvidia.com/gpu"] = gpus
    return {"requests": dict(amount), "limits": dict(amount)}


def _readiness() -> dict[str, Any]:
    # Serve traffic reaches a pod only once the whole application answers /readyz there.
    return {
        "httpGet": {"path": "/readyz", "port": SERVE_PORT},
        "initialDelaySeconds": 10,
        "periodSeconds": 5,
        "timeoutSeconds": 4,
        "failureThreshold": 3,
    }


def _worker_group(
    name: str,
    group: WorkerGroupConfig,
    image: str,
    secret: str,
    claim: str,
    gpus: int,
    start_params: dict[str, str],
    replicas: tuple[int, int, int],
    required: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": "ray-worker",
                "image": image,
                "resources": _resources(group.cpu, group.memory, gpus),
                "env": _env(secret, gpu=gpus > 0, required=required),
                "ports": [
                    {"containerPort": SERVE_PORT, "name": "serve"},
                    {"containerPort": METRICS_PORT, "name": "metrics"},
                ],
                "readinessProbe": _readiness(),
                "volumeMounts": [
                    {"name": "index", "mountPath": "/data"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "index", "persistentVolumeClaim": {"claimName": claim}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
    }
    if group.node_selector:
        pod["nodeSelector"] = dict(group.node_selector)
    if group.tolerations:
        pod["tolerations"] = [dict(t) for t in group.tolerations]
    initial, low, high = replicas
    return {
        "groupName": name,
        "replicas": initial,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": dict(start_params),
        "template": {"metadata": {"labels": labels(name)}, "spec": pod},
    }


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "hybrid-serve", "app.kubernetes.io/component": component}


def object_metadata(
    cfg: HybridServeConfig, name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Name, labels, and the namespace when the configuration sets one."""
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {**labels(component), **(extra_labels or {})},
    }
    if cfg.k8s.namespace:
        metadata["namespace"] = cfg.k8s.namespace
    return metadata


def _gpu_pods(cfg: HybridServeConfig, per_replica: float) -> tuple[int, int, int]:
    """GPU worker pods for the SLM replicas, from the SLM's own bounds when it autoscales."""
    group = cfg.k8s.gpu_workers
    if cfg.slm.autoscaling is None:
        need = math.ceil(cfg.slm.replicas * per_replica / group.gpus)
        return need, need, max(need, group.max_replicas)
    a = cfg.slm.autoscaling
    low = math.ceil(a.min_replicas * per_replica / group.gpus)
    high = math.ceil(a.max_replicas * per_replica / group.gpus)
    return low, low, high


def required_secrets(cfg: HybridServeConfig) -> frozenset[str]:
    """Secret keys a pod cannot start without: the key of the cluster's own LLM tier, which
    answers nobody without one."""
    tier = cfg.llm.deploy.enabled and not cfg.llm.base_url
    return frozenset({"llm-tier-key"}) if tier else frozenset()


def render_rayservice(cfg: HybridServeConfig) -> dict[str, Any]:
    cfg = for_kubernetes(cfg)
    k = cfg.k8s
    claim = f"{k.name}-index"
    required = required_secrets(cfg)
    per_replica = gpus_per_replica(cfg)
    head = {
        # No work on the head: it runs the GCS, the Serve controller and the autoscaler.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "metadata": {"labels": labels("head")},
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": k.image,
                        "resources": _resources(k.head_cpu, k.head_memory),
                        "env": _env(k.secret_name, gpu=False, required=required),
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                            {"containerPort": SERVE_PORT, "name": "serve"},
                            {"containerPort": METRICS_PORT, "name": "metrics"},
                        ],
                    }
                ]
            },
        },
    }
    cpu_params: dict[str, str] = {}
    if cfg.placement.cpu_node_resource:
        cpu_params["resources"] = _resource_param(
            cfg.placement.cpu_node_resource, CPU_NODE_RESOURCE_UNITS
        )
    cw = k.cpu_workers
    groups = [
        _worker_group(
            "cpu",
            cw,
            k.image,
            k.secret_name,
            claim,
            0,
            cpu_params,
            (cw.replicas, cw.min_replicas, max(cw.max_replicas, cw.replicas)),
            required,
        )
    ]
    if per_replica > 0:
        gw = k.gpu_workers
        if gw.gpus < per_replica:
            raise ValueError(
                f"an SLM replica needs {per_replica:g} GPUs but k8s.gpu_workers.gpus is {gw.gpus}"
            )
        gpu_params: dict[str, str] = {}
        if cfg.placement.slm_node_resource:
            gpu_params["resources"] = _resource_param(cfg.placement.slm_node_resource, gw.gpus)
        groups.append(
            _worker_group(
                "gpu",
                gw,
                k.gpu_image,
                k.secret_name,
                claim,
                gw.gpus,
                gpu_params,
                _gpu_pods(cfg, per_replica),
                required,
            )
        )
    llm_gpus = tier_gpus(cfg)
    if llm_gpus:
        groups.append(_llm_worker_group(cfg, claim))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": object_metadata(cfg, k.name, "rayservice"),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(cfg), sort_keys=False),
            "excludeHeadPodFromServeSvc": True,
            "rayClusterConfig": {
                "rayVersion": k.ray_version,
                # KubeRay generates the token Secret and sets it in every Ray container.
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
                "headGroupSpec": head,
                "workerGroupSpecs": groups,
            },
        },
    }


def _resource_param(name: str, units: int) -> str:
    """A custom resource as KubeRay passes it to `ray start --resources`: a JSON object inside a
    quoted string."""
    return f'"{{\\"{name}\\": {units}}}"'


def _llm_worker_group(cfg: HybridServeConfig, claim: str) -> dict[str, Any]:
    """The LLM tier's GPU group, sized from the model: a pod per replica with as many GPUs as its
    tensor parallelism (or the configured GPUs, several replicas a pod), marked with the
    tier's resource so that its bundles land there."""
    k, tier = cfg.k8s, cfg.llm.deploy
    group = k.llm_workers
    per_pod = group.gpus or tier.tensor_parallel_size
    if per_pod < tier.tensor_parallel_size:
        raise ValueError(
            f"an LLM tier replica needs {tier.tensor_parallel_size} GPUs (tensor_parallel_size) "
            f"but k8s.llm_workers.gpus is {per_pod}"
        )
    pods = math.ceil(tier.replicas / (per_pod // tier.tensor_parallel_size))
    params: dict[str, str] = {}
    if cfg.placement.llm_node_resource:
        params["resources"] = _resource_param(cfg.placement.llm_node_resource, per_pod)
    return _worker_group(
        "llm-gpu",
        group,
        k.gpu_image,
        k.secret_name,
        claim,
        per_pod,
        params,
        (pods, pods, pods),  # the tier has a fixed number of replicas
        required_secrets(cfg),
    )


def render_volume(cfg: HybridServeConfig) -> dict[str, Any]:
    k = cfg.k8s
    spec: dict[str, Any] = {
        # Every retriever replica reads, and any one writes, the same index (flock'ed): RWX.
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": k.storage_size}},
    }
    if k.storage_class:
        spec["storageClassName"] = k.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{k.name}-index", "labels": labels("index")},
        "spec": spec,
    }


def render_ingress(cfg: HybridServeConfig) -> dict[str, Any]:
    k = cfg.k8s
    rule: dict[str, Any] = {
        "http": {
            "paths": [
                {
                    "path": "/",
                    "pathType": "Prefix",
                    "backend": {
                        # KubeRay's Service in front of the pods whose Serve proxy is healthy.
                        "service": {"name": f"{k.name}-serve-svc", "port": {"number": SERVE_PORT}}
                    },
                }
            ]
        }
    }
    if k.ingress_host:
        rule["host"] = k.ingress_host
    spec: dict[str, Any] = {"ingressClassName": k.ingress_class, "rules": [rule]}
    if k.ingress_tls_secret:
        tls: dict[str, Any] = {"secretName": k.ingress_tls_secret}
        if k.ingress_host:
            tls["hosts"] = [k.ingress_host]
        spec["tls"] = [tls]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": k.name,
            "labels": labels("ingress"),
            "annotations": {
                # Server-Sent Events: no buffering, long reads.
                "nginx.ingress.kubernetes.io/proxy-buffering": "off",
                "nginx.ingress.kubernetes.io/proxy-read-timeout": "300",
                "nginx.ingress.kubernetes.io/proxy-body-size": f"{cfg.http.max_body_bytes}",
            },
        },
        "spec": spec,
    }


def render_network_policy(cfg: HybridServeConfig) -> dict[str, Any]:
    """Every pod of the cluster accepts the Serve port (the Ingress, other services) and the
    metrics port (Prometheus) from anywhere in the Kubernetes cluster; Ray's control plane only
    from the cluster's own pods and the KubeRay operator."""
    k = cfg.k8s
    ours = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "hybrid-serve"}}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_LABELS)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": k.name, "labels": labels("network-policy")},
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "hybrid-serve"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [ours]},  # within the Ray cluster: every port
                {
                    "from": [operator],
                    "ports": [{"protocol": "TCP", "port": p} for p in RAY_CONTROL_PORTS],
                },
                {
                    "ports": [
                        {"protocol": "TCP", "port": SERVE_PORT},
                        {"protocol": "TCP", "port": METRICS_PORT},
                    ]
                },
            ],
        },
    }


def render_all(cfg: HybridServeConfig) -> dict[str, dict[str, Any]]:
    """File name -> manifest, plus a kustomization listing them."""
    files = {
        "rayservice.yaml": render_rayservice(cfg),
        "pvc.yaml": render_volume(cfg),
        "ingress.yaml": render_ingress(cfg),
        "networkpolicy.yaml": render_network_policy(cfg),
    }
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    if cfg.k8s.namespace:
        kustomization["namespace"] = cfg.k8s.namespace
    return {**files, "kustomization.yaml": kustomization}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable in a diff."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)
