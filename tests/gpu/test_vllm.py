"""The `vllm` engine on a real GPU: skipped, with the reason, where there is none (no GPU has been
available to this project's CI; run these by hand on a GPU machine: `python -m pytest tests/gpu`).
"""

import importlib.util
import shutil
import subprocess

import pytest

from hybrid_serve.schemas import GenerationRequest, GenerationResult


def _gpu_reason() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (nvidia-smi not found)"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "nvidia-smi finds no GPU"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install '.[gpu]')"
    return None


pytestmark = pytest.mark.skipif(_gpu_reason() is not None, reason=_gpu_reason() or "")

MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture(scope="module")
def slm(tmp_path_factory):
    import ray
    from ray import serve

    from hybrid_serve.config import HybridServeConfig
    from hybrid_serve.deployments.slm_vllm import build_vllm_slm

    cfg = HybridServeConfig.load(
        profile="gpu",
        overrides={
            "data_dir": str(tmp_path_factory.mktemp("gpu")),
            "slm.model_name": "qwen-0.5b",
            "slm.vllm.model_source": MODEL,
            "slm.vllm.max_model_len": 4096,
            "slm.vllm.gpu_memory_utilization": 0.5,
            "slm.autoscaling.max_replicas": 1,
            "placement.cpu_node_resource": "",
        },
    )
    ray.init(ignore_reinit_error=True)
    handle = serve.run(build_vllm_slm(cfg), name="vllm-test", route_prefix=None)
    yield handle
    serve.delete("vllm-test")
    serve.shutdown()


REQ = GenerationRequest(
    messages=[{"role": "user", "content": "Name the capital of France in one word."}],
    max_tokens=16,
)


def test_generate_returns_text_tokens_and_logprobs(slm):
    result = slm.generate.remote(REQ).result()
    assert "Paris" in result.text
    assert result.completion_tokens > 0 and result.prompt_tokens > 0
    assert len(result.token_logprobs) == result.completion_tokens
    assert all(lp <= 0 for lp in result.token_logprobs)


def test_stream_yields_deltas_then_the_result(slm):
    items = list(slm.options(stream=True).generate_stream.remote(REQ))
    assert isinstance(items[-1], GenerationResult)
    assert "".join(items[:-1]) == items[-1].text and len(items) > 2


def test_status_reports_its_gpu(slm):
    status = slm.status.remote().result()
    assert status["engine"] == "vllm" and status["placement"]["gpu_ids"]


def test_faiss_index_moves_to_the_gpu():
    import numpy as np

    from hybrid_serve.retrieval import ann
    from hybrid_serve.retrieval.ann import ANNSpec

    if ann.gpu_count() == 0:
        pytest.skip("FAISS sees no GPU (faiss-gpu-cu12 not installed)")
    x = np.random.default_rng(0).standard_normal((2000, 64)).astype("float32")
    cpu = ann.build(x, ANNSpec(kind="ivf"))
    gpu = ann.to_device(cpu, ANNSpec(kind="ivf", gpu=True))
    assert type(gpu).__name__.startswith("Gpu")
    assert (gpu.search(x[:5], 1)[1][:, 0] == np.arange(5)).all()
