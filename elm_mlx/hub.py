"""Names to model folders. A folder is used as it is. A preset or a hub id is
downloaded into the standard Hugging Face cache (so other tools share it),
then converted once; the conversion is kept in elm-mlx's own cache, keyed by
the hub commit and the dtype."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import dtype_name, parse_dtype
from .config import PRESETS, nearest_preset, preset_name
from .errors import ArgumentError, ElmError, quoted

# What an OpenELM repo needs; Apple's also hold remote code we never run. tokenizer.json: what
# mlx-community repos (mlx_lm.convert) carry instead of tokenizer.model (elm_mlx/tokenizer_json.py).
ALLOW = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model", "tokenizer.json"]


def cache_root() -> Path:
    if os.environ.get("ELM_MLX_CACHE"):
        return Path(os.environ["ELM_MLX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "elm-mlx"


# How long a hub request may take before we call the hub unreachable: a network that
# accepts connections but never answers must not hang a command (huggingface_hub's own
# retries would spend half a minute in "Retrying in 1s" messages first).
HUB_TIMEOUT = 5.0
_NAME = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"  # the hub's rule: no leading/trailing . or -


def repo_id(name: str) -> str | None:
    preset = preset_name(name)
    if preset:
        return f"apple/OpenELM-{preset}"
    if re.fullmatch(f"{_NAME}/{_NAME}", name) and ".." not in name and "--" not in name:
        return name
    return None


def hub_reachable(timeout: float | None = None) -> str | None:
    """None when the Hugging Face hub answers an HTTP request within `timeout` seconds
    (or offline mode is on: then it is never asked), else why not, in a few words.
    Asked through huggingface_hub's own HTTP session: its proxies and certificates."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_TIMEOUT if timeout is None else timeout)
    except Exception as e:  # timeouts, refused connections, DNS, TLS: any answer at all would not raise
        return f"{constants.ENDPOINT} did not answer: {quoted(str(e) or type(e).__name__, 120)}"
    return None


def download(repo: str, flag: str = "--model") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    unreachable = hub_reachable()
    try:
        if unreachable:
            try:
                return Path(snapshot_download(repo, allow_patterns=ALLOW, local_files_only=True))
            except LocalEntryNotFoundError:
                raise ElmError(f"{repo} is not in the Hugging Face cache and the hub can't be reached "
                               f"({unreachable}): connect once to download it, or pass a local folder to "
                               f"{flag}") from None
        return Path(snapshot_download(repo, allow_patterns=ALLOW, etag_timeout=HUB_TIMEOUT))
    except GatedRepoError:
        raise ElmError(f"{repo} is gated on the Hugging Face hub: accept its terms there and log in "
                       "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ElmError(f"{repo} was not found on the Hugging Face hub: check the id "
                       f"(presets: {', '.join(PRESETS)})") from None
    except LocalEntryNotFoundError:
        raise ElmError(f"{repo} is not in the Hugging Face cache and the hub can't be reached "
                       "(offline, or HF_HUB_OFFLINE=1): connect once to download it, or pass a local "
                       f"folder to {flag}") from None
    except HfHubHTTPError as e:
        raise ElmError(f"downloading {repo} failed: {quoted(str(e), 300)}") from None


def looks_like_path(name: str) -> bool:
    """./x, ../x, /x, ~/x, x/ and a/b/c are paths, never hub ids."""
    return name.startswith((".", "/", "~", "\\")) or name.endswith(("/", "\\")) or name.count("/") > 1 \
        or (name.count("/") == 1 and Path(name.split("/")[0]).expanduser().is_dir())


