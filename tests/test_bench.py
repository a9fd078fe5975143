"""`condgen bench --quick` on the tiny bundle: every figure the JSON promises is there."""

import json
import os

import pytest

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
    "engine_q_variant",
    "engine_q_tok_s_b1",
    "engine_q_tok_s_b16",
    "engine_q_greedy_match",
    "engine_q_top1_agreement",
    "engine_q_mean_kl",
    "engine_greedy_match",
    "engine_prefill_tok_s_b16",
    "engine_decode_ms_b1",
    "engine_q_decode_ms_b16",
    "peak_rss_mb_q",
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
                "--no-peers",
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
    assert report["engine_q_variant"] == "w8" and 0 <= report["engine_q_greedy_match"] <= 1
    assert report["engine_greedy_match"] == 1.0  # fp32 engine: transformers' greedy tokens
    if os.environ.get("CONDGEN_REQUIRE_OPENVINO"):  # CI has optimum-intel's environment
        ov_keys = ("engine_ov_tok_s_b1", "engine_ov_tok_s_b16", "engine_ov_prefill_tok_s_b16", "peak_rss_mb_ov")
        assert all(report[k] > 0 for k in ov_keys) and 0 <= report["engine_ov_greedy_match"] <= 1
        assert report["engine_ov_device"].startswith("OpenVINO CPU")
    assert 0.5 < report["engine_q_top1_agreement"] <= 1 and 0 < report["engine_q_mean_kl"] < 0.5
    printed = capsys.readouterr().out
    assert "continuous / static, mixed" in printed
    assert "engine fp32 / OpenVINO fp32, batch 1" in printed and "skipped" in printed  # no peers asked for


def test_gpu_engine_script_rehearses_on_the_cpu(bundle, checkpoint, tmp_path):
    """`python -m condgen.bench.gpu_engine --device cpu` runs every part of the GPU script (engine
    batches with the step split, transformers, the server under concurrent streams) and writes
    the keys the GPU run reports."""
    from condgen.bench import gpu_engine

    out = tmp_path / "gpu.json"
    argv = ["--bundle", str(bundle), "--checkpoint", str(checkpoint), "--device", "cpu", "--output", str(out)]
    assert gpu_engine.main([*argv, "--batches", "1,16", "--streams", "2", "--new-tokens", "6"]) == 0
    report = json.loads(out.read_text())
    for key in ("engine_tok_s_b1", "engine_tok_s_b16", "transformers_tok_s_b1", "transformers_tok_s_b16"):
        assert report[key] > 0, key
    assert report["server_tok_s_c2"] > 0 and report["server_records_s_c2"] > 0
    assert report["device"] == "CPUExecutionProvider" and report["cuda_graphs"] is False
    assert len(report["git_sha"] or "") in (0, 40)
    split = report["step_b16"]
    assert split["model_ms"] > 0 and split["head_ms"] > 0
    assert split["model_ms"] + split["head_ms"] + split["host_ms"] == pytest.approx(split["decode_ms"], abs=0.01)


def test_overload_bench_reports_every_call(bundle, tmp_path, capsys):
    """A small overload run against the tiny bundle: every call is accounted for, and with a
    prior of 1 row/s and a 10 s deadline, 8 calls of 20 rows each cannot all be admitted."""
    from condgen.bench.overload import main

    output = tmp_path / "overload.json"
    argv = ["--bundle", str(bundle), "--streams", "8", "--deadline", "10", "--records", "20", "--output", str(output)]
    argv += ["--intents", "card_arrival,exchange_rate", "--serve-arg=--admission-prior-rows-per-second=1"]
    assert main(argv) == 0
    figures = json.loads(output.read_text())
    assert sum(figures["by_status"].values()) == figures["calls"] == 8
    assert set(figures["by_status"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert figures["by_status"]["RESOURCE_EXHAUSTED"] >= 4
    assert figures["refusals_with_retry_after"] == figures["by_status"]["RESOURCE_EXHAUSTED"]
    assert figures["ok_calls_complete"] == figures["by_status"]["OK"] >= 1
    assert figures["slowest_refusal_s"] < 2.0 and figures["server_serving_after"]
    assert "wrote" in capsys.readouterr().out
