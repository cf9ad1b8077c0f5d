"""Which weights a checkpoint holds: its weight files by absolute path, size, mtime and sha256. An adapter records
its base model this way (model/lora.py) and is checked against it on load."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cpmctl.model.checkpoint import detect_format, weight_files

_SHA256_MEMO: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for this process: a run saving its adapter at every
    checkpoint hashes the base once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _SHA256_MEMO[key] = h.hexdigest()
    return _SHA256_MEMO[key]


def base_record(model: str | Path | None) -> dict | None:
    """The base checkpoint by absolute path and content: {path, format, files: [{name, bytes, mtime_ns, sha256}]}.
    None for what is not a checkpoint on disk (a ladder name or a config JSON: import-delta's --model)."""
    if model is None or not Path(model).exists() or Path(model).suffix == ".json":
        return None
    path = Path(model).resolve()
    files = []
    for f in weight_files(path):
        st = f.stat()
        files.append({"name": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)})
    return {"path": str(path), "format": detect_format(path), "files": files}


def same_base(recorded: dict, model_path: Path) -> tuple[bool, list[str]]:
    """Whether `model_path` holds the recorded weights, and its hashes (empty when the quick check settled it).
    Quick check (as rsync's): the same files at the recorded path with the recorded sizes and mtimes are taken as
    unchanged without reading them; anything else is hashed."""
    files = weight_files(model_path)
    want = {f["name"]: f for f in recorded["files"]}
    if str(model_path.resolve()) == recorded.get("path") and len(files) == len(want) and all(
        f.name in want and (f.stat().st_size, f.stat().st_mtime_ns) == (want[f.name]["bytes"], want[f.name]["mtime_ns"])
        for f in files
    ):
        return True, []
    ours = [file_sha256(f) for f in files]
    return sorted(ours) == sorted(f["sha256"] for f in recorded["files"]), ours
