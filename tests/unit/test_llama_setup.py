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
    assert names == {"bundled", "f16"}  # q8_0 and q4_0 re-round the weights: configured only
    assert all(m.ok and m.prompt_tps > 0 and m.gen_tps > 0 for m in setup.measured)
    fastest = min(setup.measured, key=lambda m: m.answer_s())
    assert setup.quantization == fastest.candidate.quantization
    assert "measured" in setup.reason and Path(setup.model_path).is_file()
    converted = sorted(p.name for p in (cache / "models").iterdir())
    assert len(converted) == 1 and all(".part" not in n for n in converted)
    # Remembered: the next start measures nothing and chooses the same.
    monkeypatch.setattr(llama_setup, "measure", lambda *a: pytest.fail("measured again"))
    again = choose(source, cfg, threads=2)
    assert again.quantization == setup.quantization and "measured before" in again.reason
    record = json.loads((cache / "setups.json").read_text())
    assert len(record) == 1 and len(next(iter(record.values()))) == 2
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


def test_replicas_starting_together_measure_one_at_a_time_and_once(tmp_path, monkeypatch):
    """Two replicas on one node: the first measures (alone: never beside the other, which
    would slow both), the second waits and reads what it measured."""
    import threading
    import time

    calls, running, most = [], [0], [0]
    lock = threading.Lock()

    def measure_alone(path, candidate, threads, extra):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            calls.append(candidate)
        fast = {"bundled": 200.0, "f16": 300.0}[candidate.quantization]
        return llama_setup.Measured(candidate, fast, 90.0)

    monkeypatch.setattr(llama_setup, "measure", measure_alone)
    monkeypatch.setattr(llama_setup, "converted", lambda source, q, cache: source)
    cfg = LlamaCppEngineConfig(cache_dir=str(tmp_path), flash_attention="off")
    chosen = []

    def start():
        chosen.append(choose(Path(bundled_gguf()), cfg, threads=2))

    replicas = [threading.Thread(target=start) for _ in range(2)]
    for r in replicas:
        r.start()
    for r in replicas:
        r.join()
    assert most[0] == 1 and len(calls) == 2  # one at a time, each candidate once
    assert [c.quantization for c in chosen] == ["f16", "f16"]
    assert sum("measured before" in c.reason for c in chosen) == 1


def test_doctor_names_only_a_set_up_the_engine_may_choose(tmp_path, monkeypatch):
    """A record measured under an earlier candidate list (Q8_0, the fastest there) does not make
    doctor name a set-up the engine will not run; a candidate not yet measured is said."""
    monkeypatch.setattr(
        llama_setup,
        "measure",
        lambda path, c, threads, extra: llama_setup.Measured(
            c, 250.0 + 100 * c.flash_attention, 90.0
        ),
    )
    monkeypatch.setattr(llama_setup, "converted", lambda source, q, cache: source)
    source = Path(bundled_gguf())
    cfg = LlamaCppEngineConfig(cache_dir=str(tmp_path))
    chosen = choose(source, cfg, threads=2)
    record_path = tmp_path / "setups.json"
    record = json.loads(record_path.read_text())
    (entries,) = record.values()
    entries["q8_0/fa-on/tb-2"] = {"prompt_tps": 5000.0, "gen_tps": 500.0, "error": None}
    del entries["f16/fa-on/tb-2"]
    record_path.write_text(json.dumps(record))
    said = llama_setup.remembered(source, cfg, threads=2)
    assert "q8_0" not in said and said.startswith("measured: bundled/fa-on/")
    assert said.endswith("the next start measures 1 more") and chosen.flash_attention
