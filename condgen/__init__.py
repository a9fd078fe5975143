"""condgen: grow a labelled text dataset with synthetic `intent,text` records.

Shared by every part: the record codec (`condgen.codec`), the bundle manifest
(`condgen.bundle`) and the generated gRPC stubs (`condgen.v1`). The whole flow from Python
(`condgen.train`, `condgen.export`, `condgen.serve`) lives in `condgen.api`, imported on first use.
"""

__version__ = "0.1.0"

_API = ("train", "export", "serve", "training_config", "LocalServer")


def __getattr__(name: str):
    if name == "api" or name in _API:
        import importlib

        api = importlib.import_module("condgen.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'condgen' has no attribute {name!r}")
