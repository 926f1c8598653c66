"""Engine advice (engines.advice, `doctor`'s advice row): measured numbers on this machine
decide when there are some; otherwise GPUs, then the CPU's features."""

from hybrid_serve.cluster.doctor import check_advice
from hybrid_serve.config import HybridServeConfig
from hybrid_serve.engines import advice, hardware
from hybrid_serve.engines.advice import advise, measured, remember

ROWS = [
    {"engine": "llama_cpp", "single_stream_tok_s": 70.0, "throughput_tok_s": {"1": 70, "16": 72}},
    {"engine": "vllm", "single_stream_tok_s": 21.6, "throughput_tok_s": {"1": 21, "16": 236}},
]
AVX2 = {"avx2": True, "avx512": False, "amx": False}
AMX = {"avx2": True, "avx512": True, "amx": True}


def test_measured_numbers_decide_each_load():
    a = advise([], True, ROWS, AVX2)
    assert (a.interactive, a.batch, a.basis) == ("llama_cpp", "vllm", "measured")
    assert "236" in a.why and "16 clients" in a.why
    slow_batch = [dict(ROWS[1], throughput_tok_s={"1": 21, "16": 40}), ROWS[0]]
    assert advise([], True, slow_batch, AMX).batch == "llama_cpp"  # numbers over features


def test_without_numbers_gpus_then_cpu_features():
    assert advise(["GPU 0: L4"], False, None, AVX2).interactive == "vllm"
    assert advise(["GPU 0: L4"], False, None, AVX2).batch == "vllm"
    amx = advise([], True, None, AMX)
    assert (amx.interactive, amx.batch, amx.basis) == ("llama_cpp", "vllm", "hardware")
    assert "benchmarks.engines" in amx.why  # how to measure it here
    assert advise([], True, None, AVX2).batch == "llama_cpp"
    assert advise([], False, None, AMX).batch == "llama_cpp"  # vLLM's CPU build not installed


def test_measurements_are_remembered_for_this_machine_only(tmp_path, monkeypatch):
    assert measured(tmp_path) is None
    remember([dict(r, extra="dropped") for r in ROWS], tmp_path)
    assert measured(tmp_path) == [dict(r, variant=r["engine"]) for r in ROWS]
    monkeypatch.setattr(advice, "machine_key", lambda: "another-machine")
    assert measured(tmp_path) is None


def test_vllm_measured_in_both_modes_is_named_by_mode(tmp_path):
    llama, vllm = ROWS
    rows = [
        llama,
        dict(vllm, variant="vllm:eager"),
        dict(vllm, variant="vllm:compiled", throughput_tok_s={"1": 41, "16": 260}),
    ]
    remember(rows, tmp_path)
    got = advise([], True, measured(tmp_path))
    assert got.batch == "vllm" and "vllm:compiled 260" in got.why and "vllm:eager" in got.why


def test_doctor_says_the_advice_and_the_configured_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware, "nvidia_gpus", lambda: [])  # the CPU case on a GPU machine too
    remember(ROWS, tmp_path / "hybrid-serve")
    check = check_advice(HybridServeConfig.load(overrides={"data_dir": str(tmp_path)}))
    assert check.status == "ok" and check.data["basis"] == "measured"
    assert "interactive: llama_cpp, batch: vllm (configured: llama_cpp)" in check.detail
