"""Storage for the batch job: filesystems (local, file://, s3:// via s3fs), input listing, the prompt reader
(a Ray Data datasource with stable row ids), the node-local model cache, and small manifest helpers.

All object-storage access goes through fsspec/s3fs built from `StorageOptions`, so one set of options
(endpoint, credentials, timeouts) applies to the driver, the read and write tasks and the replicas.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import StorageOptions

logger = logging.getLogger(__name__)

# Weight formats that unpickle (arbitrary code execution on load): never downloaded, never loaded.
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_GLOB_CHARS = set("*?[")


class StorageError(RuntimeError):
    """Object storage or a filesystem could not be reached or refused an operation."""


class InputError(ValueError):
    """The input (files, columns, ids) does not fit the job config."""


class ModelPathError(ValueError):
    """The model location is missing, incomplete, or holds weights we refuse to load."""


# --- filesystems --------------------------------------------------------------------------------------------------
def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def strip_scheme(uri: str) -> str:
    if is_s3(uri):
        return uri.split("://", 1)[1]
    if uri.startswith("file://"):
        return uri[len("file://") :]
    return uri


def filesystem_for(uri: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for a local path, file:// or s3:// URI."""
    if is_s3(uri):
        import s3fs

        opts = (storage or StorageOptions()).resolved()
        return s3fs.S3FileSystem(**opts.s3fs_kwargs()), strip_scheme(uri).rstrip("/")
    path = os.path.abspath(os.path.expanduser(strip_scheme(uri)))
    return fsspec.filesystem("file"), path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem for `fs` (Ray Data's CheckpointConfig accepts only real pyarrow filesystems)."""
    if _is_local(fs):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def ray_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path as Ray Data should see it next to `filesystem=` (scheme kept for S3 so Ray unwraps it)."""
    return path if _is_local(fs) else f"s3://{path}"


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn low-level I/O failures into a `StorageError` that names the operation."""
    try:
        yield
    except (StorageError, InputError, ModelPathError, FileNotFoundError):
        raise
    except Exception as e:  # botocore/aiohttp/OSError: all mean "storage said no"
        if is_storage_exception(e):
            raise StorageError(f"{what}: {describe_storage_exception(e)}") from e
        raise


def is_storage_exception(e: BaseException) -> bool:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        mod = type(e).__module__ or ""
        if isinstance(e, (OSError, ConnectionError, TimeoutError)) or mod.startswith(
            ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3")
        ):
            return True
        text = str(e)
        if any(s in text for s in _STORAGE_MESSAGES):
            return True
        e = e.__cause__ or e.__context__
    return False


_STORAGE_MESSAGES = (
    "Could not connect to the endpoint URL",
    "EndpointConnectionError",
    "Connection refused",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "Cannot connect to host",
    "Unable to locate credentials",
    "AccessDenied",
    "NoSuchBucket",
    "Server disconnected",
)


def names_unreachable_storage(e: BaseException) -> bool:
    """The error says the store could not be reached or refused us (not that the data is bad)."""
    return any(s in str(e) for s in _STORAGE_MESSAGES)


def describe_storage_exception(e: BaseException) -> str:
    text = str(e)  # a Ray task error puts the traceback first and the cause last: keep both ends
    text = text if len(text) <= 600 else text[:200] + " ... " + text[-400:]
    for s in _STORAGE_MESSAGES:
        if s in str(e):
            return f"{s} ({type(e).__name__}: {text})"
    return f"{type(e).__name__}: {text}"


# --- input listing ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFile:
    path: str  # path inside the filesystem
    rel: str  # path relative to the input root: the stable part of derived row ids
    num_rows: int
    row_group_rows: tuple[int, ...]
    size: int


@dataclass(frozen=True)
class InputListing:
    uri: str
    fs: fsspec.AbstractFileSystem
    files: tuple[InputFile, ...]
    schema: pa.Schema
    format: str = "parquet"  # "parquet" | "jsonl" (OpenAI Batch request files; row counts unknown until read)

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


JSONL_SUFFIXES = (".jsonl",)
# Threads for metadata reads (footers, sizes, small files): latency-bound, so many more than cores.
IO_THREADS = 32


def parallel(fn, items: list) -> list:
    """`[fn(x) for x in items]` on a thread pool (object-store round trips overlap; order kept)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(IO_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def list_input_files(uri: str, storage: StorageOptions | None = None) -> InputListing:
    """All Parquet files of a file / directory / glob input, with row counts from their footers.

    Directory inputs take every `*.parquet` below the directory, skipping hidden and `_`-prefixed names (and the
    zero-byte "directory marker" keys some S3 writers leave, which end in "/").
    """
    fs, path = filesystem_for(uri, storage)
    with storage_errors(f"listing input {uri}"):
        if _GLOB_CHARS & set(path):
            paths = sorted(p for p in fs.glob(path) if not p.endswith("/") and fs.isfile(p))
            root = _glob_root(path)
        elif fs.isdir(path):
            paths = sorted(
                p
                for p in fs.find(path)
                if p.endswith((".parquet",) + JSONL_SUFFIXES) and not p.endswith("/")
                and not _hidden(posixpath.relpath(p, path))
            )
            root = path
        elif fs.isfile(path):
            paths, root = [path], posixpath.dirname(path)
        else:
            raise InputError(f"input not found: {uri}")
        if not paths:
            raise InputError(f"no Parquet (or OpenAI Batch .jsonl) files in input {uri}")
        if all(p.endswith(JSONL_SUFFIXES) for p in paths):
            sizes = parallel(lambda p: int(fs.size(p) or 0), paths)
            files = [InputFile(p, posixpath.relpath(p, root), -1, (), n) for p, n in zip(paths, sizes)]
            return InputListing(uri, fs, tuple(files), pa.schema([]), format="jsonl")
        if any(p.endswith(JSONL_SUFFIXES) for p in paths):
            raise InputError(f"input {uri} mixes .jsonl and Parquet files; use one format per job")

        def footer(p: str):
            with fs.open(p, "rb") as f:
                try:
                    md = pq.ParquetFile(f).metadata
                except pa.ArrowInvalid as e:  # not Parquet at all (bad magic, truncated footer)
                    raise InputError(f"input file {p} is not a readable Parquet file: {e}") from e
            return md, int(fs.size(p) or 0)

        files, schema = [], None
        for p, (md, size) in zip(paths, parallel(footer, paths)):  # footers read in parallel, checked in order
            file_schema = md.schema.to_arrow_schema()
            if schema is None:
                schema = file_schema
            elif not file_schema.equals(schema, check_metadata=False):
                missing = set(schema.names) ^ set(file_schema.names)
                if missing:
                    raise InputError(f"input files disagree on columns {sorted(missing)}: {p}")
            rg = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
            files.append(InputFile(p, posixpath.relpath(p, root), md.num_rows, rg, size))
    return InputListing(uri, fs, tuple(files), schema)


def _glob_root(path: str) -> str:
    parts = path.split("/")
    fixed = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return "/".join(fixed) or "/"


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def derived_ids(file: InputFile, start: int, stop: int) -> list[str]:
    return [f"{file.rel}#{i}" for i in range(start, stop)]


# --- the prompt reader --------------------------------------------------------------------------------------------
def make_prompt_datasource(listing: InputListing, columns: list[str], *, derive_id_column: str | None,
                           rows_per_task: int):
    """A Ray Data datasource over the input files.

    Why not `ray.data.read_parquet`: (1) a row id must exist *at the read* for Ray Data's checkpoint filter, and
    without an id column the only stable one is (file, row number), which only the reader knows; (2) read tasks
    are cut at row-group boundaries into ~rows_per_task rows, so many small files are not bin-packed into one
    task (which makes progress and resume all-or-nothing).
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    fs = listing.fs

    class PromptParquetDatasource(Datasource):
        def get_name(self) -> str:
            return "PromptParquet"

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(f.size for f in listing.files) * 3

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
            tasks = []
            for file in listing.files:
                for rgs, start, stop in _split_row_groups(file.row_group_rows, rows_per_task):
                    meta = BlockMetadata(
                        num_rows=stop - start,
                        size_bytes=int(file.size * (stop - start) / max(file.num_rows, 1)),
                        exec_stats=None,
                        input_files=(file.path,),
                    )
                    tasks.append(
                        ReadTask(
                            _reader(fs, file, rgs, start, stop, columns, derive_id_column),
                            meta,
                            per_task_row_limit=per_task_row_limit,
                        )
                    )
            return tasks

    return PromptParquetDatasource()


def _split_row_groups(row_group_rows: tuple[int, ...], rows_per_task: int) -> list[tuple[list[int], int, int]]:
    """Group consecutive row groups into chunks of >= rows_per_task rows: [(row_group_ids, first_row, end_row)]."""
    chunks, cur, start, pos = [], [], 0, 0
    for i, n in enumerate(row_group_rows):
        if n == 0:
            continue
        if not cur:
            start = pos
        cur.append(i)
        pos += n
        if pos - start >= rows_per_task:
            chunks.append((cur, start, pos))
            cur = []
    if cur:
        chunks.append((cur, start, pos))
    # A single huge row group still becomes several tasks: each reads the group and keeps its slice.
    out = []
    for rgs, s, e in chunks:
        if len(rgs) == 1 and e - s > 2 * rows_per_task:
            for a in range(s, e, rows_per_task):
                out.append((rgs, a, min(a + rows_per_task, e)))
        else:
            out.append((rgs, s, e))
    return out


def _reader(fs, file: InputFile, rgs: list[int], start: int, stop: int, columns: list[str],
            derive_id_column: str | None):
    def read() -> Iterable[pa.Table]:
        with storage_errors(f"reading {file.path}"):
            with fs.open(file.path, "rb") as f:
                pf = pq.ParquetFile(f)
                table = pf.read_row_groups(rgs, columns=columns)
        first = sum(file.row_group_rows[: rgs[0]])
        table = table.slice(start - first, stop - start)
        if derive_id_column is not None:
            table = table.append_column(derive_id_column, pa.array(derived_ids(file, start, stop), pa.string()))
        yield table

    return read


# --- model location -------------------------------------------------------------------------------------------------
def resolve_model_dir(uri: str, storage: StorageOptions | None, cache_dir: str, *, weights: bool = True) -> Path:
    """A local directory holding the model at `uri`.

    Local paths are used in place. `s3://` models are downloaded once per node: under a file lock, into a
    temporary sibling directory, then renamed into place (rename is atomic within a filesystem), so concurrent
    actors on one node wait for one download and never see a half-written model. `weights=False` fetches only the
    small files (config, tokenizer) for CPU stages that only tokenize.
    """
    if not is_s3(uri):
        path = Path(strip_scheme(uri)).expanduser().resolve()
        if not path.is_dir():
            raise ModelPathError(f"model directory not found: {uri}")
        if weights:
            check_weight_files([p.name for p in path.iterdir()], uri)
        return path

    from filelock import FileLock

    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16] + ("" if weights else "-meta")
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / key
    if (final / ".complete").exists():
        return final
    with FileLock(str(cache / f"{key}.lock")):
        if (final / ".complete").exists():
            return final
        fs, root = filesystem_for(uri, storage)
        with storage_errors(f"listing model {uri}"):
            entries = [p for p in fs.find(root) if not p.endswith("/")]
        names = [posixpath.relpath(p, root) for p in entries]
        escaping = [p for p, n in zip(entries, names) if n == ".." or n.startswith("../") or posixpath.isabs(n)]
        if escaping:  # S3 keys are plain strings: "m/../../x" would be written outside the cache
            raise ModelPathError(f"model {uri} has object keys that resolve outside its prefix (refusing to "
                                 f"download them): {escaping[:3]}")
        if weights:
            check_weight_files(names, uri)
        tmp = cache / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for remote, rel in zip(entries, names):
                if rel.endswith(PICKLE_WEIGHT_SUFFIXES) or (not weights and rel.endswith(".safetensors")):
                    continue
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                with storage_errors(f"downloading {uri}/{rel}"):
                    fs.get_file(remote, str(local))
            (tmp / ".complete").write_text(uri + "\n")
            if final.exists():  # left over from a crash before .complete was written
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        logger.info("model %s cached at %s", uri, final)
    return final


