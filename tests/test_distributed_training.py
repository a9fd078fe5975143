"""`condgen train` under torchrun: two CPU processes over gloo give one checkpoint shaped like a
single-process run's, written by rank 0 only."""

import json
import os
import socket
import subprocess
import sys

from test_training import png_size

STEPS, LOGGING_STEPS, EVAL_STEPS = 20, 5, 10
PROCESSES = 2
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path, train_csv, tiny_base):
    path.write_text(f"""schema_version: "1.0"
name: ddp-test
models:
  - gpt_x:
      data_source: {train_csv}
      pretrained_model: {tiny_base}
      batch_size: 4
      steps: {STEPS}
      learning_rate: 0.005
      warmup_steps: 2
      lr_scheduler: linear
      weight_decay: 0.0
      max_tokens: 64
      validation_fraction: 0.2
      eval_steps: {EVAL_STEPS}
      save_steps: 1000
      logging_steps: {LOGGING_STEPS}
      seed: 0
""")
    return path


def final_files(folder) -> set[str]:
    """Names of the checkpoint's files, without the Trainer's own checkpoints."""
    return {p.name for p in folder.iterdir() if p.name != "trainer"}


def test_torchrun_two_cpu_processes_write_one_checkpoint(tmp_path, train_csv, tiny_base):
    import torch
    from transformers import AutoModelForCausalLM

    from condgen.training.config import load_config
    from condgen.training.finetune import finetune

    config_path = write_config(tmp_path / "train.yaml", train_csv, tiny_base)
    out = tmp_path / "ddp"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # CPU processes: gloo
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(PROCESSES),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "condgen",
        "train",
        "--config",
        str(config_path),
        "--output",
        str(out),
    ]
    done = subprocess.run(
        command, check=False, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stdout[-4000:]
    # rank 0 alone prints the progress bar's loss lines, one per logging step
    assert done.stdout.count("{'loss':") == STEPS // LOGGING_STEPS, done.stdout[-4000:]
    assert done.stdout.count("checkpoint written to") == 1, done.stdout[-4000:]  # one process reports

    single = finetune(load_config(config_path), tmp_path / "single").output_dir
    assert final_files(out) == final_files(single)
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "metrics.json",
        "loss_curve.png",
        "condgen_training.json",
        "examples.json",
    } <= final_files(out)
    assert json.loads((out / "config.json").read_text()) == json.loads((single / "config.json").read_text())

    info, single_info = (json.loads((d / "condgen_training.json").read_text()) for d in (out, single))
    assert info["config"] == single_info["config"] and info["intents"] == single_info["intents"]
    stats = info["stats"]
    assert stats["world_size"] == PROCESSES and stats["optimizer_steps"] == STEPS
    # the packed data holds the whole group's batches: each process gets its own share
    assert stats["train_blocks"] >= STEPS * 4 * PROCESSES > single_info["stats"]["train_blocks"] >= STEPS * 4
    assert stats["validation_loss"] is not None

    checkpoints = sorted(p.name for p in (out / "trainer").iterdir())
    assert checkpoints == [f"checkpoint-{STEPS}"]
    state = json.loads((out / "trainer" / checkpoints[0] / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == STEPS
    assert {p.name for p in (out / "trainer" / checkpoints[0]).glob("rng_state*")} == {
        f"rng_state_{rank}.pth" for rank in range(PROCESSES)
    }

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] and metrics["world_size"] == PROCESSES and metrics["global_step"] == STEPS
    assert [row["step"] for row in metrics["train"]] == list(range(LOGGING_STEPS, STEPS + 1, LOGGING_STEPS))
    assert all(row["loss"] is not None for row in metrics["train"])
    assert [row["step"] for row in metrics["eval"]] == [EVAL_STEPS, STEPS]
    assert png_size(out / "loss_curve.png")[0] > 0

    trained = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    shapes = {name: tuple(p.shape) for name, p in trained.named_parameters()}
    assert shapes == {name: tuple(p.shape) for name, p in base.named_parameters()}
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters()))
