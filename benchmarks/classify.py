"""Classification throughput: plain ``transformers`` use against the project's path.

Both classify the same ~300-token articles (built from the labelled examples in
``processors/data``) with the same encoder folder and the same heads:

- plain: AutoTokenizer/AutoModel, float32, one article per forward pass (batch 1), truncated at
  512 tokens, masked mean pooling, under ``torch.inference_mode``;
- project: :func:`processors.classifier.load_classifier` as the service runs it (threads = cores,
  windows sorted by length into batches, the precision decided for this CPU).

Each path runs in its own child process so its peak RSS is its own; rounds alternate the two
paths so that other load on the machine slows both alike. Figures are medians of repeated
passes after a warm-up pass. Run: ``python benchmarks/classify.py [--articles N]``;
``--breakdown`` profiles the project path instead and prints its time per operator.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_TOKENS = 300


def _articles(n: int) -> list[str]:
    """``n`` articles of about 300 tokens from the labelled examples (title + body)."""
    from processors.classifier import PACKAGE_DATA_DIR
    from processors.labelled import read_split

    items = read_split(PACKAGE_DATA_DIR, "train") + read_split(PACKAGE_DATA_DIR, "dev")
    words = " ".join(i.document for i in items).split()
    # About 300 tokens (the E5 tokenizer averages ~1.55 tokens per word on this material),
    # varying ±15% like real articles do.
    out = []
    pos = 0
    for k in range(n):
        length = int(TARGET_TOKENS / 1.55 * (0.85 + 0.3 * ((k * 37) % 100) / 100))
        if pos + length > len(words):
            pos = 0
        out.append(" ".join(words[pos : pos + length]))
        pos += length
    return out


def _machine() -> str:
    """CPU model, family/model numbers and the flags that decide bfloat16 speed."""
    import platform

    from processors.encoder import cpu_identity

    info = cpu_identity()
    if not info:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]
    return (
        f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model "
        f"{info.get('model', '?')}), {' '.join(f for f in wanted if f in flags) or 'no AVX2'}"
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_plain(texts: list[str], repeats: int) -> dict[str, float]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from processors.classifier import ClassifierOptions
    from processors.heads import Heads

    options = ClassifierOptions()
    folder = options.encoder_source()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    heads = Heads.load(options.heads_path())

    def one_pass() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for text in texts:
                enc = tokenizer(
                    "query: " + text, truncation=True, max_length=512, return_tensors="pt"
                )
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                vector = (hidden * mask).sum(1) / mask.sum(1)
                vector = torch.nn.functional.normalize(vector, dim=-1)
                heads.predict(vector.numpy())
        return time.perf_counter() - start

    tokens = [len(tokenizer("query: " + t)["input_ids"]) for t in texts]
    one_pass()  # warm-up
    times = [one_pass() for _ in range(repeats)]
    return {
        "articles_per_second": len(texts) / statistics.median(times),
        "mean_tokens": sum(tokens) / len(tokens),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def run_project(texts: list[str], repeats: int, attention: str = "auto") -> dict[str, float | str]:
    import torch

    from processors.classifier import ClassifierOptions, load_classifier

    classifier = load_classifier(ClassifierOptions(attention=attention))

    def one_pass() -> float:
        start = time.perf_counter()
        classifier.classify(texts)
        return time.perf_counter() - start

    one_pass()
    times = [one_pass() for _ in range(repeats)]
    return {
        "articles_per_second": len(texts) / statistics.median(times),
        "precision": classifier.encoder.precision,
        "precision_reason": classifier.precision_reason,
        "attention": classifier.encoder.attention,
        "batch_tokens": classifier.encoder.batch_tokens,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": _peak_rss_mb(),
    }


def breakdown(texts: list[str], attention: str = "auto") -> None:
    """Where the project path spends its time: self CPU time per operator, one profiled pass."""
    from torch.profiler import ProfilerActivity, profile

    from processors.classifier import ClassifierOptions, load_classifier

    classifier = load_classifier(ClassifierOptions(attention=attention))
    classifier.classify(texts)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        classifier.classify(texts)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    print(
        f"project path ({classifier.encoder.precision}, attention {classifier.encoder.attention}),"
        " self CPU time per operator:"
    )
    for event in rows[:8]:
        share = event.self_cpu_time_total / total
        print(f"  {event.key:55s} {share:6.1%}  {event.self_cpu_time_total / 1e3:8.1f} ms")


def _child(path: str, articles: int, repeats: int, attention: str) -> dict[str, float | str]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", path, "--articles", str(articles),
         "--repeats", str(repeats), "--attention", attention],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"{path} run failed:\n{out.stderr[-3000:]}")
    result: dict[str, float | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["plain", "project"])
    parser.add_argument(
        "--attention",
        choices=["auto", "kernel", "sdpa"],
        default="auto",
        help="the project path's attention (default: as the service runs it)",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="profile the project path per operator instead"
    )
    args = parser.parse_args()
    if args.breakdown:
        breakdown(_articles(args.articles), args.attention)
        return
    if args.child:
        texts = _articles(args.articles)
        if args.child == "plain":
            print(json.dumps(run_plain(texts, args.repeats)))
        else:
            print(json.dumps(run_project(texts, args.repeats, args.attention)))
        return

    from processors.e5convert import build_model

    build_model(progress=None)  # no-op when built
    # Rounds alternate the two paths, so a neighbour's load slows both alike.
    plains, projects = [], []
    for _ in range(args.rounds):
        plains.append(_child("plain", args.articles, args.repeats, args.attention))
        projects.append(_child("project", args.articles, args.repeats, args.attention))
    plain_rate = statistics.median(float(r["articles_per_second"]) for r in plains)
    project_rate = statistics.median(float(r["articles_per_second"]) for r in projects)
    ratios = [
        float(b["articles_per_second"]) / float(a["articles_per_second"])
        for a, b in zip(plains, projects, strict=True)
    ]
    plain, project = plains[0], projects[0]
    print(
        f"classification: {args.articles} articles of ~{float(plain['mean_tokens']):.0f} tokens, "
        f"{args.rounds} alternating rounds x median of {args.repeats} passes, "
        f"{plain['threads']} threads"
    )
    print(f"  machine: {_machine()}")
    print(
        f"  plain transformers (batch 1, float32): {plain_rate:6.2f} articles/s, "
        f"peak RSS {max(float(r['peak_rss_mb']) for r in plains):.0f} MB"
    )
    print(
        f"  project path ({project['batch_tokens']} tokens/batch, {project['precision']}, "
        f"attention {project['attention']}):"
        f"  {project_rate:6.2f} articles/s, "
        f"peak RSS {max(float(r['peak_rss_mb']) for r in projects):.0f} MB"
    )
    print(
        f"  speed-up: median {statistics.median(ratios):.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(f"  precision: {project['precision_reason']}")
    verdict = "met" if statistics.median(ratios) >= 3 else "NOT met on this machine"
    print(f"  target (project path >= 3x plain): {verdict}")


if __name__ == "__main__":
    main()
