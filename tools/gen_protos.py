"""Regenerate the Python code and the descriptor image from protos/.

One command (`make gen`) reproduces every file under gen/ exactly: protoc output is deterministic, so CI
regenerates and fails when anything differs (`make gen-check`). gen/coins.protoset is the
self-contained descriptor set for clients in other languages.

protovalidate's wheel ships the descriptor of buf/validate/validate.proto but not its source, so it is
exported from the installed package into a FileDescriptorSet that protoc reads as an import.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import protovalidate
from google.protobuf import descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GEN = ROOT / "gen"
IMAGE = ROOT / "build" / "image.binpb"
ERROR_DETAILS = ("google/rpc/status.proto", "google/rpc/error_details.proto")
"""Not imported by the contracts, but every error carries them (ErrorInfo, BadRequest, RetryInfo)."""
PROTOSET = GEN / "coins.protoset"
"""Every contract with everything it imports (buf/validate, google/type, google/rpc), comments
included, in one FileDescriptorSet: what a client in any language loads (grpc-js, grpcurl -protoset)."""


def _validate_descriptor_set(path: Path) -> None:
    fds = descriptor_pb2.FileDescriptorSet()
    for module in (descriptor_pb2, duration_pb2, field_mask_pb2, timestamp_pb2):
        module.DESCRIPTOR.CopyToProto(fds.file.add())
    validate_file = protovalidate.ViolationsPb.desc().file.proto.to_binary()  # type: ignore[attr-defined]
    fds.file.add().ParseFromString(validate_file)
    path.write_bytes(fds.SerializeToString())


def _protoc(*args: str) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    site = sysconfig.get_paths()["purelib"]
    bin_dir = Path(sys.executable).parent
    plugins = [
        f"--plugin=protoc-gen-{name}={bin_dir / f'protoc-gen-{name}'}"
        for name in ("mypy", "mypy_grpc")
    ]
    code = protoc.main(["protoc", f"-I{PROTOS}", f"-I{site}", f"-I{include}", *plugins, *args])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


def main() -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        fds = Path(tmp) / "validate.binpb"
        _validate_descriptor_set(fds)
        out = Path(tmp) / "gen"
        out.mkdir()
        outputs = [f"--python_out={out}", f"--grpc_python_out={out}", f"--mypy_out={out}"]
        _protoc(f"--descriptor_set_in={fds}", *outputs, f"--mypy_grpc_out={out}", *sources)
        _protoc(
            f"--descriptor_set_in={fds}",
            f"--python_out={out}",
            f"--mypy_out={out}",
            "buf/validate/validate.proto",
        )
        IMAGE.parent.mkdir(exist_ok=True)
        _protoc(
            f"--descriptor_set_in={fds}",
            f"--descriptor_set_out={IMAGE}",
            "--include_imports",
            "--include_source_info",
            *sources,
            *ERROR_DETAILS,
        )
        for package in out.rglob("*"):
            if package.is_dir():
                (package / "__init__.py").touch()
        shutil.copyfile(IMAGE, out / PROTOSET.name)
        if GEN.exists():
            shutil.rmtree(GEN)
        shutil.copytree(out, GEN)
    print(
        f"generated {sum(1 for _ in GEN.rglob('*.py*'))} files under gen/ and {IMAGE.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
