"""KubeRay manifests: every render and every RayService under k8s/ validates against the KubeRay
CRD's openAPIV3Schema; serveConfigV2 runs this package; secrets are references only."""

import copy
import importlib
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from hybrid_serve.cluster import k8s
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.placement import cpu_actor_options
from hybrid_serve.deployments.slm import get_deployment_options as slm_options
from hybrid_serve.engines.llama_cpp import openmp_env
from hybrid_serve.engines.vllm_options import (
    gpus_per_replica,
    llm_config_kwargs,
    tier_llm_config_kwargs,
)
from tests.conftest import shared_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(shared_file("schemas/ray.io_rayservices.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def validate(schema: dict, manifest: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    jsonschema.validate(manifest, schema)


def merge_patch(base, patch):
    """RFC 7386 JSON merge patch: what kustomize does with a custom resource patch file."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json6902(doc, ops):
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "replace"
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        node = doc
        for p in parents:
            node = node[p]
        node[last] = op["value"]
    return doc


@pytest.fixture(autouse=True)
def product_defaults(monkeypatch):
    """Manifests carry the product's defaults, not the engine set-up the suite pins
    (tests/conftest.py)."""
    for name in list(os.environ):
        if name.startswith("HYBRID_SERVE_SLM__LLAMA_CPP__"):
            monkeypatch.delenv(name)


def load(profile: str, **overrides) -> HybridServeConfig:
    return HybridServeConfig.load(profile=profile, overrides=overrides)


@pytest.mark.parametrize("profile", ["local", "gpu", "gpu-on-premises"])
def test_render_validates_against_the_kuberay_crd(schema, profile):
    manifest = k8s.render_rayservice(load(profile))
    validate(schema, manifest)
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_committed_manifests_are_the_current_renders(schema):
    """k8s/ is generated: it must not drift from the code that renders it."""
    files = k8s.render_all(load("local"))
    for name, manifest in files.items():
        assert yaml.safe_load((ROOT / "k8s/base" / name).read_text()) == manifest, name
    for profile, overlay in (("gpu", "prod-gpu"), ("gpu-on-premises", "prod-gpu-on-premises")):
        rendered = k8s.render_rayservice(load(profile))
        committed = ROOT / "k8s/overlays" / overlay / "rayservice.yaml"
        assert yaml.safe_load(committed.read_text()) == rendered, overlay


def test_overlays_build_valid_rayservices(schema):
    base = yaml.safe_load((ROOT / "k8s/base/rayservice.yaml").read_text())
    for overlay in ("prod-gpu", "prod-gpu-on-premises"):
        prod = yaml.safe_load((ROOT / "k8s/overlays" / overlay / "rayservice.yaml").read_text())
        merged = merge_patch(base, prod)
        assert merged == prod  # the GPU render fully replaces the base's spec
        validate(schema, merged)
    dev = yaml.safe_load((ROOT / "k8s/overlays/dev-cpu/kustomization.yaml").read_text())
    assert dev["resources"] == ["../../base"]
    for patch in dev["patches"]:
        validate(schema, json6902(base, yaml.safe_load(patch["patch"])))
    prod_k = yaml.safe_load((ROOT / "k8s/overlays/prod-gpu/kustomization.yaml").read_text())
    assert {"path": "rayservice.yaml"} in prod_k["patches"]


@pytest.mark.parametrize("profile", ["local", "gpu", "gpu-on-premises"])
def test_serve_config_runs_this_package_with_the_same_configuration(profile):
    cfg = load(profile)
    manifest = k8s.render_rayservice(cfg)
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    app, *tier = serve_config["applications"]
    if profile == "gpu-on-premises":  # the LLM tier: its own application and route
        (tier_app,) = tier
        assert tier_app["name"] == "hybrid-serve-llm" and tier_app["route_prefix"] == "/llm"
        assert tier_app["import_path"] == "hybrid_serve.deployments.llm_tier:build_app"
        assert tier_app["args"] == app["args"]
    else:
        assert tier == []
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    again = HybridServeConfig.load(overrides=app["args"])
    expected = k8s.for_kubernetes(cfg)
    assert again.slm == expected.slm and again.retriever == expected.retriever
    assert str(again.data_dir) == "/data/hybrid-serve" and again.http.host == "0.0.0.0"
    if profile == "local":  # the vllm builder needs vLLM; the CPU app builds here
        from ray.serve import Application

        assert isinstance(builder(app["args"]), Application)


def test_secrets_are_only_references(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-SENTINEL-1")
    monkeypatch.setenv("HYBRID_SERVE_HTTP__API_KEYS", '["client-SENTINEL-2"]')
    cfg = load("gpu")
    assert cfg.http.api_keys == ["client-SENTINEL-2"]  # read from the environment ...
    text = "".join(k8s.dump(m) for m in k8s.render_all(cfg).values())
    assert "SENTINEL" not in text  # ... and never rendered
    manifest = k8s.render_rayservice(cfg)
    rc = manifest["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        for var in ("ANTHROPIC_API_KEY", "HYBRID_SERVE_HTTP__API_KEYS"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "hybrid-serve-secrets" and "value" not in env[var]
    args = yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert "api_keys" not in args["http"]


def test_gpu_group_requests_gpus_and_cpu_deployments_stay_on_cpu_nodes():
    cfg = load("gpu")
    rc = k8s.render_rayservice(cfg)["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]
    res = gpu["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    # SLM autoscaling 1..4 replicas of 1 GPU on 1-GPU pods: 1..4 GPU pods.
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"]) == (1, 4)
    cpu = groups["cpu"]
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "hybrid_cpu" in cpu["rayStartParams"]["resources"]
    assert cpu_actor_options(cfg, 1.0) == {
        "num_cpus": 1.0,
        "num_gpus": 0,
        "resources": {"hybrid_cpu": 0.001},
    }
    probe = cpu["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"] == {"path": "/readyz", "port": 8000}
    # The local profile has no GPU group at all.
    local = k8s.render_rayservice(load("local"))["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in local["workerGroupSpecs"]] == ["cpu"]


def test_tensor_parallel_replicas_need_as_many_gpus_per_pod():
    cfg = load("gpu", **{"slm.vllm.tensor_parallel_size": 2})
    assert gpus_per_replica(cfg) == 2
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        k8s.render_rayservice(cfg)
    cfg = load(
        "gpu",
        **{
            "slm.vllm.tensor_parallel_size": 2,
            "k8s.gpu_workers.gpus": 4,
            "slm.autoscaling.max_replicas": 6,
        },
    )
    gpu = k8s.render_rayservice(cfg)["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    assert gpu["maxReplicas"] == 3  # 6 replicas x 2 GPUs on 4-GPU pods


def test_vllm_config_carries_placement_and_autoscaling():
    kw = llm_config_kwargs(load("gpu", **{"slm.vllm.tensor_parallel_size": 2}))
    assert kw["placement_group_config"] == {
        "bundles": [{"GPU": 1, "CPU": 1}, {"GPU": 1, "CPU": 1}],
        "strategy": "STRICT_PACK",
    }
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 2
    dc = kw["deployment_config"]
    assert dc["autoscaling_config"]["min_replicas"] == 1
    assert dc["autoscaling_config"]["max_replicas"] == 4
    assert dc["autoscaling_config"]["target_ongoing_requests"] == 16
    assert "num_replicas" not in dc and "num_gpus" not in dc["ray_actor_options"]
    assert kw["model_loading_config"] == {
        "model_id": "qwen2.5-7b-instruct",
        "model_source": "Qwen/Qwen2.5-7B-Instruct",
    }
    fixed = llm_config_kwargs(load("local", **{"slm.engine": "vllm", "slm.replicas": 3}))
    assert fixed["deployment_config"]["num_replicas"] == 3


def test_slm_options_follow_the_configuration():
    options = slm_options(
        load("local", **{"slm.autoscaling": {"min_replicas": 2, "max_replicas": 5}})
    )
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["autoscaling_config"]["max_replicas"] == 5 and "num_replicas" not in options
    assert slm_options(load("local", **{"slm.replicas": 3}))["num_replicas"] == 3
    # llama.cpp replicas start with OpenMP's spinning cut short (engines.llama_cpp.openmp_env)
    env = slm_options(load("local"))["ray_actor_options"].get("runtime_env", {}).get("env_vars")
    assert env == (openmp_env() or None)
    with pytest.raises(ValueError, match="max_replicas"):
        load("local", **{"slm.autoscaling": {"min_replicas": 5, "max_replicas": 2}})


def test_cli_render_writes_files(tmp_path):
    from hybrid_serve.cluster.cli import main

    assert main(["k8s", "render", "--profile", "gpu", "--out", str(tmp_path / "m")]) == 0
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == [
        "ingress.yaml",
        "kustomization.yaml",
        "networkpolicy.yaml",
        "pvc.yaml",
        "rayservice.yaml",
    ]
    pvc = yaml.safe_load((tmp_path / "m/pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_on_premises_tier_gets_its_own_gpu_group_sized_from_the_model():
    cfg = load("gpu-on-premises", **{"claude.deploy.replicas": 2})
    groups = k8s.render_rayservice(cfg)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu", "gpu", "llm-gpu"]
    llm = groups[2]
    limits = llm["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 4  # tensor_parallel_size 4: one replica a pod
    assert llm["replicas"] == llm["minReplicas"] == llm["maxReplicas"] == 2
    assert llm["rayStartParams"]["resources"] == '"{\\"hybrid_llm_gpu\\": 4}"'
    kw = tier_llm_config_kwargs(cfg)
    assert (
        kw["placement_group_config"]["bundles"] == [{"GPU": 1, "CPU": 1, "hybrid_llm_gpu": 1}] * 4
    )
    assert kw["model_loading_config"]["model_id"] == "llama-3.3-70b-instruct"
    assert kw["engine_kwargs"]["tool_call_parser"] == "llama3_json"
    assert kw["engine_kwargs"]["enable_auto_tool_choice"] is True
    assert kw["deployment_config"]["num_replicas"] == 2
    # The key is never in the config: only the name of the variable the replica reads.
    assert kw["runtime_env"]["env_vars"]["HYBRID_SERVE_LLM_TIER_KEY_ENV"] == (
        "HYBRID_SERVE_LLM_TIER_KEY"
    )
    eight = load("gpu-on-premises", **{"k8s.llm_workers.gpus": 8, "claude.deploy.replicas": 3})
    llm = k8s.render_rayservice(eight)["spec"]["rayClusterConfig"]["workerGroupSpecs"][2]
    assert llm["replicas"] == 2  # two 4-GPU replicas on each 8-GPU pod
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        k8s.render_rayservice(load("gpu-on-premises", **{"k8s.llm_workers.gpus": 2}))
    # The SLM's GPUs are marked too, so neither kind of replica takes the other's nodes.
    assert groups[1]["rayStartParams"]["resources"] == '"{\\"hybrid_slm_gpu\\": 1}"'
    slm_bundles = llm_config_kwargs(cfg)["placement_group_config"]["bundles"]
    assert slm_bundles == [{"GPU": 1, "CPU": 1, "hybrid_slm_gpu": 1}]


def test_ray_control_plane_is_closed():
    """Token authentication on every Ray container (KubeRay makes the token), and the dashboard
    (its jobs API runs any code), the GCS and the client port reachable only from the cluster's
    own pods and the KubeRay operator; the Serve and metrics ports from anywhere."""
    cfg = load("local")
    spec = k8s.render_rayservice(cfg)["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "token"}
    policy = k8s.render_network_policy(cfg)
    ours = {"app.kubernetes.io/name": "hybrid-serve"}
    assert policy["spec"]["podSelector"]["matchLabels"] == ours
    head = spec["headGroupSpec"]["template"]["metadata"]["labels"]
    assert ours.items() <= head.items()
    rules = policy["spec"]["ingress"]
    open_ports = {p["port"] for r in rules if "from" not in r for p in r["ports"]}
    assert open_ports == {8000, 8080}
    operator = next(r for r in rules if "ports" in r and "from" in r)
    assert {p["port"] for p in operator["ports"]} == {6379, 8265, 10001, 52365}
    assert operator["from"][0]["podSelector"]["matchLabels"] == k8s.OPERATOR_LABELS
    assert "networkpolicy.yaml" in k8s.render_all(cfg)["kustomization.yaml"]["resources"]


def test_the_on_premises_tier_does_not_start_without_its_key():
    def refs(manifest):
        spec = manifest["spec"]["rayClusterConfig"]
        pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [
            e["valueFrom"]["secretKeyRef"]
            for p in pods
            for c in p["template"]["spec"]["containers"]
            for e in c["env"]
            if "valueFrom" in e
        ]

    tier = refs(k8s.render_rayservice(load("gpu-on-premises")))
    assert all(r["optional"] is False for r in tier if r["key"] == "llm-tier-key")
    assert all(r["optional"] is True for r in tier if r["key"] != "llm-tier-key")
    assert all(r["optional"] is True for r in refs(k8s.render_rayservice(load("gpu"))))


def test_a_tunable_changes_only_a_deployments_user_config():
    """Serve's code version of a config-deployed application is a hash of its arguments: a
    tunable in the arguments would restart every replica. It goes per deployment instead."""
    base = k8s.serve_config(load("local"))
    tuned = k8s.serve_config(load("local", **{"escalation.threshold": 0.9, "cache.ttl_s": 5.0}))
    app, tuned_app = base["applications"][0], tuned["applications"][0]
    assert app["args"] == tuned_app["args"] and "threshold" not in app["args"]["escalation"]
    by_name = {d["name"]: d["user_config"] for d in tuned_app["deployments"]}
    assert by_name["Orchestrator"]["escalation"]["threshold"] == 0.9
    assert by_name["AnswerCache"]["ttl_s"] == 5.0
    keyed = k8s.serve_config(load("local", **{"http.api_keys": ["plain-key-123"]}))
    assert "plain-key-123" not in yaml.safe_dump(keyed)  # keys come from the Secret
    assert (
        k8s.serve_config(load("local", **{"slm.replicas": 2}))["applications"][0]["args"]
        != (app["args"])
    )


@pytest.mark.parametrize("profile", ["local", "gpu-on-premises"])
def test_the_serve_config_is_one_serve_accepts(profile):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(k8s.serve_config(load(profile)))
    main = config.applications[0]
    assert {d.name for d in main.deployments} == {
        "Orchestrator",
        "Retriever",
        "ClaudeProxy",
        "AnswerCache",
        "KeyLimits",
    }
