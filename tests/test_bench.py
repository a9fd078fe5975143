"""`condgen bench --quick` on the tiny bundle: every figure the JSON promises is there."""

import json

from condgen.bench.__main__ import main

KEYS = [
    "engine_tok_s_b1",
    "engine_tok_s_b16",
    "transformers_tok_s_b1",
    "transformers_tok_s_b16",
    "optimum_tok_s_b1",
    "optimum_tok_s_b16",
    "server_tok_s_c1",
    "server_tok_s_c16",
    "server_tok_s_c64",
    "inproc_tok_s_c16",
    "continuous_tok_s_mixed",
    "static_tok_s_mixed",
    "ttft_p50_ms_c16",
    "ttft_p95_ms_c16",
    "tpot_ms_c16",
    "peak_rss_mb",
    "device",
    "model",
    "threads",
    "git_sha",
]


def test_quick_bench_writes_every_key(bundle, checkpoint, tmp_path, capsys):
    out = tmp_path / "latest.json"
    assert (
        main(
            [
                "--bundle",
                str(bundle),
                "--checkpoint",
                str(checkpoint),
                "--quick",
                "--new-tokens",
                "8",
                "--prompt-examples",
                "3",
                "--max-batch-tokens",
                "4000",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in report]
    assert not missing
    assert report["max_batch_size"] == 32 and report["max_batch_tokens"] == 4000
    assert all(report[k] > 0 for k in KEYS if k.endswith("tok_s_b1") or k.startswith("server_tok_s"))
    assert report["device"] == "CPUExecutionProvider" and report["peak_rss_mb"] > 10
    assert "continuous / static, mixed" in capsys.readouterr().out
