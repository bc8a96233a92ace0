import pytest

from traceguard.config import ConfigError, PipelineConfig, load_config, parse_duration


@pytest.mark.parametrize("text, nanos", [("30s", 30 * 10**9), ("250ms", 250 * 10**6), ("5m", 300 * 10**9),
                                          ("1.5h", 5400 * 10**9), (2, 2 * 10**9), ("7", 7 * 10**9)])
def test_durations(text, nanos):
    assert parse_duration(text) == nanos


def test_overrides_and_file(tmp_path):
    path = tmp_path / "tg.toml"
    path.write_text('[assembler]\ndecision_wait = "10s"\n[logs]\nmax_linked = 3\n')
    config = load_config(path, {"assembler.max_trace_age": "2m", "assembler.allowed_lateness": None})
    assert config.assembler.decision_wait == 10 * 10**9
    assert config.assembler.max_trace_age == 120 * 10**9
    assert config.logs.max_linked == 3


@pytest.mark.parametrize("overrides, key", [
    ({"assembler.decision_wait": "soon"}, "assembler.decision_wait"),
    ({"assembler.max_spans_in_flight": 0}, "assembler.max_spans_in_flight"),
    ({"assembler.decison_wait": "1s"}, "assembler.decison_wait"),
    ({"assembler.decision_wait": "10m", "assembler.max_trace_age": "1m"}, "max_trace_age must be at least"),
    ({"structural.unpaired_min_ratio": 1.5}, "structural.unpaired_min_ratio"),
])
def test_invalid_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[assembler\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_the_readme_example_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parent / "data" / "traceguard.toml")
    assert config.learned.forest.score_quantile == 0.02
    assert config.assembler.decided_ttl == 3600 * 10**9


def test_yaml_config_and_environment_and_flags_in_that_order(tmp_path):
    path = tmp_path / "tg.yaml"
    path.write_text("serve:\n  grpc_listen: 127.0.0.1:5317\n  http_listen: 127.0.0.1:5318\nassembler:\n  decision_wait: 5s\n")
    config = load_config(path, {"serve.http_listen": "127.0.0.1:7318"},
                         {"TRACEGUARD_SERVE__GRPC_LISTEN": "127.0.0.1:6317", "TRACEGUARD_LOGS__MAX_LINKED": "4",
                          "OTHER_VARIABLE": "ignored"})
    assert config.serve.grpc_listen == "127.0.0.1:6317"    # env over file
    assert config.serve.http_listen == "127.0.0.1:7318"    # flag over file
    assert config.assembler.decision_wait == 5 * 10**9     # file over default
    assert config.logs.max_linked == 4
    with pytest.raises(ConfigError, match="serve: Value error, api_listen must be HOST:PORT"):
        load_config(None, {"serve.api_listen": "8080"}, {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(bad, environ={})


def test_a_dumped_config_reads_back_the_same():
    """Durations are dumped with their unit: a bare number would read back as seconds."""
    config = PipelineConfig.model_validate({"assembler": {"decision_wait": "250ms"}, "errors": {"window": "1m"}})
    assert PipelineConfig.model_validate(config.model_dump()) == config
    assert PipelineConfig.model_validate_json(config.model_dump_json()) == config
    assert config.model_dump()["assembler"]["decision_wait"] == "250000000ns"


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[serve]\nstate_dir = "from-file"\napi_listen = "127.0.0.1:1"\ngrpc_listen = "127.0.0.1:2"\n')
    environ = {"TRACEGUARD_SERVE__STATE_DIR": "from-env", "TRACEGUARD_SERVE__API_LISTEN": "127.0.0.1:3"}
    # a flag that was not given (None) leaves the environment's value
    config = load_config(path, {"serve.state_dir": None, "serve.api_listen": "127.0.0.1:4"}, environ=environ)
    assert str(config.serve.state_dir) == "from-env"  # environment over file
    assert config.serve.api_listen == "127.0.0.1:4"  # flag over environment
    assert config.serve.grpc_listen == "127.0.0.1:2"  # file over default
    assert config.serve.http_listen == PipelineConfig().serve.http_listen  # default


def test_an_environment_value_is_validated_and_the_error_names_the_variable():
    environ = {"TRACEGUARD_ASSEMBLER__DECISION_WAIT": "later"}
    with pytest.raises(ConfigError, match="assembler.decision_wait .from environment variable "
                                          "TRACEGUARD_ASSEMBLER__DECISION_WAIT."):
        load_config(None, {"assembler.decision_wait": None}, environ=environ)


def test_variables_that_name_no_setting_are_ignored_with_a_warning():
    """Kubernetes injects TRACEGUARD_SERVICE_HOST and TRACEGUARD_PORT for a Service named traceguard."""
    warnings: list[str] = []
    environ = {"TRACEGUARD_SERVICE_HOST": "10.0.0.1", "TRACEGUARD_PORT": "tcp://10.0.0.1:8080",
               "TRACEGUARD_SERVE": "x", "TRACEGUARD_SERVE__TICK": "1s"}
    config = load_config(None, environ=environ, warn=warnings.append)
    assert config.serve.tick == 10**9
    assert sorted(w.split()[3].rstrip(":") for w in warnings) == ["TRACEGUARD_PORT", "TRACEGUARD_SERVE", "TRACEGUARD_SERVICE_HOST"]


@pytest.mark.parametrize("link", ["https://jaeger.example/trace", "javascript:alert(1)//{trace_id}"])
def test_a_trace_link_without_the_trace_id_or_not_http_is_refused(link):
    with pytest.raises(ConfigError, match="ui.trace_link"):
        load_config(overrides={"ui.trace_link": link}, environ={})


def test_stage_series_keep_their_bound_of_stages_and_windows():
    from traceguard.models.series import StageSeries

    series = StageSeries(windows=3, max_stages=1)
    for window in range(5):
        series.latency(("api", "GET /", 2), window, 10, 1e6, 2e6)
        series.errors(("api", "GET /", 2), window, 10, window)
    series.latency(("db", "SELECT", 3), 0, 10, 1e6, 2e6)  # past max_stages: counted, not kept
    (entry,) = series.of("api", "GET /")
    assert [w["start"] for w in entry["latency"]] == [2, 3, 4] and entry["span_kind"] == "server"
    assert [w["failed"] for w in entry["errors"]] == [2, 3, 4]
    assert series.of("db", "SELECT") == [] and series.untracked_ == 1
