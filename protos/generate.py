"""Regenerate the Python code for protos/tandem/v1/*.proto: `python -m protos.generate`.

The generated modules sit beside the .proto files and are committed, so installing Tandem needs
no code generation. `--check` regenerates into a temporary directory and exits 1 when a committed
file differs (the staleness test runs it). Import paths are rooted at the repository, so the
modules import each other as `protos.tandem.v1.common_pb2`.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = Path("protos/tandem/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((ROOT / PROTO_DIR).glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Run grpc_tools.protoc over every .proto, writing the modules under out_dir/protos/tandem/v1."""
    from grpc_tools import protoc

    (out_dir / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(p.relative_to(ROOT)) for p in proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")


def generated_names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def stale_files() -> list[str]:
    """Names of generated files that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh_dir, committed_dir = Path(tmp) / PROTO_DIR, ROOT / PROTO_DIR
        fresh, committed = generated_names(fresh_dir), generated_names(committed_dir)
        stale = sorted(fresh ^ committed)
        stale += sorted(n for n in fresh & committed if not filecmp.cmp(fresh_dir / n, committed_dir / n, shallow=False))
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated protobuf code: " + ", ".join(stale) + "; run `python -m protos.generate`")
            return 1
        print("generated protobuf code is up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        for name in generated_names(ROOT / PROTO_DIR):
            (ROOT / PROTO_DIR / name).unlink()
        for path in (Path(tmp) / PROTO_DIR).iterdir():
            shutil.copy(path, ROOT / PROTO_DIR / path.name)
    print(f"generated {len(generated_names(ROOT / PROTO_DIR))} files in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