def locate(name: str, arg: str = "model", flag: str = "--model") -> tuple[Path, str | None]:
    """(local path, hub repo it came from or None) for a folder or file, a preset or a hub id.
    Something written as a path (./x, /x, ~/x, a/b/c) is never taken for a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        return path, None
    path_like = looks_like_path(name)
    repo = None if path_like else repo_id(name)
    if repo is None:
        if path_like:
            raise ArgumentError(arg, name, "an existing file or folder; there is none at that path", flag)
        near = nearest_preset(name)
        raise ArgumentError(arg, name, "a folder, a preset or a hub id (org/name); "
                            + (f"did you mean {near}?" if near else f"presets are {', '.join(PRESETS)}"), flag)
    return download(repo, flag), repo


def default_cache_dtype() -> str:
    """The dtype a preset is converted to when none is asked for: the one the backend computes
    in (load.compute_dtype), so nothing is rounded to bf16 only to be widened again on the CPU."""
    from .load import cpu_backend  # (imported here: load imports this module)

    return "fp32" if cpu_backend() else "bf16"


def resolve(name: str, dtype: str | None = None, tokenizer: str | None = None, flag: str = "--model") -> Path:
    """The model folder for a folder, preset or hub id (downloaded and converted once); errors
    name `flag`, the option the name came from (--model, --draft-model)."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ElmError(f"{flag} {name}: a model is a folder (config.json + safetensors), not a file")
        return path
    # Parsed before a download of gigabytes; one cache entry per dtype, whatever its spelling.
    dtype = dtype_name(parse_dtype(dtype or default_cache_dtype()))
    snapshot, repo = locate(name, flag.removeprefix("--").replace("-", "_"), flag)
    target = cache_root() / repo.replace("/", "--") / f"{snapshot.name[:12]}-{dtype}"
    if not target.exists():
        from .convert import convert

        try:
            convert(snapshot, target, dtype=dtype, tokenizer=tokenizer, label=repo)
        except FileExistsError:
            pass  # another process converted it first; theirs is complete
    return target


# ---------------------------------------------------------------- what is on this machine (`elm-mlx models`)

@dataclass
class Stored:
    model: str  # the preset name, else the hub id
    form: str  # "download" (the Hugging Face cache's) or "fp32 copy" / "bf16 copy" / ... (elm-mlx's)
    size: int  # bytes on disk
    path: Path


def _size(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _label(repo: str) -> str:
    preset = repo.removeprefix("apple/OpenELM-")
    return preset if repo.startswith("apple/OpenELM-") and preset_name(preset) == preset else repo


def _converted() -> dict[str, list[Path]]:
    """hub id -> elm-mlx's converted copies of it (complete ones: a copy is renamed into place when done)."""
    root, found = cache_root(), {}
    for folder in sorted(root.glob("*--*/*")) if root.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").is_file():
            found.setdefault(folder.parent.name.replace("--", "/", 1), []).append(folder)
    return found


def _downloads(repos) -> dict:
    """hub id -> the Hugging Face cache's entry, for OpenELM repos and any elm-mlx converted."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        scan = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return {}
    return {r.repo_id: r for r in scan.repos if r.repo_type == "model"
            and (r.repo_id in repos or r.repo_id.startswith("apple/OpenELM-"))}


def stored() -> list[Stored]:
    """Every OpenELM model this machine holds: downloads and converted copies, with their sizes."""
    converted = _converted()
    downloads = _downloads(converted)
    rows = []
    for repo in sorted(set(converted) | set(downloads)):
        if repo in downloads:
            entry = downloads[repo]
            rows.append(Stored(_label(repo), "download", entry.size_on_disk, Path(entry.repo_path)))
        for folder in converted.get(repo, []):
            commit, _, dtype = folder.name.rpartition("-")
            rows.append(Stored(_label(repo), f"{dtype} copy of {commit}", _size(folder), folder))
    return rows


def remove(name: str) -> list[Stored]:
    """Delete a preset's or hub id's converted copies and its download; what was removed.
    A copy is renamed aside before it is deleted, so an interrupted removal never leaves a
    half-deleted folder where `resolve` would take it for a complete conversion."""
    repo = repo_id(name)
    if repo is None:
        raise ArgumentError("rm", name, "a preset or a hub id (org/name), as `elm-mlx models` lists them")
    found = [s for s in stored() if _label(repo) == s.model]
    if not found:
        raise ElmError(f"--rm {name}: nothing of {repo} is on this machine (`elm-mlx models` lists what is)")
    import shutil
    import uuid

    for s in found:  # a download is its whole repo folder: snapshots, blobs, refs
        aside = s.path.with_name(f".{s.path.name}.removing-{uuid.uuid4().hex[:8]}")
        os.rename(s.path, aside)
        shutil.rmtree(aside)
    return found
