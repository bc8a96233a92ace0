"""``traceguard replay`` as a user runs it: a real process over generated files."""

import gzip
import json
import subprocess
import sys

import pytest

from traceguard.records import Anomaly


def replay(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "traceguard", "replay", *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def baseline(scenario):
    return replay(scenario / "traces.jsonl", "--logs", scenario / "logs.jsonl")


def test_findings_are_anomaly_jsonl_and_summary_goes_to_stderr(baseline):
    lines = baseline.stdout.splitlines()
    assert lines
    anomalies = [Anomaly.model_validate_json(line) for line in lines]
    assert {a.kind.value for a in anomalies} >= {"missing_root", "missing_parent", "late_span"}
    assert any(a.logs for a in anomalies)
    assert "traceguard replay:" in baseline.stderr and "missing_root" in baseline.stderr


def test_every_finding_on_a_trace_with_span_events_carries_them(scenario, baseline):
    """The generator records refused connections as ``exception`` events and
    exports no log record for them; the protobuf replay is byte-identical
    (``test_protobuf_files_give_the_same_findings``), so both encodings do this."""
    evented = {span["traceId"] for line in (scenario / "traces.jsonl").read_text().splitlines()
               for resource in json.loads(line).get("resourceSpans", ()) for scope in resource["scopeSpans"]
               for span in scope["spans"] if span.get("events")}
    on_them = [a for a in map(Anomaly.model_validate_json, baseline.stdout.splitlines()) if a.trace_id in evented]
    assert on_them, "the scenario has findings on traces with span events"
    for anomaly in on_them:
        assert any(log.body.startswith("ConnectionRefusedError: [Errno 111] Connection refused\nTraceback")
                   and log.severity_text == "ERROR" for log in anomaly.logs), anomaly


def test_two_replays_are_byte_identical(scenario, baseline, tmp_path):
    out = tmp_path / "again.jsonl"
    replay(scenario / "traces.jsonl", "--logs", scenario / "logs.jsonl", "--out", out)
    assert out.read_text() == baseline.stdout


def test_gzip_input_gives_the_same_output(scenario, baseline, tmp_path):
    for name in ("traces.jsonl", "logs.jsonl"):
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress((scenario / name).read_bytes()))
    again = replay(tmp_path / "traces.jsonl.gz", "--logs", tmp_path / "logs.jsonl.gz")
    assert again.stdout == baseline.stdout


def test_protobuf_files_give_the_same_findings(scenario_proto, baseline):
    again = replay(scenario_proto / "traces.pb", "--logs", scenario_proto / "logs.pb")
    assert again.stdout == baseline.stdout


def test_corrupt_line_is_reported_with_file_and_line_and_skipped(scenario, baseline, tmp_path):
    lines = (scenario / "traces.jsonl").read_bytes().splitlines(keepends=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"".join(lines[:3] + [b'{"resourceSpans": [{"scopeSpans": [{"spans": [\n'] + lines[3:]))
    result = replay(broken, "--logs", scenario / "logs.jsonl")
    assert f"{broken}:4: corrupt, skipped: invalid JSON" in result.stderr
    assert result.stdout == baseline.stdout
    assert "1 input line(s) could not be read and were skipped (traceguard_replay_corrupt_total)" in result.stderr


def test_strict_makes_a_corrupt_line_fatal(scenario, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes((scenario / "traces.jsonl").read_bytes() + b"garbage\n")
    result = replay(broken, "--strict", check=False)
    assert result.returncode == 2
    assert f"{broken}:" in result.stderr and "invalid JSON" in result.stderr


def test_rejected_spans_are_reported_and_the_rest_replayed(tmp_path):
    good = {"traceId": "01" * 16, "spanId": "02" * 8, "name": "root", "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
    bad = dict(good, spanId="0102")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [bad, good]}]}]}) + "\n")
    result = replay(path)
    assert f"{path}:1: 1 record(s) rejected: span 0102: spanId must be 8 bytes" in result.stderr
    assert "traceguard replay: 1 spans, 1 traces" in result.stderr
    assert "1 span(s) rejected as invalid (ids, times), the rest of their records kept " \
           "(traceguard_spans_rejected_total{transport=file})" in result.stderr


