"""Regenerate the derived manifests in infra/ so they cannot drift from their sources.

    python infra/render.py            # rewrite what changed
    python infra/render.py --check    # exit 1 if anything is out of date (CI)

* infra/rayservice.yaml `spec.serveConfigV2` <- infra/serve-config.yaml, verbatim (comments included). Only that
  literal block is rewritten; the rest of rayservice.yaml (and its comments) stays as written.
* infra/schedules/*.yaml <- jobs/schedules/*.yaml + infra/rayjob-batch.yaml (`glm4-jobs render-schedules`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
SERVE_CONFIG = INFRA / "serve-config.yaml"
RAYSERVICE = INFRA / "rayservice.yaml"
_BLOCK_KEY = re.compile(r"^(?P<indent> *)serveConfigV2: \|[-+]?\s*$")


def embed_serve_config(rayservice_text: str, serve_config_text: str) -> str:
    """Replace the `serveConfigV2: |` literal block's content by `serve_config_text`, indented 2 more spaces."""
    if not serve_config_text.endswith("\n") or serve_config_text.endswith("\n\n"):
        raise ValueError("serve-config.yaml must end with exactly one newline (a YAML '|' block keeps one)")
    if serve_config_text[:1].isspace():
        raise ValueError("serve-config.yaml must not start with whitespace")
    lines = rayservice_text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_KEY.match(line)]
    if len(starts) != 1:
        raise ValueError(f"expected one 'serveConfigV2: |' line in rayservice.yaml, found {len(starts)}")
    start = starts[0]
    indent = len(_BLOCK_KEY.match(lines[start]).group("indent"))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay outside
        end -= 1
    pad = " " * (indent + 2)
    block = [(pad + line if line.strip() else "\n") for line in serve_config_text.splitlines(keepends=True)]
    lines[start] = " " * indent + "serveConfigV2: |\n"
    return "".join(lines[: start + 1] + block + lines[end:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report files that are out of date")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from jobs.kube import load_rayjob_template, render_schedule_files, write_or_check
    from jobs.schedule import load_schedules

    stale = []
    current = RAYSERVICE.read_text()
    wanted = embed_serve_config(current, SERVE_CONFIG.read_text())
    if wanted != current:
        stale.append(str(RAYSERVICE))
        if not args.check:
            RAYSERVICE.write_text(wanted)
    template_path = INFRA / "rayjob-batch.yaml"
    files = render_schedule_files(load_schedules(REPO / "jobs" / "schedules"), load_rayjob_template(template_path),
                                  "infra/rayjob-batch.yaml")
    stale += write_or_check(files, INFRA / "schedules", check=args.check)
    for p in stale:
        print(("out of date: " if args.check else "wrote: ") + p)
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
