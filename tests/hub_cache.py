"""Build a Hugging Face hub cache on disk, so tests can exercise hub lookups offline.

Layout (what huggingface_hub writes after a real download)::

    cache_dir/models--{org}--{name}/
        blobs/<sha256 of content>
        snapshots/<40-hex commit>/<file>   -> relative symlink to ../../blobs/<sha>
        refs/<revision>                    holds the commit, with NO trailing newline
                                           (huggingface_hub reads it with f.read(), unstripped)

huggingface_hub 2.x reads HF_HUB_OFFLINE and HF_HUB_CACHE once, when
`huggingface_hub.constants` is first imported; hf_hub_download / snapshot_download /
is_offline_mode() then look up `constants.HF_HUB_CACHE` / `constants.HF_HUB_OFFLINE` at call
time. Setting the env vars in a test is therefore not enough if anything imported
huggingface_hub earlier, and importing it for the first time inside a test with the env set
would freeze those values for the rest of the session. `use_hub_cache` imports the constants
module first, then patches env and constants together (undone by monkeypatch).
`huggingface_hub.scan_cache_dir()` binds HF_HUB_CACHE at import: pass cache_dir to it explicitly.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path


def make_hub_repo(cache_dir: Path, repo_id: str, files: dict[str, bytes | Path],
                  revision: str = "main") -> Path:
    """Write `files` (repo path -> content or a file to copy) as a cached model repo at
    `revision`; return its snapshot folder (under cache_dir resolved, as the hub returns)."""
    cache_dir = Path(cache_dir).resolve()
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    contents = {name: data if isinstance(data, bytes) else Path(data).read_bytes()
                for name, data in files.items()}
    shas = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:  # a stable fake commit: same files, same hash
        commit = hashlib.sha1(repr(sorted(shas.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for name, data in contents.items():
        blob = repo / "blobs" / shas[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError:  # no symlinks (Windows without developer mode): the hub copies too
            shutil.copyfile(blob, link)
    if commit != revision:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    return snapshot


def use_hub_cache(monkeypatch, cache_dir: Path) -> None:
    """Point huggingface_hub at cache_dir, offline, for one test (see module docstring)."""
    from huggingface_hub import constants

    cache = str(Path(cache_dir).resolve())
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
