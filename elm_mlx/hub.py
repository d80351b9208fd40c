"""Names to model folders. A folder is used as it is. A preset or a hub id is
downloaded into the standard Hugging Face cache (so other tools share it),
then converted once; the conversion is kept in elm-mlx's own cache, keyed by
the hub commit and the dtype."""

import os
import re
from pathlib import Path

from .checkpoint import dtype_name, parse_dtype
from .config import PRESETS, nearest_preset, preset_name
from .errors import ArgumentError, ElmError

# What an OpenELM repo needs; Apple's also hold remote code we never run.
ALLOW = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model"]


def cache_root() -> Path:
    if os.environ.get("ELM_MLX_CACHE"):
        return Path(os.environ["ELM_MLX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "elm-mlx"


def repo_id(name: str) -> str | None:
    preset = preset_name(name)
    if preset:
        return f"apple/OpenELM-{preset}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    return None


def download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=ALLOW))
    except GatedRepoError:
        raise ElmError(f"{repo} is gated on the Hugging Face hub: accept its terms there and log in "
                       "(`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ElmError(f"{repo} was not found on the Hugging Face hub: check the id "
                       f"(presets: {', '.join(PRESETS)})") from None
    except LocalEntryNotFoundError:
        raise ElmError(f"{repo} is not in the Hugging Face cache and the hub can't be reached "
                       "(offline, or HF_HUB_OFFLINE=1): connect once to download it, or pass a local "
                       "folder to --model") from None
    except HfHubHTTPError as e:
        raise ElmError(f"downloading {repo} failed: {e}") from None


def locate(name: str, arg: str = "model", flag: str = "--model") -> tuple[Path, str | None]:
    """(local path, hub repo it came from or None) for a folder or file, a preset or a hub id.
    Something written as a path (./x, /x, ~/x, a/b/c) is never taken for a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        return path, None
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    repo = None if looks_like_path else repo_id(name)
    if repo is None:
        if looks_like_path:
            raise ArgumentError(arg, name, "an existing file or folder; there is none at that path", flag)
        near = nearest_preset(name)
        raise ArgumentError(arg, name, "a folder, a preset or a hub id (org/name); "
                            + (f"did you mean {near}?" if near else f"presets are {', '.join(PRESETS)}"), flag)
    return download(repo), repo


def resolve(name: str, dtype: str | None = None, tokenizer: str | None = None) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ElmError(f"--model {name}: a model is a folder (config.json + safetensors), not a file")
        return path
    # Parsed before a download of gigabytes; one cache entry per dtype, whatever its spelling.
    dtype = dtype_name(parse_dtype(dtype or "bf16"))
    snapshot, repo = locate(name)
    target = cache_root() / repo.replace("/", "--") / f"{snapshot.name[:12]}-{dtype}"
    if not target.exists():
        from .convert import convert

        try:
            convert(snapshot, target, dtype=dtype, tokenizer=tokenizer, label=repo)
        except FileExistsError:
            pass  # another process converted it first; theirs is complete
    return target
