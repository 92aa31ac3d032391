"""The README's main job, runnable on a fresh machine with nothing downloaded:

    python -m jobs.demo [--rows 200] [--dir demo]

1. generates a small random GLM-4 checkpoint (the `tiny` preset, original THUDM layout, byte-level tokenizer);
2. writes a Parquet file of prompts (half of them share a system prompt, a few are deliberately bad rows);
3. runs the batch job (`pipeline.run_batch`, the same code as `glm4-batch`) on a local Ray cluster;
4. prints where the results are and a summary. Run it again: the job sees its `_SUCCESS` and does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token to manage
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def write_prompts(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    system = "You are a careful assistant. Answer briefly and cite the rule you used. " * 3
    subjects = ["the moon", "tea", "Ray Data", "parquet files", "tensor parallelism", "a paged KV cache"]
    ids, messages = [], []
    for i in range(rows):
        ids.append(f"row-{i:05d}")
        user = f"Tell me one fact about {rng.choice(subjects)} (#{i})."
        if i % 50 == 7:
            messages.append([])  # a bad row: an empty conversation becomes an error row, the job goes on
        elif i % 2 == 0:
            messages.append([{"role": "system", "content": system}, {"role": "user", "content": user}])
        else:
            messages.append([{"role": "user", "content": user}])
    table = pa.table({"id": ids, "messages": messages})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="demo", help="where the checkpoint, prompts and results go (default ./demo)")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args(argv)
    root = Path(args.dir).resolve()
    from glm4.tools.make_checkpoint import make_checkpoint

    model = root / "glm4-tiny"
    if not (model / "config.json").exists():
        make_checkpoint(model, "tiny", seed=0, num_shards=2)
        print(f"generated checkpoint: {model}")
    prompts = root / "prompts" / "prompts.parquet"
    if not prompts.exists():
        write_prompts(prompts, args.rows)
        print(f"generated prompts:    {prompts} ({args.rows} rows)")

    from pipeline.batch import run_batch
    from pipeline.config import BatchJobConfig

    config = BatchJobConfig(input=str(prompts.parent), output=str(root / "results"), messages_column="messages",
                            id_column="id", model=str(model), num_replicas=2, replica_num_cpus=0.5,
                            sampling={"temperature": 0.0, "max_tokens": args.max_tokens},
                            max_error_fraction=0.1, device="cpu")
    summary = run_batch(config)
    print(json.dumps({k: summary[k] for k in summary if k not in ("config",)}, indent=2, default=str))
    return int(summary["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
