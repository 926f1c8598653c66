"""The engine contract: how `slm.engine` is resolved, the warm-up that proves an engine, and the
llama.cpp setting that keeps it off the path that crashes on AMX CPUs."""

import asyncio

import pytest

from hybrid_serve.config import HybridServeConfig, SLMConfig
from hybrid_serve.engines import Engine, EngineFailed, engine_class, make_engine, warm_up
from hybrid_serve.engines.hardware import cpu_flags, has_amx
from hybrid_serve.engines.llama_cpp import LlamaCppEngine, extra_buffers_enabled
from hybrid_serve.engines.openai_compat import OpenAICompatEngine
from hybrid_serve.schemas import GenerationRequest, GenerationResult


def test_extra_buffers_default_is_auto_and_off_where_amx_or_unknown():
    assert SLMConfig().llama_cpp.extra_buffers == "auto"
    assert extra_buffers_enabled("auto", amx=True) is False
    assert extra_buffers_enabled("auto", amx=None) is False  # flags unreadable: the safe side
    assert extra_buffers_enabled("auto", amx=False) is True
    assert extra_buffers_enabled("on", amx=True) is True
    assert extra_buffers_enabled("off", amx=False) is False


def test_amx_read_from_cpu_flags():
    assert has_amx(frozenset({"avx2", "amx_tile", "amx_int8"})) is True
    assert has_amx(frozenset({"avx2", "avx512f"})) is False
    flags = cpu_flags()
    assert flags is None or isinstance(flags, frozenset)


def test_llama_cpp_passes_the_safe_setting_to_llama_cpp(monkeypatch):
    """On an AMX machine (simulated), the default config loads the model without extra buffer
    types, as llama.cpp's own model parameters show; the process-wide defaults are untouched."""
    import llama_cpp.llama_cpp as low

    monkeypatch.setattr("hybrid_serve.engines.llama_cpp.has_amx", lambda: True)
    cfg = HybridServeConfig.load(overrides={"slm.threads": 1})
    engine = make_engine(cfg.slm)
    assert isinstance(engine, LlamaCppEngine)
    assert engine._contexts[0].model_params.use_extra_bufts is False
    assert engine.info()["extra_buffers"] is False
    assert low.llama_model_default_params().use_extra_bufts is True
    forced = make_engine(
        HybridServeConfig.load(
            overrides={"slm.threads": 1, "slm.llama_cpp.extra_buffers": "on"}
        ).slm
    )
    assert forced._contexts[0].model_params.use_extra_bufts is True
    result = asyncio.run(warm_up(engine.generate, 60))
    assert result["passed"] and result["completion_tokens"] > 0


def test_engines_implement_the_protocol():
    assert issubclass(engine_class("llama_cpp"), LlamaCppEngine)
    assert engine_class("openai") is OpenAICompatEngine
    engine = make_engine(SLMConfig(engine="openai", openai={"base_url": "http://127.0.0.1:9/v1"}))
    assert isinstance(engine, Engine)
    info = engine.info()
    assert info["contexts"] == 1 and info["in_flight"] == 0 and info["busy_seconds"] == 0
    assert info["server"] == "http://127.0.0.1:9/v1"


def test_engine_by_import_path_and_clear_errors():
    assert engine_class("tests.support.faulty_engines:RaisingEngine").__name__ == "RaisingEngine"
    with pytest.raises(ValueError, match="cannot be imported"):
        engine_class("no_such_module:Engine")
    with pytest.raises(ValueError, match="package.module:Class"):
        SLMConfig(engine="llamacpp")
    with pytest.raises(ValueError, match="its own deployment"):
        make_engine(SLMConfig(engine="vllm"))


class _Stub:
    def __init__(self, result=None, exc=None, delay=0.0):
        self.result, self.exc, self.delay = result, exc, delay

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        await asyncio.sleep(self.delay)
        if self.exc:
            raise self.exc
        return self.result


def test_warm_up_fails_on_error_hang_and_empty_output():
    with pytest.raises(EngineFailed, match="RuntimeError: boom"):
        asyncio.run(warm_up(_Stub(exc=RuntimeError("boom")).generate, 5))
    with pytest.raises(EngineFailed, match="did not finish"):
        asyncio.run(warm_up(_Stub(delay=5).generate, 0.05))
    empty = GenerationResult(text="", prompt_tokens=4, completion_tokens=0)
    with pytest.raises(EngineFailed, match="no tokens"):
        asyncio.run(warm_up(_Stub(result=empty).generate, 5))


def test_llama_cpp_processes_spin_briefly_unless_the_operator_set_openmp():
    from hybrid_serve.engines.llama_cpp import openmp_env

    assert openmp_env({}) == {"GOMP_SPINCOUNT": "1000"}
    assert openmp_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert openmp_env({"GOMP_SPINCOUNT": "1000000"}) == {}


def test_a_context_reads_the_answer_instructions_once():
    """Consecutive answers on a context read only what follows the prompt they share (the
    instructions and the passages' opening): llama.cpp keeps that prefix's KV state, as its own
    prompt-evaluation counter shows."""
    import llama_cpp

    from hybrid_serve.agents.prompts import answer_messages
    from hybrid_serve.bundled import bundled_gguf
    from hybrid_serve.schemas import Passage

    engine = LlamaCppEngine(bundled_gguf(), n_threads=1)
    ctx = engine._contexts[0].ctx  # its counters: llama.cpp's public perf API

    def read(query: str, text: str) -> tuple[int, int]:
        passage = Passage(chunk_id="c", doc_id="d", title="Notes", text=text)
        messages = answer_messages(query, [passage])
        llama_cpp.llama_perf_context_reset(ctx)
        result = engine.generate_blocking(GenerationRequest(messages=messages, max_tokens=2))
        return result.prompt_tokens, llama_cpp.llama_perf_context(ctx).n_p_eval

    first, first_read = read("Who built it?", "The bridge was built by Roebling in 1883.")
    assert first_read == first  # a fresh context reads it all
    second, second_read = read("How tall is it?", "The tower is 330 metres tall and iron.")
    shared = len(engine.prompt_tokens(answer_messages("", [])[:1]))  # the instructions alone
    assert second_read <= second - shared + 1
