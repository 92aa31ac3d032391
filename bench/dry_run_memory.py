"""Driver memory of `glm4-batch --dry-run` over a large input, against the per-row driver of before.

    python bench/dry_run_memory.py                      # 20M rows in 20 Parquet files, no id column
    python bench/dry_run_memory.py --rows 2000000       # quicker

The input has no id column, so every row id is derived. The old driver built those ids as Python strings (plus a
pyarrow copy) before any work started; the job now derives them in the read tasks and its driver keeps only
per-file state. Each side runs in its own subprocess and reports its peak RSS (`ru_maxrss`). The baseline builds
the derived ids exactly as the old driver did. Not a test and not timed: it prints one table (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.benchtable import print_table  # noqa: E402

LIMIT_BYTES = 1 << 30

# The old driver's per-row step (pipeline/batch.py::_input_ids before issue 15), kept here as the baseline.
BASELINE = """
import sys, resource, pyarrow as pa, pyarrow.parquet as pq
from pathlib import Path
files = sorted(Path(sys.argv[1]).glob("*.parquet"))
ids = pa.array([f"{f.name}#{i}" for f in files for i in range(pq.ParquetFile(f).metadata.num_rows)], pa.string())
print(len(ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def make_input(root: Path, rows: int, files: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    per = rows // files
    for k in range(files):
        nums = pc.cast(pa.array(np.arange(k * per, (k + 1) * per)), pa.string())
        prompts = pc.binary_join_element_wise("Question ", nums, ": what is the next number?", "")
        pq.write_table(pa.table({"prompt": prompts}), root / f"part-{k:03d}.parquet", row_group_size=100_000)


def peak_of(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS bytes, seconds, stdout) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    dt = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # max over the children waited for so far
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{err[-3000:]}")
    return usage.ru_maxrss * 1024, dt, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--model", default=None, help="model dir (default: a generated tiny checkpoint)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dryrun-"))
    inp = tmp / "in"
    inp.mkdir()
    t0 = time.perf_counter()
    make_input(inp, args.rows, args.files)
    print(f"input: {args.rows} rows in {args.files} files ({sum(f.stat().st_size for f in inp.iterdir()) / 2**20:.0f}"
          f" MiB), written in {time.perf_counter() - t0:.0f}s", flush=True)
    model = args.model
    if model is None:
        from glm4.tools.make_checkpoint import make_checkpoint

        model = str(tmp / "model")
        make_checkpoint(Path(model), "tiny", seed=0)

    # The job's driver first (the children's max RSS only grows), then the baseline.
    dry_cmd = [sys.executable, "-m", "jobs.batch", "--dry-run", "--model", model, "--input", str(inp), "--output",
               str(tmp / "out"), "--prompt-column", "prompt"]
    dry_peak, dry_s, out = peak_of(dry_cmd)
    report = json.loads(out)
    assert report["input"]["rows"] == args.rows, report["input"]
    base_peak, base_s, out = peak_of([sys.executable, "-c", BASELINE, str(inp)])
    assert int(out.split()[0]) == args.rows
    rows = [
        ("old driver: derived ids as Python strings (baseline)", f"{base_peak / 2**20:.0f} MiB", f"{base_s:.1f}s",
         "1.00", ""),
        ("glm4-batch --dry-run (list, count, sample, plan)", f"{dry_peak / 2**20:.0f} MiB", f"{dry_s:.1f}s",
         f"{dry_peak / base_peak:.3f}", f"< 1 GiB: {'met' if dry_peak < LIMIT_BYTES else 'NOT met'}"),
    ]
    print_table(rows, (f"driver, {args.rows} rows / {args.files} files", "peak RSS", "wall", "ratio", "target"))
    return 0 if dry_peak < LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
