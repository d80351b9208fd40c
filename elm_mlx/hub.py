"""Names to model folders. A folder is used as it is. A preset or a hub id is
downloaded into the standard Hugging Face cache (so other tools share it),
then converted once; the conversion is kept in elm-mlx's own cache, keyed by
the hub commit and the dtype."""

import os
import re
from pathlib import Path

from .checkpoint import DTYPE_NAMES, parse_dtype
from .config import PRESETS, preset_name
from .errors import ElmError

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


def resolve(name: str, dtype: str | None = None, tokenizer: str | None = None) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ElmError(f"--model {name}: a model is a folder (config.json + safetensors), not a file")
        return path
    repo = repo_id(name)
    if repo is None:
        raise ElmError(f"--model {name!r} is not a folder, a preset ({', '.join(PRESETS)}) "
                       "or a hub id (org/name)")
    # Parsed before a download of gigabytes; one cache entry per dtype, whatever its spelling.
    dtype = DTYPE_NAMES[parse_dtype(dtype or "bf16")]
    snapshot = download(repo)
    target = cache_root() / repo.replace("/", "--") / f"{snapshot.name[:12]}-{dtype}"
    if not target.exists():
        from .convert import convert

        try:
            convert(snapshot, target, dtype=dtype, tokenizer=tokenizer, label=repo)
        except FileExistsError:
            pass  # another process converted it first; theirs is complete
    return target
