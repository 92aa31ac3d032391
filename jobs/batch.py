"""`glm4-batch`: run the GLM-4 batch inference job (Parquet prompts -> Parquet results) on Ray.

    glm4-batch --model DIR --input prompts.parquet --output out/ --prompt-column prompt --max-tokens 64
    glm4-batch --config job.yaml [--num-replicas 4 ...]      # flags override the file
    glm4-batch --config job.yaml --dry-run                   # check and plan only: no Ray, no inference
    glm4-batch --model DIR --input requests.jsonl --output out/  # OpenAI Batch files in and out
    glm4-batch --demo-input prompts.parquet --demo-rows 64   # write a demo prompts file (prompt_id, prompt)

Rerunning the same command resumes an interrupted job (rows already written are skipped) and is a no-op for a
finished one. Exit status: 0 success, 1 the job failed (storage, engine, exactly-once check), 2 bad config or
input, 3 more error rows than --max-error-fraction allows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pydantic import ValidationError

from pipeline.config import add_cli_arguments, config_from_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm4-batch",
        description=__doc__.split("\n\n")[0],
        epilog="Every field of the job file is described in pipeline/config.py (BatchJobConfig).",
    )
    add_cli_arguments(p)
    p.add_argument("--summary-json", action="store_true", help="print the summary as one JSON line on stdout")
    p.add_argument("--dry-run", action="store_true", help="validate the config, list and count the input, sample "
                   "prompt lengths, report what a resume would skip and what each replica requests; print that "
                   "plan as JSON and exit without starting Ray or running inference")
    p.add_argument("--demo-input", metavar="PATH", help="write a demo prompts Parquet file (columns prompt_id, "
                   "prompt) and exit")
    p.add_argument("--demo-rows", type=int, default=64, help="rows in the demo prompts file (default 64)")
    p.add_argument("--log-level", default="WARNING", help="Python logging level (default WARNING)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.demo_input:
        write_demo_prompts(args.demo_input, args.demo_rows)
        print(f"wrote {args.demo_rows} demo prompts to {args.demo_input}")
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # botocore's DEBUG lines carry request headers (X-Amz-Security-Token, the access key id): never below INFO.
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(max(logging.getLogger().level, logging.INFO))
    from pipeline.batch import EXIT_CONFIG, EXIT_FAILED, BatchJobError, run_batch
    from pipeline.io import InputError, ModelPathError, StorageError

    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as e:
        print(f"glm4-batch: invalid configuration:\n{e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.dry_run:
            from pipeline.dryrun import dry_run, format_report

            print(format_report(dry_run(config, say=lambda line: print(line, file=sys.stderr))))
            return 0
        summary = run_batch(config)
    except (InputError, ModelPathError) as e:
        print(f"glm4-batch: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageError as e:
        print(f"glm4-batch: storage error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except BatchJobError as e:
        print(f"glm4-batch: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.summary_json:
        print(json.dumps(summary, default=str))
    else:
        print(f"results: {summary['data']}")
        print(f"manifest: {summary['output'].rstrip('/')}/manifest.json" if summary.get("output") else "")
    return int(summary["exit_code"])


def write_demo_prompts(path: str, rows: int) -> None:
    """Prompts for trying the job: half share an instruction prefix (prefix-aware placement groups them)."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = ["tides", "volcanoes", "bread", "compilers", "bees", "glaciers", "chess", "radio"]
    prompts = [
        ("Answer in one sentence for a ten-year-old. " if i % 2 else "")
        + f"What should I know about {topics[i % len(topics)]}? (#{i})"
        for i in range(rows)
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt_id": [f"demo-{i:05d}" for i in range(rows)], "prompt": prompts}), path)


if __name__ == "__main__":
    sys.exit(main())
