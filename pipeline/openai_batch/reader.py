"""Reading OpenAI Batch input files: one request per line, split into Ray Data read tasks by byte ranges.

A read task owns the lines that *start* in its byte range ``[start, end)`` (Hadoop's rule): it skips the partial
line it lands in (unless ``start`` is 0 or the byte before ``start`` is a newline) and reads on past ``end`` to
finish the last line it owns. Every line is therefore read exactly once, however the file is cut, and one huge
file becomes many tasks. A line's id is ``"<rel>@<byte offset of its first byte>"``: stable across runs while
the file is unchanged, which makes it the checkpoint key of exactly-once processing.

Rows (all strings): ``<id_column>``, ``custom_id`` (null if absent or not a string), ``url``, ``body`` (the body
re-serialized as compact JSON), ``__line_error`` / ``__line_error_code`` (null, or why the line is unusable).
Blank lines are skipped. Nothing is ever unpickled: a line is JSON text or an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa

CUSTOM_ID = "custom_id"
URL = "url"
BODY = "body"
LINE_ERROR = "__line_error"
LINE_ERROR_CODE = "__line_error_code"

# The endpoints a line may name, and the kind of request each is.
URL_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}

_ROWS_PER_BLOCK = 4096
_BYTES_PER_BLOCK = 64 * 2**20
_CHUNK_BYTES = 2**20


@dataclass(frozen=True)
class ParsedLine:
    """One non-blank input line. ``error`` set means the line is unusable (then ``error_code`` says which way and
    ``body`` is None); ``custom_id`` is kept whenever the line had a string one."""

    custom_id: str | None
    url: str | None
    body: str | None
    error: str | None = None
    error_code: str | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(raw: bytes | str) -> ParsedLine | None:
    """A line of an OpenAI Batch file (``{"custom_id", "method": "POST", "url", "body"}``), or None if blank.

    Error codes: ``invalid_json_line`` (not UTF-8, not JSON, NaN/Infinity, not an object), ``invalid_custom_id``
    (missing, not a string, empty), ``invalid_method`` (not "POST"), ``invalid_url`` (not one of
    :data:`URL_KINDS`), ``invalid_body`` (missing or not an object).
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return ParsedLine(None, None, None, f"line is not valid UTF-8 ({e})", "invalid_json_line")
    else:
        text = raw
    text = text.strip().lstrip("\ufeff")
    if not text:
        return None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError
        return ParsedLine(None, None, None, f"line is not valid JSON ({e})", "invalid_json_line")
    if not isinstance(obj, dict):
        return ParsedLine(None, None, None, f"line must be a JSON object, got {_json_type(obj)}", "invalid_json_line")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        why = "missing" if custom_id is None else ("empty" if custom_id == "" else f"a {_json_type(custom_id)}")
        return ParsedLine(None, None, None, f"custom_id must be a non-empty string, got {why}", "invalid_custom_id")
    url = obj.get("url")
    url_text = url if isinstance(url, str) else None
    method = obj.get("method")
    if method != "POST":
        return ParsedLine(custom_id, url_text, None, f"method must be \"POST\", got {json.dumps(method)}",
                          "invalid_method")
    if url_text not in URL_KINDS:
        return ParsedLine(custom_id, url_text, None, f"url {json.dumps(url)} is not supported; use one of "
                          f"{sorted(URL_KINDS)}", "invalid_url")
    body = obj.get("body")
    if not isinstance(body, dict):
        got = "missing" if "body" not in obj else f"a {_json_type(body)}"
        return ParsedLine(custom_id, url_text, None, f"body must be a JSON object, got {got}", "invalid_body")
    return ParsedLine(custom_id, url_text, json.dumps(body, separators=(",", ":"), ensure_ascii=False))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(v), type(v).__name__)


