"""The llama.cpp set-up chosen by measuring on this machine: the real llama.cpp, its quantizer and
child processes, with a cache of the test's own."""

import json
from pathlib import Path

import pytest

from hybrid_serve.bundled import bundled_gguf
from hybrid_serve.config import LlamaCppEngineConfig
from hybrid_serve.engines import llama_setup
from hybrid_serve.engines.llama_setup import Candidate, choose, measure


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llama-cache")


def test_auto_measures_each_candidate_once_and_runs_the_fastest(cache, monkeypatch):
    cfg = LlamaCppEngineConfig(cache_dir=str(cache), flash_attention="off")
    source = Path(bundled_gguf())
    setup = choose(source, cfg, threads=2)
    names = {m.candidate.quantization for m in setup.measured}
    assert names == {"bundled", "q8_0", "f16"}
    assert all(m.ok and m.prompt_tps > 0 and m.gen_tps > 0 for m in setup.measured)
    fastest = min(setup.measured, key=lambda m: m.answer_s())
    assert setup.quantization == fastest.candidate.quantization
    assert "measured" in setup.reason and Path(setup.model_path).is_file()
    converted = sorted(p.name for p in (cache / "models").iterdir())
    assert len(converted) == 2 and all(".part" not in n for n in converted)
    # Remembered: the next start measures nothing and chooses the same.
    monkeypatch.setattr(llama_setup, "measure", lambda *a: pytest.fail("measured again"))
    again = choose(source, cfg, threads=2)
    assert again.quantization == setup.quantization and "measured before" in again.reason
    record = json.loads((cache / "setups.json").read_text())
    assert len(record) == 1 and len(next(iter(record.values()))) == 3
    said = llama_setup.remembered(source, cfg, threads=2)  # what doctor says
    assert said.startswith(f"measured: {setup.quantization}/")
    other = LlamaCppEngineConfig(cache_dir=str(cache / "none"), flash_attention="off")
    assert llama_setup.remembered(source, other, 2).startswith("not measured on this machine")


def test_a_candidate_that_crashes_is_ruled_out_not_fatal(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    result = measure(broken, Candidate("bundled", False, 1), threads=1, extra_buffers=False)
    assert not result.ok and result.error and result.answer_s() == float("inf")


def test_choices_that_are_configured_are_not_measured(cache):
    cfg = LlamaCppEngineConfig(
        cache_dir=str(cache), quantization="bundled", flash_attention="on", threads_batch=1
    )
    setup = choose(Path(bundled_gguf()), cfg, threads=2)
    assert setup.reason == "configured" and setup.measured == []
    assert setup.model_path == str(bundled_gguf()) and setup.flash_attention
    assert (setup.threads, setup.threads_batch) == (2, 1)


def test_a_model_of_the_users_own_is_not_converted_under_auto(cache):
    cfg = LlamaCppEngineConfig(cache_dir=str(cache), flash_attention="off")
    candidates = llama_setup._candidates(cfg, 2, own_model=True)
    assert [c.quantization for c in candidates] == ["bundled"]
