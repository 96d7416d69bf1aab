"""Seed parsing throughput: files/s and MB/s for the seed cleaner, median of repeated runs."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from collectors.seeds import parse_seed

SEEDS = Path(__file__).resolve().parent.parent / "seeds"


def main(repeats: int = 200) -> None:
    files = sorted(SEEDS.glob("*.txt"))
    size = sum(p.stat().st_size for p in files)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            parse_seed(path)
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    print(f"seed parsing: {len(files)} files, {size} bytes per pass, {repeats} passes")
    print(
        f"  median pass {med * 1000:.2f} ms -> {len(files) / med:.0f} files/s, "
        f"{size / med / 1e6:.2f} MB/s"
    )


if __name__ == "__main__":
    main()
