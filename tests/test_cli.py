"""Every `vql` subcommand answers --help, and readable errors replace tracebacks."""

from __future__ import annotations

import argparse

import pytest

from vql.streams.cli import build_parser, main


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, prefix + (name,))
    return paths


@pytest.mark.parametrize("path", command_paths(build_parser()), ids=" ".join)
def test_every_command_has_help(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: vql" in capsys.readouterr().out


def test_model_init_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "m.npz"
    assert main(["model", "init", "--out", str(target)]) == 0
    assert main(["model", "init", "--out", str(target)]) == 1
    assert "--force" in capsys.readouterr().err


def test_a_bad_setting_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setenv("VQL_BATCH_SIZE", "many")
    assert main(["model", "init", "--out", "/nonexistent/x.npz"]) == 2
    assert "bad setting VQL_BATCH_SIZE='many'" in capsys.readouterr().err


def test_train_follows_the_recipe_and_writes_a_loadable_artifact(tmp_path, capsys):
    from vql.model.encoder import VQLModel

    out = tmp_path / "m.npz"
    # the synthetic recipe's data, cut to the newest 30 events and three epochs to stay quick
    assert main(["train", "--dataset", "synthetic", "--epochs", "2", "--warmup-epochs", "1",
                 "--extra-quantized-epochs", "1", "--max-events", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(3 epochs, 1 unquantized)" in printed and "test auc" in printed
    _model, version = VQLModel.load(out)
    assert version in printed


def test_bench_codec_prints_one_json_line_per_figure(capsys):
    import json

    assert main(["bench", "codec", "--batch", "60", "--states", "20", "--seconds", "0.01"]) == 0
    figures = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(f["metric"], f.get("path") or f["step"]) for f in figures] == [
        ("us_per_record", "decode_event"), ("us_per_record", "decode_batch"),
        ("us_per_state", "encode_float32"), ("us_per_state", "encode_float64"),
        ("us_per_state", "decode_batch"), ("us_per_state", "decode_one")]
    assert all(f["value"] > 0 for f in figures)


def test_evaluate_merge_needs_an_earlier_grid(tmp_path, capsys):
    assert main(["evaluate", "--datasets", "synthetic", "--merge", "--out", str(tmp_path)]) == 1
    assert f"--merge needs an earlier {tmp_path / 'results.jsonl'}" in capsys.readouterr().err


def test_a_half_kafka_security_setting_is_reported_without_secrets(monkeypatch, capsys):
    monkeypatch.setenv("VQL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("VQL_KAFKA_SASL_PASSWORD", "hunter2")
    assert main(["model", "init", "--out", "/nonexistent/x.npz"]) == 2
    err = capsys.readouterr().err
    assert "VQL_KAFKA_SASL_USERNAME and VQL_KAFKA_SASL_PASSWORD" in err and "hunter2" not in err
    monkeypatch.setenv("VQL_KAFKA_SECURITY_PROTOCOL", "TLS")
    assert main(["model", "init", "--out", "/nonexistent/x.npz"]) == 2
    assert "bad setting VQL_KAFKA_SECURITY_PROTOCOL='TLS'" in capsys.readouterr().err