def check_weight_files(names: list[str], uri: str) -> None:
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES)]
        extra = f"; pickle-based weights are refused: {pickled[:3]}" if pickled else ""
        raise ModelPathError(f"no *.safetensors weights in model {uri}{extra}")


def model_fingerprint(uri: str, storage: StorageOptions | None) -> dict[str, Any]:
    """The model's config.json and a weight fingerprint, without downloading the weights.

    sha256 over config.json, the safetensors index (if any) and the name and size of every safetensors file:
    cheap (metadata only) and it changes whenever a weight file is replaced by one of another size or a config
    changes. It is an identity check, not a content hash of the weights.
    """
    fs, root = filesystem_for(uri, storage)
    with storage_errors(f"reading model metadata {uri}"):
        h = hashlib.sha256()
        config = None
        files = []
        for name in ("config.json", "model.safetensors.index.json"):
            p = posixpath.join(root, name)
            if fs.exists(p):
                data = fs.cat_file(p)
                h.update(name.encode() + b"\0" + data + b"\0")
                if name == "config.json":
                    config = json.loads(data)
        for p in sorted(fs.find(root)):
            if p.endswith(".safetensors"):
                size = int(fs.size(p))
                rel = posixpath.relpath(p, root)
                files.append({"name": rel, "size": size})
                h.update(f"{rel}\0{size}\0".encode())
    return {"config": config, "weights": {"sha256": h.hexdigest(), "files": files}}


