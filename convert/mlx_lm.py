"""`--to mlx-lm`: the extra files that make a folder load with `mlx_lm.load`
(model and tokenizer), as mlx-community's OpenELM folders have them. The
weights and config.json are already mlx-lm's layout (same key names, same
"quantization" entry); what mlx-lm adds is a Hugging Face tokenizer
(tokenizer_config.json naming LlamaTokenizer, so AutoTokenizer never has to
look up the unknown "openelm" config class, and tokenizer.json) and the
safetensors index."""

import json
from pathlib import Path

from ..errors import ElmError, need_extra

TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": 2048,
}


def write_tokenizer_files(folder: Path, template=None) -> None:
    """tokenizer_config.json, then tokenizer.json built from tokenizer.model by
    transformers (which mlx-lm depends on), so mlx-lm picks its SentencePiece
    streaming detokenizer. transformers' re-save drops our settings, so they are
    written again after it, with the chat template made self-contained (BOS and
    Apple's empty system turn in the text: mlx-lm encodes a rendered chat with no
    special tokens added). `legacy` is the one that matters: Llama-2's rule that
    every piece of text between special tokens gets SentencePiece's leading "▁"
    (how the -Instruct models' tokenizer read "</s>\\n<|user|>"), which
    tokenizer.json's pre-tokenizer also gets for tools that read it alone. Then
    mlx-lm's chat prompt ids equal elm-mlx's."""
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    need_extra("transformers", "mlx-lm", "--to mlx-lm")
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging

        logging.set_verbosity_error()  # it warns that "openelm" is no model type it knows: expected
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    except Exception as e:  # transformers' conversion raises many types; the message is what matters
        raise ElmError(f"--to mlx-lm: could not build tokenizer.json from {folder / 'tokenizer.model'} "
                       f"with transformers ({type(e).__name__}: {e})") from None
    _every_piece_gets_the_prefix(folder / "tokenizer.json")
    ours = dict(TOKENIZER_CONFIG)
    if template is not None:
        from ..chat_template import self_contained

        ours["chat_template"] = self_contained(template)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | ours, indent=2) + "\n")


def _every_piece_gets_the_prefix(path: Path) -> None:
    spec = json.loads(path.read_text())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace":
        pre["prepend_scheme"] = "always"
        path.write_text(json.dumps(spec, ensure_ascii=False))


def write_index(folder: Path, weights: dict, files: list) -> None:
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": {k: files[0] for k in sorted(weights)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n")
