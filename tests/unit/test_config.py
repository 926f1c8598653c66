import pytest
from pydantic import ValidationError

from hybrid_serve.config import HybridServeConfig


def test_defaults_work_out_of_the_box(monkeypatch):
    monkeypatch.delenv("HYBRID_SERVE_SLM__REPLICAS", raising=False)
    cfg = HybridServeConfig.load()
    assert cfg.slm.engine == "llama_cpp" and cfg.slm.replicas == 1
    assert cfg.http.port == 8000 and cfg.retriever.replicas == 1
    assert cfg.slm.model_path is None  # the bundled GGUF
    assert cfg.llm.model


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
    assert cfg.llm.model == "my-model"


def test_null_in_the_environment_unsets_an_optional_setting(tmp_path, monkeypatch):
    """As `null` does in the YAML file: scalars (max_recited_words, threads) and sections alike."""
    f = tmp_path / "c.yaml"
    f.write_text("slm:\n  threads: 1\n")
    for key in ("MAX_RECITED_WORDS", "THREADS", "REPETITION_DETECTION"):
        monkeypatch.setenv(f"HYBRID_SERVE_SLM__{key}", "null")
    cfg = HybridServeConfig.load(f)
    assert cfg.slm.max_recited_words is None and cfg.slm.threads is None
    assert cfg.slm.repetition_detection is None
    monkeypatch.setenv("HYBRID_SERVE_SLM__REPLICAS", "null")  # not optional: an error, named
    with pytest.raises(ValidationError, match="replicas"):
        HybridServeConfig.load(f)


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


def test_llm_tier_is_configuration(tmp_path, monkeypatch):
    cfg = HybridServeConfig.load()
    assert cfg.llm_base_url() is None and cfg.llm.tier == "hosted"  # today's behaviour
    assert cfg.llm.price_model == "tokens" and not cfg.llm.deploy.enabled
    monkeypatch.setenv("HYBRID_SERVE_CLAUDE__BASE_URL", "http://llm.internal:9000/")
    monkeypatch.setenv("HYBRID_SERVE_CLAUDE__ON_PREMISES", "true")
    monkeypatch.setenv("HYBRID_SERVE_CLAUDE__API_KEY_ENV", "MY_TIER_KEY")
    cfg = HybridServeConfig.load()
    assert cfg.llm_base_url() == "http://llm.internal:9000" and cfg.llm.tier == "on_premises"
    assert cfg.llm.api_key_env == "MY_TIER_KEY"
    monkeypatch.delenv("HYBRID_SERVE_CLAUDE__BASE_URL")
    f = tmp_path / "c.yaml"
    f.write_text("claude:\n  deploy:\n    enabled: true\n    route_prefix: /tier\n")
    cfg = HybridServeConfig.load(f, overrides={"http.port": 8123})
    assert cfg.llm_base_url() == "http://127.0.0.1:8123/tier"  # the cluster's own tier
    assert cfg.llm_app_name == "hybrid-serve-llm"


def test_pii_is_kept_only_for_an_on_premises_tier(monkeypatch):
    monkeypatch.delenv("HYBRID_SERVE_CLAUDE__ON_PREMISES", raising=False)
    with pytest.raises(ValidationError, match="on_premises"):
        HybridServeConfig.load(overrides={"policies.pii": "keep"})
    cfg = HybridServeConfig.load(overrides={"policies.pii": "keep", "claude.on_premises": True})
    assert cfg.policies.pii == "keep"
    with pytest.raises(ValidationError):
        HybridServeConfig.load(overrides={"claude.deploy.route_prefix": "no-slash"})


def test_the_llm_section_is_read_under_its_earlier_name_too(tmp_path, monkeypatch):
    f = tmp_path / "both.yaml"
    f.write_text(
        "claude:\n  model: old\n  timeout_s: 9\nllm:\n  model: new\n"
        "conversation:\n  condense_with: claude\n"
    )
    cfg = HybridServeConfig.load(f)
    assert cfg.llm.model == "new" and cfg.llm.timeout_s == 9  # `llm` wins where both are set
    assert cfg.conversation.condense_with == "llm"
    assert "llm" in cfg.to_args() and "claude" not in cfg.to_args()
    monkeypatch.setenv("HYBRID_SERVE_LLM__MODEL", "from-env")
    assert HybridServeConfig.load(f).llm.model == "from-env"


def test_every_section_says_what_applies_in_place():
    cfg = HybridServeConfig.load()
    assert set(cfg.slm.tunables()) == {
        "max_tokens",
        "temperature",
        "repetition_detection",
        "max_recited_words",
    }
    assert "engine" in cfg.slm.fixed() and "max_tokens" not in cfg.slm.fixed()
    assert "daily_budget_usd" in cfg.llm.tunables() and "model" in cfg.llm.fixed()
    assert "threshold" in cfg.escalation.tunables() and cfg.escalation.fixed() == {}
    assert {"host", "port"} <= set(cfg.http.fixed()) and "api_keys" in cfg.http.tunables()
