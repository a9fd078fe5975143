"""The `condgen` command line: generate to files, clear errors instead of tracebacks."""

import json

import pandas as pd
import pytest

from condgen.cli import main


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_generate_writes_each_format(server, tmp_path, suffix, capsys):
    out = tmp_path / f"records{suffix}"
    code = main(
        [
            "generate",
            "--target",
            server.target,
            "--intent",
            "card_arrival",
            "--intent",
            "exchange_rate",
            "--num-records",
            "2",
            "--seed",
            "5",
            "--max-new-tokens",
            "48",
            "--allow-training-copies",
            "--allow-recent-duplicates",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    frame = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True)}[suffix](
        out
    )
    assert list(frame.columns) == ["intent", "text"]
    assert sorted(frame["intent"]) == ["card_arrival", "card_arrival", "exchange_rate", "exchange_rate"]
    assert "accepted 4 of" in capsys.readouterr().out


def test_generate_refuses_unknown_formats_and_intents(server, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--target",
                server.target,
                "--intent",
                "card_arrival",
                "--num-records",
                "1",
                "--output",
                str(tmp_path / "x.xlsx"),
            ]
        )
        == 2
    )
    assert "use a .csv, .parquet or .jsonl" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--target",
                server.target,
                "--intent",
                "nope",
                "--num-records",
                "1",
                "--output",
                str(tmp_path / "x.csv"),
            ]
        )
        == 2
    )
    assert "INVALID_ARGUMENT: unknown intent 'nope'" in capsys.readouterr().err


def test_intents_and_info(server, capsys):
    assert main(["intents", "--target", server.target]) == 0
    assert "card_arrival\t6" in capsys.readouterr().out
    assert main(["info", "--target", server.target]) == 0
    assert json.loads(capsys.readouterr().out)["numIntents"] == 3
    assert main(["health", "--target", server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_health_of_a_dead_target_is_an_error(capsys):
    import socket

    with socket.socket() as probe:  # a free port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["health", "--target", f"127.0.0.1:{port}"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_bad_config_and_missing_bundle_are_one_line_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("models:\n  - gpt_x:\n      batchsize: 2\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "o")]) == 2
    assert "unknown field `batchsize`" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "export", "serve", "generate", "intents", "info", "health", "report"):
        assert command in out


def test_generate_that_cannot_complete_writes_what_it_has_and_exits_2(server, tmp_path, capsys):
    """A label margin no line can reach: every follow-up call comes back empty; the command
    says which counts are missing, writes the (empty) rows it has and fails."""
    out = tmp_path / "strict.csv"
    argv = ["generate", "--target", server.target, "--intent", "card_arrival", "--num-records", "2"]
    argv += ["--seed", "4", "--max-new-tokens", "32", "--label-margin", "50", "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "records still missing per intent: card_arrival: 2" in err and "Traceback" not in err
    assert out.exists() and len(pd.read_csv(out)) == 0
