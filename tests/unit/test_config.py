import pytest
from pydantic import ValidationError

from hybrid_serve.config import HybridServeConfig


def test_defaults_work_out_of_the_box(monkeypatch):
    monkeypatch.delenv("HYBRID_SERVE_SLM__REPLICAS", raising=False)
    cfg = HybridServeConfig.load()
    assert cfg.slm.engine == "llama_cpp" and cfg.slm.replicas == 1
    assert cfg.http.port == 8000 and cfg.retriever.replicas == 1
    assert cfg.slm.model_path is None  # the bundled GGUF
    assert cfg.claude.model


def test_yaml_env_and_override_precedence(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text(
        "slm:\n  replicas: 3\n  threads: 1\nhttp:\n  port: 9000\n"
        f"data_dir: {tmp_path}/d\nclaude:\n  model: my-model\n"
    )
    monkeypatch.setenv("HYBRID_SERVE_SLM__REPLICAS", "2")
    monkeypatch.setenv("HYBRID_SERVE_RETRIEVER__REPLICAS", "4")
    cfg = HybridServeConfig.load(f, overrides={"http.port": 9100, "data_dir": None})
    assert cfg.slm.replicas == 2  # env beats YAML
    assert cfg.slm.threads == 1  # YAML kept where env is silent
    assert cfg.retriever.replicas == 4
    assert cfg.http.port == 9100  # explicit override beats all
    assert str(cfg.data_dir) == f"{tmp_path}/d"  # None override means "not given"
    assert cfg.claude.model == "my-model"


def test_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("slm:\n  replica: 3\n")
    with pytest.raises(ValidationError, match="replica"):
        HybridServeConfig.load(f)


def test_bad_values_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_SERVE_SLM__REPLICAS", "0")
    with pytest.raises(ValidationError):
        HybridServeConfig.load()


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        HybridServeConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("slm: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        HybridServeConfig.load(bad)


def test_args_round_trip_ignores_replica_environment(monkeypatch):
    cfg = HybridServeConfig.load(overrides={"slm.replicas": 2})
    monkeypatch.setenv("HYBRID_SERVE_SLM__REPLICAS", "5")
    again = HybridServeConfig.from_args(cfg.to_args())
    assert again == cfg and again.slm.replicas == 2


def test_chunk_overlap_must_be_smaller():
    with pytest.raises(ValidationError):
        HybridServeConfig.load(
            overrides={"retriever.chunk_words": 20, "retriever.chunk_overlap_words": 20}
        )
