"""vLLM compiled or eager on CPUs: configured, unchecked where the CPU lacks the vector units,
else the machine's remembered check — and the check's judge, the gap along another run's
tokens."""

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from hybrid_serve.config import HybridServeConfig, VLLMEngineConfig
from hybrid_serve.engines import vllm_compile
from hybrid_serve.engines.vllm_compile import (
    TOLERANCE_NATS,
    CompileCheck,
    decide,
    gaps,
    said,
)
from hybrid_serve.engines.vllm_options import (
    Compilation,
    compilation_note,
    llm_config_kwargs,
    tier_llm_config_kwargs,
)

AVX512 = frozenset({"avx2", "avx512f", "avx512bw"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def remember(cache, model, check: CompileCheck) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    key = vllm_compile._key(model, None)
    (cache / vllm_compile.RECORD).write_text(json.dumps({key: asdict(check)}))


def flags(monkeypatch, value) -> None:
    monkeypatch.setattr(vllm_compile, "cpu_flags", lambda: value)


def never_measure(*args, **kwargs):
    raise AssertionError("the check ran")


AGREED = CompileCheck(agree=True, max_gap_nats=0.125, parted=1, eager_tok_s=130, compiled_tok_s=169)


def test_configured_modes_and_gpus_are_never_checked(monkeypatch, model, tmp_path):
    monkeypatch.setattr(vllm_compile, "measure", never_measure)
    flags(monkeypatch, AVX512)
    on = decide(VLLMEngineConfig(compile="on"), "cpu", model, cache=tmp_path)
    off = decide(VLLMEngineConfig(compile="off"), "cpu", model, cache=tmp_path)
    assert on is not None and on.compiled and "compile: on" in on.reason
    assert off is not None and not off.compiled and "compile: off" in off.reason
    assert decide(VLLMEngineConfig(), "cuda", model, cache=tmp_path) is None


def test_without_avx512_or_amx_auto_runs_eagerly_unchecked(monkeypatch, model, tmp_path):
    monkeypatch.setattr(vllm_compile, "measure", never_measure)
    for cpu in (AVX2, None):  # AVX2 only, or flags unknown
        flags(monkeypatch, cpu)
        got = decide(VLLMEngineConfig(), "cpu", model, cache=tmp_path)
        assert got is not None and not got.compiled and "neither AVX-512 nor AMX" in got.reason
    flags(monkeypatch, frozenset({"avx2", "amx_tile"}))
    monkeypatch.setattr(vllm_compile, "measure", lambda *a: AGREED)
    assert decide(VLLMEngineConfig(), "cpu", model, cache=tmp_path).compiled  # AMX: checked


def test_auto_measures_once_and_follows_the_verdict(monkeypatch, model, tmp_path):
    flags(monkeypatch, AVX512)
    runs = []
    monkeypatch.setattr(vllm_compile, "measure", lambda *a: runs.append(a) or AGREED)
    assert "not checked on this machine yet" in said(VLLMEngineConfig(), model, tmp_path).reason
    first = decide(VLLMEngineConfig(), "cpu", model, cache=tmp_path)
    again = decide(VLLMEngineConfig(), "cpu", model, cache=tmp_path)
    assert len(runs) == 1 and first == again and first.compiled
    assert "agreed" in first.reason and "169 against 130 tok/s" in first.reason
    assert said(VLLMEngineConfig(), model, tmp_path) == first  # doctor reads the same record
    # Another dtype is another check.
    other = VLLMEngineConfig(engine_kwargs={"dtype": "float32"})
    decide(other, "cpu", model, cache=tmp_path)
    assert len(runs) == 2


@pytest.mark.parametrize(
    ("check", "compiled", "said"),
    [
        (AGREED, True, "compiled: compiled mode agreed"),
        (
            CompileCheck(agree=False, max_gap_nats=9.5, eager_tok_s=130, compiled_tok_s=169),
            False,
            "disagreed",
        ),
        (CompileCheck(agree=True, eager_tok_s=130, compiled_tok_s=120), False, "not faster"),
        (CompileCheck(error="compiled mode: Illegal instruction"), False, "Illegal instruction"),
    ],
)
def test_compiled_only_where_it_agreed_and_is_faster(
    monkeypatch, model, tmp_path, check, compiled, said
):
    flags(monkeypatch, AVX512)
    monkeypatch.setattr(vllm_compile, "measure", never_measure)
    remember(tmp_path, model, check)
    got = decide(VLLMEngineConfig(), "cpu", model, cache=tmp_path)
    assert got.compiled is compiled and said in got.reason


def test_the_verdict_follows_the_architecture_not_the_copy(monkeypatch, model, tmp_path):
    flags(monkeypatch, AVX512)
    remember(tmp_path, model, AGREED)
    monkeypatch.setattr(vllm_compile, "measure", never_measure)
    copy = tmp_path / "another-data-dir" / "model"  # the same conversion elsewhere
    copy.mkdir(parents=True)
    (copy / "config.json").write_text("{}")
    (copy / "model.safetensors").write_bytes(b"other weights")
    assert decide(VLLMEngineConfig(), "cpu", copy, cache=tmp_path).compiled
    (model / "config.json").write_text('{"num_hidden_layers": 2}')  # another architecture
    monkeypatch.setattr(vllm_compile, "measure", lambda *a: CompileCheck(error="boom"))
    assert not decide(VLLMEngineConfig(), "cpu", model, cache=tmp_path).compiled


def test_the_verdict_reaches_the_engine_arguments_and_the_replica(model):
    cfg = HybridServeConfig.load(overrides={"slm.engine": "vllm"})
    verdict = Compilation(True, "compiled: checked")
    kwargs = llm_config_kwargs(cfg, "cpu", str(model), verdict)
    assert kwargs["engine_kwargs"]["enforce_eager"] is False
    assert compilation_note(kwargs) == "compiled: checked"
    unchecked = llm_config_kwargs(cfg, "cpu", str(model))  # auto, no check made: eager
    assert unchecked["engine_kwargs"]["enforce_eager"] is True
    assert "no check was made" in compilation_note(unchecked)
    tier = tier_llm_config_kwargs(cfg, "cpu", str(model), verdict)
    assert tier["engine_kwargs"]["enforce_eager"] is False
    gpu = llm_config_kwargs(cfg, "cuda", str(model), verdict)
    assert "enforce_eager" not in gpu["engine_kwargs"] and compilation_note(gpu) is None


def lp(value: float) -> SimpleNamespace:
    return SimpleNamespace(logprob=value)


def test_the_gap_is_how_far_the_judged_token_is_behind_the_best():
    tokens = [1, 2, 3, 4, 5]  # a 2-token prompt, then 3 judged
    logprobs = [
        None,
        {2: lp(-3.0), 9: lp(-0.1)},  # in the prompt: not judged
        {3: lp(-0.5)},  # the judge's own best
        {4: lp(-0.9), 7: lp(-0.775)},  # a near-tie taken the other way
        {5: lp(-1.0)},
    ]
    assert gaps(logprobs, tokens, start=2) == pytest.approx(0.125)
    logprobs[4] = {5: lp(-12.0), 8: lp(-0.2)}  # a wrong token
    wrong = gaps(logprobs, tokens, start=2)
    assert wrong == pytest.approx(11.8) and wrong > TOLERANCE_NATS
