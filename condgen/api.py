"""The whole flow from Python (a notebook, a script): train, export, serve, generate.

    import pandas as pd
    import condgen

    data = pd.read_csv("../shared/data/banking77/train.csv")          # columns text, category
    checkpoint = condgen.train(data, "ckpt/", config={"steps": 120})
    bundle = condgen.export(checkpoint, "bundle/")
    with condgen.serve(bundle) as server:                              # a real gRPC server, free port
        rows = server.generate_df(["card_arrival", "pin_blocked"], 20, seed=1)

Thin over the CLI's own pieces: `train` is `condgen train`, `export` is `condgen export`,
`serve` starts `condgen serve`'s server in a background thread and stops it on exit, and
the object it returns is a `condgen.client.Client` connected to it.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from condgen.client import Client


def training_config(config: Mapping[str, Any] | str | Path | None = None, **overrides):
    """A TrainingConfig from a Gretel-shaped dict (`{"models": [{"gpt_x": {...}}]}`), a flat dict of
    gpt_x fields (`{"steps": 120, "learning_rate": 5e-6}`), a YAML/JSON file, or the defaults;
    keyword arguments that are not None override it.

        config = condgen.training_config({"steps": 200, "group_by_intent": True}, seed=7)
    """
    from condgen.training.config import load_config, parse_config

    if config is None or isinstance(config, (str, Path)):
        loaded = load_config(config)
    elif "models" in config:
        loaded = parse_config(dict(config))
    else:
        loaded = parse_config({"models": [{"gpt_x": dict(config)}]})
    return loaded.with_overrides(**overrides)


def train(
    data,
    output: str | Path,
    *,
    config: Mapping[str, Any] | str | Path | None = None,
    base_model: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    **overrides,
) -> Path:
    """Fine-tune a generator on `data` (a pandas DataFrame, a CSV path or `hf:NAME`); returns the
    checkpoint folder. Columns are guessed (`text`; `intent`/`category`/`label`) unless named.

        checkpoint = condgen.train(df, "ckpt/", config="natural-language-gpt.yml", base_model="smollm2-135m")
    """
    from condgen.training.finetune import finetune

    output = Path(output)
    source = _data_source(data, output)
    settings = training_config(
        config,
        data_source=source,
        pretrained_model=base_model,
        text_column=text_column,
        label_column=label_column,
        **overrides,
    )
    return finetune(settings, output).output_dir


def _data_source(data, output: Path) -> str:
    """A path the trainer can read: DataFrames are written beside the checkpoint."""
    if isinstance(data, (str, Path)):
        return str(data)
    output.mkdir(parents=True, exist_ok=True)
    path = output / "training_data.csv"
    data.to_csv(path, index=False)
    return str(path)


def export(checkpoint: str | Path, output: str | Path, **options) -> Path:
    """Export a checkpoint to a servable bundle folder (ONNX graph, tokenizer, manifest, classifier);
    options as `condgen export`'s (`variant="fp16"`, `cache="whole"`, ...).

        bundle = condgen.export("ckpt/", "bundle/")
    """
    from condgen.training.export import export_bundle

    return export_bundle(checkpoint, output, **options).bundle_dir


class LocalServer(Client):
    """`condgen serve` in a background thread on 127.0.0.1 and a free port, with a `Client` to it.
    Use it as a context manager (or call `stop()`).

        with condgen.serve("bundle/") as server:
            print(server.target, server.list_intents())
    """

    def __init__(self, config, timeout: float | None = None, engine=None):
        self.config = config  # a condgen.server.app.ServeConfig
        self.engine = engine  # None: the bundle's graph (see `start_server`)
        self.running: Any = None  # condgen.server.app.RunningServer once started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve()), daemon=True, name="condgen-local-server"
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        super().__init__(self.target, timeout)

    async def _serve(self) -> None:
        from condgen.server.app import start_server

        self._loop = asyncio.get_running_loop()
        try:
            self.running = await start_server(self.config, self.engine)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by __init__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self.running.stopped.wait()

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Close the client, drain the server and join its thread."""
        self.close()
        if self._loop is not None and self.running is not None and not self.running.stopped.is_set():
            asyncio.run_coroutine_threadsafe(self.running.stop(), self._loop).result(60)
        self._thread.join(60)

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(bundle: str | Path, timeout: float | None = None, **settings) -> LocalServer:
    """Serve a bundle from this process until the `with` block ends; settings as `ServeConfig`'s
    (`scheduler=SchedulerConfig(max_batch_size=64)`, `defaults=Defaults(label_check=False)`, ...).

        with condgen.serve("bundle/") as server:
            df = server.generate_df(["card_arrival"], 10, seed=1)
    """
    from condgen.server.app import ServeConfig

    settings.setdefault("grace_seconds", 5.0)
    return LocalServer(ServeConfig(bundle=Path(bundle), port=0, **settings), timeout)


def scratch_folder(prefix: str = "condgen-") -> Path:
    """A new temporary folder (for notebooks that should not write beside themselves)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
