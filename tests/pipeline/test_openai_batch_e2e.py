"""An OpenAI Batch request file through `glm4-batch`, as users moving from the OpenAI Batch API bring it: chat and
completion requests, good and bad lines; the driver SIGKILLed mid-job, then the same command resumes. Every
custom_id comes back exactly once and every body parses with the official `openai` client's response types."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

import glm4

from .test_batch_faults import REPO, _wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def request_lines(n_good: int) -> tuple[list[str], dict[str, str]]:
    """(lines, expected kind per custom_id: "chat" | "completion" | error code or status)."""
    lines, kinds = [], {}
    for i in range(n_good):
        cid = f"req-{i:03d}"
        if i % 2:
            body = {"model": "glm-4", "messages": [{"role": "user", "content": f"tell me about {i}"}],
                    "max_completion_tokens": 6, "temperature": 0}
            lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": CHAT, "body": body}))
            kinds[cid] = "chat"
        else:
            body = {"model": "glm-4", "prompt": f"count {i}", "max_tokens": 6, "temperature": 0}
            lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": COMPLETIONS, "body": body}))
            kinds[cid] = "completion"
    bad = {
        "bad-json": '{"custom_id": "bad-json", "method": "POST", ',
        "bad-url": json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        "bad-n": json.dumps({"custom_id": "bad-n", "method": "POST", "url": CHAT, "body": {
            "model": "glm-4", "messages": [{"role": "user", "content": "hi"}], "n": 2}}),
        "bad-temp": json.dumps({"custom_id": "bad-temp", "method": "POST", "url": COMPLETIONS, "body": {
            "model": "glm-4", "prompt": "x", "temperature": -1}}),
    }
    kinds.update({"bad-json": "invalid_json_line", "bad-url": "invalid_url", "bad-n": 400, "bad-temp": 400})
    for j, line in enumerate(bad.values()):  # spread through the file
        lines.insert(3 + 7 * j, line)
    return lines, kinds


def read_records(data: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(data.glob("*.jsonl")) for line in f.read_text().splitlines() if line]


def test_openai_batch_file_resumes_after_a_driver_kill(ray_cluster, model_dir, tmp_path):
    lines, kinds = request_lines(36)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "requests.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "jobs.batch", "--model", str(model_dir), "--input",
            str(tmp_path / "in" / "requests.jsonl"), "--output", str(out), "--device", "cpu",
            "--num-replicas", "1", "--replica-num-cpus", "0.5",
            # small batches and files so that the kill lands between committed files
            "--batch-size", "2", "--batches-in-flight", "1", "--rows-per-file", "2",
            "--set", "read_bytes_per_task=600", "--model-cache-dir", str(tmp_path / "cache"),
            "--max-error-fraction", "0.2", "--ray-address", ray_cluster, "--summary-json"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ckpt = out / "_checkpoint"
    try:
        _wait_for(lambda: len([p for p in ckpt.glob("*.parquet") if not p.name.endswith(".pending.parquet")]) >= 2,
                  240, "two committed files", proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "_SUCCESS").exists(), "the job finished before it could be interrupted"
    partial = read_records(out / "data")
    assert 0 < len(partial) < len(lines)

    rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["status"] == "succeeded" and summary["rows_resumed"] >= 2
    assert summary["rows_in"] == len(lines) and summary["rows_error"] == 4

    recs = read_records(out / "data")
    ids = [r["custom_id"] for r in recs if r["custom_id"] is not None]
    assert sorted(ids) == sorted(k for k in kinds if k != "bad-json")  # every custom_id exactly once
    assert len(recs) == len(lines) and len({r["id"] for r in recs}) == len(lines)
    llm = glm4.LLM(model_dir, device="cpu")
    by_id = {r["custom_id"]: r for r in recs}
    for cid, kind in kinds.items():
        if cid == "bad-json":
            (rec,) = [r for r in recs if r["custom_id"] is None]
            assert rec["response"] is None and rec["error"]["code"] == "invalid_json_line"
            continue
        rec = by_id[cid]
        if kind == "invalid_url":
            assert rec["response"] is None and rec["error"]["code"] == kind
        elif kind == 400:
            assert rec["error"] is None and rec["response"]["status_code"] == 400
            assert set(rec["response"]["body"]["error"]) >= {"message", "type", "param", "code"}
        else:
            assert rec["error"] is None and rec["response"]["status_code"] == 200, rec
            body = rec["response"]["body"]
            i = int(cid.split("-")[1])
            if kind == "chat":
                parsed = ChatCompletion.model_validate(body)
                ids_ = llm.tokenizer.apply_chat_template([{"role": "user", "content": f"tell me about {i}"}],
                                                         add_generation_prompt=True)
                got = parsed.choices[0].message.content
            else:
                parsed = Completion.model_validate(body)
                ids_ = llm.tokenizer.encode_prompt(f"count {i}")
                got = parsed.choices[0].text
            want = llm.generate([ids_], glm4.SamplingParams(temperature=0, max_tokens=6))[0].text
            assert got == want, cid
            assert parsed.usage.completion_tokens == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["format"] == "jsonl" and manifest["counts"]["missing_ids"] == 0
    kinds_out = manifest["counts"]["errors_by_kind"]
    assert kinds_out["invalid_json_line"] == 1 and kinds_out["invalid_url"] == 1 and sum(kinds_out.values()) == 4
    assert (out / "_SUCCESS").exists()
