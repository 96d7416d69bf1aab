"""Sentence vectors from a transformer encoder loaded through ``AutoTokenizer``/``AutoModel``.

Any model folder, local path or hub id works; the default is the multilingual-e5-small folder
built by :mod:`processors.e5convert`. Loading is offline by default (``local_files_only`` and
``HF_HUB_OFFLINE``), so a missing model fails at once instead of reaching for the network.

A text is prefixed (``"query: "`` for E5), tokenized in full and split into windows that fit the
model (512 tokens with the special tokens); each window's vector is the attention-masked mean of
the last hidden state, the text's vector is the token-weighted average of its windows, L2-
normalized. For a text that fits one window this is exactly E5's recipe. Windows of a batch are
sorted by length before they are padded into mini-batches, so little time goes into padding.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Precision = Literal["float32", "bfloat16"]
Attention = Literal["auto", "kernel", "sdpa"]


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_supports_bf16() -> bool:
    """True when PyTorch can run bfloat16 matrix products natively on this CPU."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def speed_ratio(candidate: Encoder, baseline: Encoder, *, reps: int = 5) -> float:
    """How many times faster ``candidate`` encodes than ``baseline`` on this machine.

    Both encode the same synthetic texts (about 300 tokens each), alternately, and the best
    time of each is compared, so a busy neighbour process does not decide the outcome. Some
    CPUs advertise bfloat16 instructions yet run bfloat16 products slower than float32 (no AMX
    tiles): a ratio below 1 says so.
    """
    words = "coalizione garanzie sicurezza Ucraina forza rassicurazione coalition guarantees "
    texts = [(words * 20) + str(i) for i in range(4)]
    candidate.encode(texts[:1])
    baseline.encode(texts[:1])
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for k, enc in enumerate((candidate, baseline)):
            start = time.perf_counter()
            enc.encode(texts)
            best[k] = min(best[k], time.perf_counter() - start)
    return best[1] / max(best[0], 1e-9)


def cpu_identity() -> dict[str, str]:
    """The CPU's model name, family, model and flags from ``/proc/cpuinfo`` ({} where absent)."""
    wanted = ("model name", "cpu family", "model", "flags")
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in wanted:
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_description() -> str:
    """:func:`cpu_identity` as one string (the platform's name where there is no cpuinfo)."""
    info = cpu_identity()
    if not info:
        import platform

        return platform.processor() or platform.machine()
    return "|".join(f"{k}={v}" for k, v in sorted(info.items()))


def host_signature() -> str:
    """CPU model, its flags, the thread count and the torch version: what decides speed."""
    import hashlib

    import torch

    raw = f"{cpu_description()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Window:
    text: int  # index of the text
    ids: list[int]
    weight: int  # content tokens in the window