def split_ranges(size: int, bytes_per_task: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges covering a file of ``size`` bytes, each ``bytes_per_task`` long (the last
    shorter). An empty file has none."""
    if bytes_per_task < 1:
        raise ValueError(f"bytes_per_task must be >= 1, got {bytes_per_task}")
    return [(a, min(a + bytes_per_task, size)) for a in range(0, size, bytes_per_task)]


def iter_owned_lines(f: Any, start: int, end: int, chunk_size: int = _CHUNK_BYTES) -> Iterator[tuple[int, bytes]]:
    """(offset, raw line incl. its newline) of every line that starts in ``[start, end)`` of the binary file ``f``
    (anything with ``seek`` and ``read``). The last line of a file may lack its newline.

    Reads ``chunk_size`` bytes at a time and splits them itself: fsspec's ``readline`` copies a whole cache block
    per line, which on S3 (50 MB blocks) would make a read task quadratic.
    """
    line_start = start - 1 if start > 0 else 0
    f.seek(line_start)
    skip = start > 0  # the rest of the line that byte start-1 is in belongs to the previous task ("\n" if it ends one)
    pending: list[bytes] = []  # the current line's bytes from earlier chunks
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        i = 0
        while (nl := chunk.find(b"\n", i)) >= 0:
            line = b"".join([*pending, chunk[i:nl + 1]]) if pending else chunk[i:nl + 1]
            pending, i = [], nl + 1
            if skip:
                skip = False
            elif line_start >= end:
                return
            else:
                yield line_start, line
            line_start += len(line)
        if i < len(chunk):
            pending.append(chunk[i:])
        if not skip and line_start >= end:  # the line now being read starts in the next task's range
            return
    if pending and not skip and line_start < end:
        yield line_start, b"".join(pending)


def _schema(id_column: str) -> pa.Schema:
    return pa.schema([(id_column, pa.string()), (CUSTOM_ID, pa.string()), (URL, pa.string()), (BODY, pa.string()),
                      (LINE_ERROR, pa.string()), (LINE_ERROR_CODE, pa.string())])


def read_range(fs: Any, path: str, rel: str, start: int, end: int, id_column: str) -> Iterable[pa.Table]:
    """The rows of the lines owned by ``[start, end)`` of ``path`` as Arrow tables of at most a few thousand rows
    (an empty table if the range owns no line)."""
    schema = _schema(id_column)
    cols: list[list[Any]] = [[] for _ in schema.names]
    size = 0
    emitted = False
    with fs.open(path, "rb") as f:
        for offset, raw in iter_owned_lines(f, start, end):
            parsed = parse_line(raw)
            if parsed is None:
                continue
            for col, value in zip(cols, (f"{rel}@{offset}", parsed.custom_id, parsed.url, parsed.body,
                                         parsed.error, parsed.error_code)):
                col.append(value)
            size += len(raw)
            if len(cols[0]) >= _ROWS_PER_BLOCK or size >= _BYTES_PER_BLOCK:
                yield pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=schema)
                emitted = True
                cols, size = [[] for _ in schema.names], 0
    if cols[0] or not emitted:
        yield pa.Table.from_arrays([pa.array(c, pa.string()) for c in cols], schema=schema)


def make_jsonl_datasource(fs: Any, files: Sequence[tuple[str, str, int]], *, id_column: str, bytes_per_task: int):
    """A Ray Data ``Datasource`` over OpenAI Batch ``.jsonl`` files on an fsspec filesystem (local or s3fs).

    ``files``: ``(path inside fs, path relative to the input root, size in bytes)``; ``rel`` is the stable part
    of the row ids. Each file is cut into ``bytes_per_task`` byte ranges, one read task each.
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    if id_column in (CUSTOM_ID, URL, BODY, LINE_ERROR, LINE_ERROR_CODE):
        raise ValueError(f"id_column {id_column!r} clashes with a column of the OpenAI batch rows")
    files = [(str(p), str(r), int(s)) for p, r, s in files]
    schema = _schema(id_column)

    class OpenAIBatchJsonlDatasource(Datasource):
        def get_name(self) -> str:
            return "OpenAIBatchJsonl"

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(size for _, _, size in files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            tasks = []
            for path, rel, size in files:
                for start, end in split_ranges(size, bytes_per_task):
                    meta = BlockMetadata(num_rows=None, size_bytes=end - start, exec_stats=None, input_files=(path,))
                    tasks.append(ReadTask(_reader(fs, path, rel, start, end, id_column), meta, schema=schema,
                                          per_task_row_limit=per_task_row_limit))
            return tasks

    return OpenAIBatchJsonlDatasource()


def _reader(fs: Any, path: str, rel: str, start: int, end: int, id_column: str):
    def read() -> Iterable[pa.Table]:
        from pipeline.io import storage_errors

        with storage_errors(f"reading {path} bytes {start}-{end}"):
            yield from read_range(fs, path, rel, start, end, id_column)

    return read
