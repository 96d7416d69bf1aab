"""The CPU attention kernel: same results as PyTorch's sdpa, and sdpa wherever it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.integrations.sdpa_attention as sdpa_module

from processors import attention
from processors.encoder import Encoder

REPO = Path(__file__).resolve().parents[2]


class _Attention(torch.nn.Module):
    """What transformers passes as ``module``: only ``training`` and ``is_causal`` are read."""

    is_causal = False


def _qkv(
    batch: int, seq: int, heads: int, dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value as the model makes them: [batch, heads, seq, dim] views of one
    [batch, seq, 3 * heads * dim] projection (so not contiguous)."""
    gen = torch.Generator().manual_seed(batch * 1000 + seq + dim)
    fused = (torch.randn(batch, seq, 3, heads * dim, generator=gen) * 2).to(dtype)
    q, k, v = (fused[:, :, i].view(batch, seq, heads, dim).transpose(1, 2) for i in range(3))
    return q, k, v


def _padding_mask(lengths: list[int], seq: int) -> torch.Tensor:
    """transformers' bidirectional padding mask: [batch, 1, seq, seq], True = attend."""
    keys = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    return keys[:, None, None, :].expand(len(lengths), 1, seq, seq)


@pytest.fixture
def sdpa_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts calls of transformers' sdpa function (the kernel's fallback)."""
    calls: list[int] = []
    real = sdpa_module.sdpa_attention_forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counting)
    yield calls


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    attention.load_kernel()  # builds it into the cache when missing; fails the tests if it cannot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("dim", "lengths", "seq"),
    [
        (32, [278], 278),  # one article, no padding
        (32, [300, 251, 17, 1], 300),  # a sorted batch; a one-token sequence
        (64, [130, 129, 64], 130),  # another head width
        (32, [512, 500], 512),  # a full window
    ],
)
def test_kernel_matches_sdpa_on_right_padded_batches(
    dtype: torch.dtype, dim: int, lengths: list[int], seq: int, sdpa_calls: list[int]
) -> None:
    q, k, v = _qkv(len(lengths), seq, 12 if dim == 32 else 6, dim, dtype)
    mask = _padding_mask(lengths, seq)
    with torch.inference_mode():
        out, weights = attention.attention_forward(
            _Attention().eval(), q, k, v, mask, scaling=dim**-0.5
        )
    assert sdpa_calls == []  # the kernel ran
    assert weights is None and out.dtype == dtype
    assert out.shape == (len(lengths), seq, q.shape[1], dim) and out.is_contiguous()
    # Reference: sdpa in float64 on the very same (possibly bfloat16-rounded) inputs.
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=dim**-0.5
    ).transpose(1, 2)
    for b, n in enumerate(lengths):
        got = out[b, :n].double()
        if dtype == torch.float32:
            assert torch.allclose(got, ref[b, :n], atol=2e-5, rtol=1e-5)
        else:  # the kernel computes in float32; only its output is rounded to bfloat16
            assert torch.allclose(got, ref[b, :n], atol=1e-2, rtol=8e-3)
        assert not out[b, n:].any()  # padded query rows: zeros, never NaN


def test_other_masks_and_training_fall_back_to_sdpa(sdpa_calls: list[int]) -> None:
    q, k, v = _qkv(2, 40, 4, 32, torch.float32)
    left = _padding_mask([40, 30], 40).flip(-1).contiguous()  # left padding: not handled
    module = _Attention().eval()
    with torch.inference_mode():
        out, _ = attention.attention_forward(module, q, k, v, left, scaling=0.2)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=left, scale=0.2)
    assert sdpa_calls == [1]
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-6)

    train = _Attention().train()
    attention.attention_forward(train, q, k, v, None, scaling=0.2)  # grad on, training
    assert sdpa_calls == [1, 1]
    with torch.inference_mode():
        attention.attention_forward(module, q, k, v, None, scaling=0.2, is_causal=True)
    assert sdpa_calls == [1, 1, 1]
    long_q, long_k, long_v = _qkv(1, attention.MAX_SEQ + 1, 1, 16, torch.float32)
    with torch.inference_mode():
        out, _ = attention.attention_forward(module, long_q, long_k, long_v, None, scaling=0.25)
    assert sdpa_calls == [1, 1, 1, 1] and out.shape == (1, attention.MAX_SEQ + 1, 1, 16)


def test_the_encoder_runs_the_kernel_and_its_vectors_match_sdpa(e5_dir: Path) -> None:
    texts = [
        "La coalizione dei volenterosi prepara la forza di rassicurazione per l'Ucraina. " * n
        for n in (1, 4, 9, 30)
    ] + ["Ceasefire talks resume; the coalition offers security guarantees.", "Breve."]
    kernel = Encoder.load(e5_dir, encoder_id="e5", attention="kernel")
    sdpa = Encoder.load(e5_dir, encoder_id="e5", attention="sdpa")
    assert (kernel.attention, sdpa.attention) == (attention.NAME, "sdpa")
    exact = sdpa.encode(texts)
    assert float(((kernel.encode(texts) * exact).sum(axis=1)).min()) > 0.99999
    if kernel.model.dtype != torch.bfloat16:
        kernel.to_precision("bfloat16")
        sdpa.to_precision("bfloat16")
        k16, s16 = kernel.encode(texts), sdpa.encode(texts)
        # bfloat16 weights and activations: both about as far from float32 (cosine ~0.99997).
        assert float(np.min((k16 * exact).sum(axis=1))) > 0.9999
        assert float(np.min((s16 * exact).sum(axis=1))) > 0.9999


def test_without_a_compiler_the_encoder_uses_sdpa_and_says_why(
    e5_dir: Path, tmp_path: Path
) -> None:
    script = f"""
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from processors.encoder import Encoder
from processors.attention import KernelBuildError
enc = Encoder.load({str(e5_dir)!r}, attention="auto")
print("attention", enc.attention)
try:
    Encoder.load({str(e5_dir)!r}, attention="kernel")