class Encoder:
    """A loaded encoder: ``encode(texts)`` returns L2-normalized float32 vectors."""

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        *,
        encoder_id: str,
        prefix: str = "query: ",
        max_tokens: int = 512,
        batch_size: int = 16,
        batch_tokens: int = 2048,
        precision: Precision = "float32",
    ) -> None:

        self.tokenizer = tokenizer
        self.model = model
        self.encoder_id = encoder_id
        self.prefix = prefix
        self.batch_size = max(1, batch_size)
        self.batch_tokens = max(1, batch_tokens)
        limit = int(getattr(model.config, "max_position_embeddings", max_tokens) or max_tokens)
        model_max = int(getattr(tokenizer, "model_max_length", max_tokens) or max_tokens)
        self.max_tokens = min(max_tokens, limit, model_max)
        self._head, self._tail = _special_frame(tokenizer)
        self.window_content = self.max_tokens - len(self._head) - len(self._tail)
        if self.window_content < 8:
            raise ValueError(
                f"encoder {encoder_id}: windows of {self.max_tokens} tokens are too short"
            )
        pad = tokenizer.pad_token_id
        self._pad = int(pad if pad is not None else 0)
        self.dim = int(model.config.hidden_size)
        self.to_precision(precision)
        self.model.eval()

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        encoder_id: str | None = None,
        offline: bool = True,
        prefix: str = "query: ",
        max_tokens: int = 512,
        batch_size: int = 16,
        batch_tokens: int = 2048,
        precision: Precision = "float32",
        threads: int = 0,
        attention: Attention = "auto",
    ) -> Encoder:
        """Load ``source`` (a model folder or a hub id) with AutoTokenizer/AutoModel.

        ``attention``: "auto" uses the project's CPU attention kernel (:mod:`processors.attention`)
        where it builds and PyTorch's ``sdpa`` otherwise; "kernel" requires the kernel; "sdpa"
        never uses it.
        """
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from processors import attention as cw_attention

        torch.set_num_threads(threads if threads > 0 else available_cores())
        implementation = "sdpa"
        if attention == "kernel":
            cw_attention.register(required=True)  # KernelBuildError names the compiler's complaint
            implementation = cw_attention.NAME
        elif attention == "auto" and cw_attention.register():
            implementation = cw_attention.NAME
        if offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        name = str(source)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the service's log
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
            model = AutoModel.from_pretrained(
                name, local_files_only=offline, attn_implementation=implementation
            )
        except (OSError, ValueError) as exc:
            hint = (
                " (offline: only local folders and already cached hub ids load)" if offline else ""
            )
            raise OSError(f"encoder {name!r} cannot be loaded{hint}: {exc}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return cls(
            tokenizer,
            model,
            encoder_id=encoder_id or name,
            prefix=prefix,
            max_tokens=max_tokens,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            precision=precision,
        )

    @property
    def attention(self) -> str:
        """The attention implementation the model runs ("cw_cpu", "sdpa", …)."""
        return str(getattr(self.model.config, "_attn_implementation", None) or "eager")

    def to_precision(self, precision: Precision) -> Encoder:
        """Convert this encoder's weights in place (no second copy in memory); returns self."""
        import torch

        self._dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self.model.to(self._dtype)
        self.precision = precision
        return self

    def with_precision(self, precision: Precision) -> Encoder:
        """The same weights at another precision (a copy of the model)."""
        import copy

        return Encoder(
            self.tokenizer,
            copy.deepcopy(self.model),
            encoder_id=self.encoder_id,
            prefix=self.prefix,
            max_tokens=self.max_tokens,
            batch_size=self.batch_size,
            batch_tokens=self.batch_tokens,
            precision=precision,
        )

    # ------------------------------------------------------------------ encoding

    def _windows(self, texts: Sequence[str]) -> list[_Window]:
        enc = self.tokenizer(
            [self.prefix + t for t in texts],
            add_special_tokens=False,
            return_attention_mask=False,
            verbose=False,
        )
        windows: list[_Window] = []
        size = self.window_content
        for i, ids in enumerate(enc["input_ids"]):
            ids = list(ids)
            chunks = [ids[a : a + size] for a in range(0, len(ids), size)] or [[]]
            for chunk in chunks:
                windows.append(_Window(i, self._head + chunk + self._tail, max(1, len(chunk))))
        return windows

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 L2-normalized sentence vectors."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        if not texts:
            return out.astype(np.float32)
        weights = np.zeros(len(texts), dtype=np.float64)
        windows = self._windows(texts)
        order = sorted(range(len(windows)), key=lambda k: len(windows[k].ids), reverse=True)
        with torch.inference_mode():
            start = 0
            while start < len(order):
                # Longest first: the first window sets the padded width of its batch.
                width = len(windows[order[start]].ids)
                size = max(1, min(self.batch_size, self.batch_tokens // width))
                batch = [windows[k] for k in order[start : start + size]]
                start += size
                ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, w in enumerate(batch):
                    ids[row, : len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
                    mask[row, : len(w.ids)] = 1
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = ((hidden * m).sum(dim=1).float() / mask.sum(dim=1, keepdim=True)).numpy()
                for row, w in enumerate(batch):
                    out[w.text] += w.weight * pooled[row]
                    weights[w.text] += w.weight
        out /= weights[:, None]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def token_count(self, text: str) -> int:
        return sum(len(w.ids) for w in self._windows([text]))


def _special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. <s> … </s>)."""
    probe = "query: frame probe"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("cannot locate the text inside the tokenizer's special tokens")