def model_max_len(model_dir: Path) -> int | None:
    """Context length from config.json (chatglm: seq_length; glm: max_position_embeddings)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("seq_length", "max_position_embeddings", "max_sequence_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


# --- small files: manifest, _SUCCESS ---------------------------------------------------------------------------------
def write_text(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Write a small file; locally through a temporary name + rename so readers never see half a file."""
    with storage_errors(f"writing {path}"):
        if _is_local(fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        else:  # an S3 PUT is atomic by itself
            with fs.open(path, "wb") as f:
                f.write(text.encode())


def read_text(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    with storage_errors(f"reading {path}"):
        if not fs.exists(path):
            return None
        return fs.cat_file(path).decode()


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    with storage_errors(f"checking {path}"):
        return fs.exists(path)


def list_files(fs: fsspec.AbstractFileSystem, path: str, suffix: str = "") -> list[str]:
    with storage_errors(f"listing {path}"):
        if not fs.exists(path):
            return []
        return sorted(p for p in fs.find(path) if p.endswith(suffix) and not p.endswith("/"))


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with storage_errors(f"removing {path}"):
        if fs.exists(path):
            fs.rm(path, recursive=True)


def count_parquet_rows(fs: fsspec.AbstractFileSystem, paths: list[str]) -> int:
    """Rows of many Parquet files from their footers, read in parallel."""
    def one(p: str) -> int:
        with fs.open(p, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows

    with storage_errors("counting rows"):
        return sum(parallel(one, paths))


__all__ = [
    "StorageError",
    "InputError",
    "ModelPathError",
    "filesystem_for",
    "arrow_filesystem",
    "list_input_files",
    "make_prompt_datasource",
    "resolve_model_dir",
    "model_fingerprint",
    "model_max_len",
    "write_text",
    "read_text",
]