except KernelBuildError as exc:
    print("required:", exc)
"""
    env = dict(os.environ, CC="/nonexistent/cc", XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "attention sdpa" in proc.stdout
    assert "required: attention kernel unavailable: no C compiler '/nonexistent/cc'" in proc.stdout
    assert "/nonexistent/cc" in proc.stderr and "scaled_dot_product_attention" in proc.stderr
    assert not (tmp_path / "coalition-watch" / "kernels").exists() or not any(
        (tmp_path / "coalition-watch" / "kernels").glob("*.so")
    )


def test_the_kernel_is_built_once_per_cpu_and_compiler(tmp_path: Path) -> None:
    first = attention.build_kernel(tmp_path)
    stamp = first.stat().st_mtime_ns
    again = attention.build_kernel(tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left


@pytest.mark.parametrize("setting", ["auto", "sdpa"])
def test_model_info_names_the_attention_in_use(e5_dir: Path, tmp_path: Path, setting: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COALITION_WATCH_")}
    env.update(
        COALITION_WATCH_CLASSIFIER__MODEL_DIR=str(e5_dir),
        COALITION_WATCH_CLASSIFIER__ATTENTION=setting,
        PYTHONPATH=str(REPO),
    )
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "model", "info"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert lines["attention"] == (attention.NAME if setting == "auto" else "sdpa")
    assert lines["precision"].startswith(("bfloat16", "float32"))


def test_the_kernel_stays_inside_its_buffers_under_the_sanitizers(tmp_path: Path) -> None:
    """150 shapes (lengths 1-512 around every block edge, head widths 16-128, both dtypes) with
    AddressSanitizer and UndefinedBehaviorSanitizer, as compiled for this CPU."""
    binary = tmp_path / "check_attention"
    build = subprocess.run(
        [os.environ.get("CC") or "cc", "-O1", "-g", "-march=native", "-fno-math-errno",
         "-fopenmp", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-o", str(binary), str(Path(__file__).parent / "kernels" / "check_attention.c"),
         str(attention.SOURCE)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip() == "150 shapes clean"
