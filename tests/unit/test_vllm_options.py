"""vLLM's KV cache on CPUs: an absolute size from the model's shape, whatever else holds memory."""

import json

import pytest

from hybrid_serve.config import VLLMEngineConfig
from hybrid_serve.engines.vllm_options import (
    GiB,
    cpu_kv_cache,
    device_engine_kwargs,
    kv_bytes_per_token,
)

# SmolLM2-135M: 30 layers, 9 query heads of 64 over a 576 hidden size, 3 key/value heads.
SMOLLM2 = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
}
PER_TOKEN = 2 * 30 * 3 * 64 * 2  # K and V, layers, KV heads, head size, bfloat16


@pytest.fixture
def model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    return tmp_path


def test_bytes_per_token_from_the_config(model, tmp_path_factory):
    assert kv_bytes_per_token(model) == PER_TOKEN
    assert kv_bytes_per_token(model, "float32") == 2 * PER_TOKEN
    assert kv_bytes_per_token(tmp_path_factory.mktemp("empty")) is None  # e.g. a repo id


def test_every_sequence_fits_when_memory_allows(model):
    v = VLLMEngineConfig(max_model_len=4096, max_num_seqs=8)
    plan = cpu_kv_cache(v, model, free_bytes=20 * GiB)
    per_seq = PER_TOKEN * (4096 + 128)  # a spare block a sequence
    assert plan.sequences == 8 and plan.bytes == 8 * per_seq
    assert "8 sequence(s) of 4096 tokens" in plan.reason


def test_capped_by_free_memory_but_never_below_one_sequence(model):
    v = VLLMEngineConfig(max_model_len=4096, max_num_seqs=64)
    per_seq = PER_TOKEN * (4096 + 128)
    capped = cpu_kv_cache(v, model, free_bytes=4 * 10 * per_seq)  # a quarter holds 10
    assert capped.sequences == 10 and "cap" in capped.reason
    starved = cpu_kv_cache(v, model, free_bytes=per_seq)
    assert starved.sequences == 1 and starved.bytes == per_seq


def test_the_same_size_whatever_the_process_holds(model):
    # vLLM's own default subtracts the worker's resident memory; this depends only on the model
    # and the configuration (and the cap, far above it here).
    v = VLLMEngineConfig(max_model_len=2048, max_num_seqs=4)
    sizes = {cpu_kv_cache(v, model, free_bytes=f * GiB).bytes for f in (8, 12, 20)}
    assert len(sizes) == 1


def test_engine_arguments_on_cpus_and_gpus(model):
    v = VLLMEngineConfig(max_model_len=2048, max_num_seqs=4)
    cpu, note = device_engine_kwargs(v, "cpu", model)
    assert cpu["kv_cache_memory_bytes"] > 0 and cpu["enforce_eager"] is True
    assert "gpu_memory_utilization" not in cpu and "sequence(s)" in note
    gpu, note = device_engine_kwargs(v, "cuda", model)
    assert gpu == {"gpu_memory_utilization": 0.90} and note is None
    unknown, note = device_engine_kwargs(v, "cpu", "org/some-model")
    assert unknown["gpu_memory_utilization"] == 0.20 and "unknown" in note
    fixed, note = device_engine_kwargs(VLLMEngineConfig(kv_cache_gib=0.5), "cpu", model)
    assert fixed["kv_cache_memory_bytes"] == GiB // 2 and "kv_cache_gib" in note