def test_truncated_protobuf_file_names_the_message(scenario_proto, tmp_path):
    data = (scenario_proto / "traces.pb").read_bytes()
    cut = tmp_path / "cut.pb"
    cut.write_bytes(data[: len(data) // 2])
    result = replay(cut)
    assert "truncated: the file ends inside this message" in result.stderr
    assert result.stdout  # what came before the cut was still replayed


def test_a_file_of_which_nothing_could_be_read_is_an_error(tmp_path):
    text = tmp_path / "hello.txt"
    text.write_text("hello world\n")
    result = replay(text, check=False)
    assert result.returncode == 2, result.stderr  # was exit 0, "0 spans"
    assert "no span could be read from the input (1 corrupt line(s))" in result.stderr


def test_empty_file_is_fine_and_missing_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = replay(empty)
    assert result.stdout == "" and "0 spans, 0 traces, 0 incidents, 0 anomalies" in result.stderr
    missing = replay(tmp_path / "nope.jsonl", check=False)
    assert missing.returncode == 2 and "no such file" in missing.stderr


@pytest.mark.parametrize("flag", ["--out", "--incidents-out"])
def test_an_output_that_cannot_be_written_is_said_plainly(tmp_path, flag):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = replay(empty, flag, tmp_path / "no" / "such" / "dir" / "out.jsonl", check=False)
    assert result.returncode == 2 and f"cannot write {flag}" in result.stderr and "Traceback" not in result.stderr


def test_invalid_flag_value_names_the_setting(scenario):
    result = replay(scenario / "traces.jsonl", "--decision-wait", "later", check=False)
    assert result.returncode == 2 and "assembler.decision_wait" in result.stderr


def _traceguard(*args):
    return subprocess.run([sys.executable, "-m", "traceguard", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_train_writes_a_model_dir_that_replay_starts_from(scenario, tmp_path):
    models = tmp_path / "models"
    trained = _traceguard("train", scenario / "traces.jsonl", "--model-dir", models)
    assert trained.returncode == 0, trained.stderr
    assert trained.stdout == ""  # training writes models, not findings
    assert sorted(p.name for p in models.iterdir()) == ["forest.npz", "latency.npz", "manifest.json", "rates.json",
                                                        "structure.json", "templates.json"]
    assert "error_regression" in json.loads((models / "rates.json").read_text())
    warm = replay(scenario / "traces.jsonl", "--model-dir", models)
    assert warm.stdout  # same structural findings; the learned ones start warm
    (models / "latency.npz").write_bytes(b"not numpy")
    refused = replay(scenario / "traces.jsonl", "--model-dir", models, check=False)
    assert refused.returncode == 2 and "does not match its checksum" in refused.stderr


def test_the_summary_says_in_words_what_its_counts_mean(capsys):
    from traceguard.cli import _print_summary

    _print_summary({"traceguard_spans_accepted_total": 10,
                    "traceguard_logs_evicted_total": {"reason=ttl": 3304, "reason=bound": 7}}, "replay")
    err = capsys.readouterr().err
    assert "3304 log record(s) expired after logs.ttl with no finding to link them to (normal)" in err
    assert "7 log record(s) dropped at logs.max_records before their trace was judged" in err


def test_help_says_what_it_is_how_to_run_it_how_it_ends_and_what_the_environment_sets(capsys):
    from traceguard.cli import _parser

    parser = _parser()
    text = parser.format_help()
    assert text.splitlines()[2].startswith("traceguard: finds what went wrong")  # a one-line description first
    for part in ("examples:", "exit codes:", "  2  usage, configuration or input error", "TRACEGUARD_SERVE__TOKEN",
                 "flags > environment > --config file > defaults"):
        assert part in text, part
    subcommands = parser._subparsers._group_actions[0].choices
    assert set(subcommands) == {"replay", "train", "serve", "consume"}
    config_helps = set()
    for name, command in subcommands.items():
        assert command.description and "examples:" in command.format_help(), name
        config_helps |= {a.help for a in command._actions if "--config" in a.option_strings}
    assert config_helps == {"TOML, YAML or JSON file with the settings (see the README); flags and the "
                            "environment override it"}  # the same words everywhere
