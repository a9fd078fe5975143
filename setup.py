"""Build hook: generate the gRPC stubs from protos/ into condgen/v1/ before setuptools runs.

The stubs are build output (gitignored), never edited by hand.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def generate_stubs() -> None:
    from grpc_tools import protoc  # build requirement, see pyproject.toml

    include = str(ROOT / "protos")
    proto_files = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    out = str(ROOT)
    well_known = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{include}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *proto_files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {proto_files}")
    init = ROOT / "condgen" / "v1" / "__init__.py"
    init.write_text('"""Generated gRPC stubs of the condgen.v1 API (built from protos/)."""\n')


generate_stubs()
setup()
