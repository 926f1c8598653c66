"""The monitoring manifests: rendered from the metric catalogue, committed as rendered, and the
dashboard asks only for series the replicas export."""

import json
import re
from pathlib import Path

import yaml

from hybrid_serve.cluster import k8s, monitoring
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.deployments.metrics import BY_NAME, CATALOGUE

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = {"histogram": ("_bucket", "_count", "_sum")}


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_committed_monitoring_files_are_the_current_renders():
    files = monitoring.render_monitoring(HybridServeConfig.load())
    for name, content in files.items():
        text = (ROOT / "k8s/monitoring" / name).read_text()
        if isinstance(content, str):
            assert text == content, name
        else:
            assert yaml.safe_load(text) == content, name


def test_dashboard_uses_every_metric_and_only_exported_series():
    exprs = " ".join(_exprs(monitoring.render_dashboard()))
    used = set(re.findall(r"\bray_(hybrid_serve_\w+)", exprs))
    exported = set()
    for spec in CATALOGUE:
        exported.add(spec.name)
        exported.update(spec.name + s for s in SUFFIXES.get(spec.kind, ()))
    assert used <= exported, used - exported
    base = {
        u.removesuffix(s) for u in used for s in ("_bucket", "_count", "_sum", "") if u.endswith(s)
    }
    assert {m.name for m in CATALOGUE} <= base, {m.name for m in CATALOGUE} - base
    # Histograms are read through their buckets; counters through rate().
    for name in used:
        spec = BY_NAME.get(name.removesuffix("_bucket"))
        if spec and spec.kind == "histogram":
            assert name.endswith("_bucket")


def test_dashboard_panels_are_well_formed():
    dash = monitoring.render_dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"] and all(
            t["expr"].count("(") == t["expr"].count(")") for t in p["targets"]
        )
        assert p["datasource"]["uid"] == "${datasource}"
    json.dumps(dash)  # importable as JSON


def test_podmonitor_scrapes_the_metrics_port_every_ray_pod_names():
    cfg = HybridServeConfig.load(profile="gpu")
    pm = monitoring.render_podmonitor(cfg)
    assert pm["kind"] == "PodMonitor" and pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"]["ray.io/is-ray-node"] == "yes"
    port = pm["spec"]["podMetricsEndpoints"][0]["port"]
    rayservice = k8s.render_rayservice(cfg)
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    assert len(pods) == 3  # head, CPU and GPU workers
    for group in pods:
        labels = group["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "hybrid-serve"
        (container,) = group["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[port] == k8s.METRICS_PORT
