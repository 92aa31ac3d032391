"""Security properties: nothing is ever unpickled on a loading path, paths cannot escape their prefix through
ids, object keys or model names, the API key is compared in constant time, and secrets never reach logs,
stdout/stderr or manifests."""

from __future__ import annotations

import ast
import json
import os
import pickle
import posixpath
import secrets
import subprocess
import sys
import types
import uuid
from pathlib import Path

import pytest

import glm4
from glm4.weights import CheckpointError
from pipeline.config import StorageOptions
from pipeline.io import ModelPathError, resolve_model_dir

from .conftest import pipeline_helpers

pytestmark = [pytest.mark.reliability]

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("glm4", "pipeline", "jobs")


# ------------------------------------------------------------------------------------------------------ pickle
class _Boom:
    """Unpickling this runs code: it creates the sentinel file."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def _pickle_checkpoint(d: Path, sentinel: Path, tiny_checkpoint: Path, name: str) -> Path:
    d.mkdir(parents=True)
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (tiny_checkpoint / f).exists():
            (d / f).write_bytes((tiny_checkpoint / f).read_bytes())
    (d / name).write_bytes(pickle.dumps({"w": _Boom(str(sentinel))}))
    return d


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "weights.ckpt"])
def test_pickle_checkpoint_is_refused_with_a_clear_message(tmp_path, tiny_checkpoint, name):
    sentinel = tmp_path / "code-ran"
    d = _pickle_checkpoint(tmp_path / "ckpt", sentinel, Path(tiny_checkpoint), name)
    with pytest.raises(CheckpointError, match="refusing to load a pickle-based checkpoint"):
        glm4.load_model(d)
    with pytest.raises((CheckpointError, ValueError), match="pickle"):
        glm4.LLM(str(d), device="cpu")
    with pytest.raises(ModelPathError, match="pickle-based weights are refused"):
        resolve_model_dir(str(d), None, str(tmp_path / "cache"))
    assert not sentinel.exists(), "a pickle was unpickled"


def test_index_pointing_at_a_pickle_shard_is_refused(tmp_path, tiny_checkpoint):
    sentinel = tmp_path / "code-ran"
    d = _pickle_checkpoint(tmp_path / "ckpt", sentinel, Path(tiny_checkpoint), "pytorch_model-00001.bin")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"transformer.embedding.word_embeddings.weight": "pytorch_model-00001.bin"}}))
    with pytest.raises(CheckpointError, match="pickle"):
        glm4.load_model(d)
    assert not sentinel.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield node, f"{f.value.id}.{f.attr}"
            elif isinstance(f, ast.Name):
                yield node, f.id


UNSAFE_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal", "_pickle"}
UNSAFE_CALLS = {"torch.load", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                "eval", "exec", "np.load", "numpy.load", "torch.jit.load"}


def test_no_unpickling_anywhere_in_the_source_tree():
    """AST scan of glm4/, pipeline/, jobs/: no pickle-family import, no torch.load / np.load / yaml.load / eval /
    exec call (safetensors, json and yaml.safe_load only)."""
    found = []
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{rel}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{rel}:{node.lineno} from {node.module} import ...")
        for node, name in _calls(tree):
            if name in UNSAFE_CALLS:
                found.append(f"{rel}:{node.lineno} {name}(...)")
            if any(kw.arg in {"allow_pickle", "weights_only"} for kw in node.keywords):
                found.append(f"{rel}:{node.lineno} {name}(... allow_pickle/weights_only ...)")
    assert not found, "unsafe deserialisation in the source tree:\n" + "\n".join(found)
    # and the plain-text grep agrees (catches e.g. getattr(pickle, ...) or strings built at run time)
    grep = subprocess.run(["grep", "-rnE", r"torch\.load|pickle\.loads?\(|cloudpickle|allow_pickle=True",
                           *SOURCE_DIRS], cwd=REPO, capture_output=True, text=True)
    assert grep.stdout == "", grep.stdout


# ------------------------------------------------------------------------------------------------------ paths
def _upload_tiny(s3, prefix: str, tiny_checkpoint: Path) -> None:
    for p in Path(tiny_checkpoint).iterdir():
        if p.is_file():
            s3.pipe(f"{prefix}/{p.name}", p.read_bytes())


def test_s3_model_cache_cannot_be_escaped_by_object_keys(tmp_path, s3, bucket, s3_endpoint, tiny_checkpoint):
    """A model prefix holding a key with '..' segments (S3 keys are plain strings) must not write outside the
    node-local cache; a pickle next to the safetensors is never downloaded."""
    prefix = f"{bucket}/models/m"
    _upload_tiny(s3, prefix, Path(tiny_checkpoint))
    victim = tmp_path / "outside" / f"pwned-{uuid.uuid4().hex[:8]}.txt"
    depth = len((tmp_path / "cache").resolve().parts) + 4
    evil_key = f"{prefix}/" + "../" * depth + str(victim).lstrip("/")
    s3.pipe(evil_key, b"escaped")
    s3.pipe(f"{prefix}/extra.bin", pickle.dumps(_Boom(str(tmp_path / "code-ran"))))
    listed = [p for p in s3.find(prefix) if ".." in p]
    if not listed:
        pytest.skip("the object store normalised the '..' key; nothing to escape with")
    storage = StorageOptions(endpoint_url=s3_endpoint)
    cache = tmp_path / "cache"
    # Where a naive `cache/<tmp>/<relpath(key, prefix)>` would land (relpath resolves against the cwd).
    landing = Path(os.path.normpath(cache / "tmpdir" / posixpath.relpath(evil_key, prefix)))
    try:
        with pytest.raises(ModelPathError, match="outside its prefix"):
            resolve_model_dir(f"s3://{prefix}", storage, str(cache))
    finally:
        escaped = [p for p in (victim, landing) if p.exists()]
        for p in escaped:
            p.unlink()
    assert not escaped, f"a model object key wrote outside the cache: {escaped}"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and cache not in p.parents]
    assert not written, written
    assert not (tmp_path / "code-ran").exists()


def test_s3_model_download_skips_pickles(tmp_path, s3, bucket, s3_endpoint, tiny_checkpoint):
    prefix = f"{bucket}/models/m2"
    _upload_tiny(s3, prefix, Path(tiny_checkpoint))
    s3.pipe(f"{prefix}/pytorch_model.bin", pickle.dumps(_Boom(str(tmp_path / "code-ran"))))
    cache = tmp_path / "cache"
    local = resolve_model_dir(f"s3://{prefix}", StorageOptions(endpoint_url=s3_endpoint), str(cache))
    assert cache.resolve() in local.resolve().parents
    assert not list(local.rglob("*.bin")) and list(local.glob("*.safetensors"))
    assert not (tmp_path / "code-ran").exists()
    # a prefix with only pickles is refused before anything is downloaded
    only = f"{bucket}/models/pickles"
    s3.pipe(f"{only}/config.json", b"{}")
    s3.pipe(f"{only}/pytorch_model.bin", b"x")
    with pytest.raises(ModelPathError, match="pickle-based weights are refused"):
        resolve_model_dir(f"s3://{only}", StorageOptions(endpoint_url=s3_endpoint), str(cache))


@pytest.mark.parametrize("model_uri", ["s3://b/../../../etc", "s3://b/m/../../x", "s3://../../../../tmp/x"])
def test_model_cache_dir_name_is_a_hash_of_the_uri(tmp_path, model_uri, monkeypatch):
    """The cache entry of a model is named by a hash of its URI, so a model name with '..' cannot pick the
    directory: we stop right after the name is chosen (listing fails: there is no store)."""
    import pipeline.io as pio

    seen = {}

    def fake_fs(uri, storage=None):
        raise pio.StorageError("no store in this test")

    real_lock = __import__("filelock").FileLock

    def spy_lock(path, *a, **kw):
        seen["lock"] = path
        return real_lock(path, *a, **kw)

    monkeypatch.setattr(pio, "filesystem_for", fake_fs)
    monkeypatch.setattr("filelock.FileLock", spy_lock)
    cache = tmp_path / "cache"
    with pytest.raises(pio.StorageError):
        resolve_model_dir(model_uri, None, str(cache))
    lock = Path(seen["lock"]).resolve()
    assert lock.parent == cache.resolve() and ".." not in lock.name
    assert {p.name for p in tmp_path.iterdir()} == {"cache"}


# ------------------------------------------------------------------------------------------------------ API key
def test_api_key_comparison_is_constant_time(monkeypatch):
    """The bearer check goes through hmac.compare_digest (AST and behaviour), never `==` on the key."""
    import hmac

    from pipeline.serve import app as serve_app
    from pipeline.serve.protocol import APIError

    src = Path(serve_app.__file__).read_text(encoding="utf-8")
    tree = ast.parse(src)
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_check_auth")
    names = [name for _, name in _calls(fn)]
    assert "hmac.compare_digest" in names, names
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            text = ast.unparse(node)
            assert "_api_key" not in text and "token" not in text, f"non-constant-time comparison: {text}"
    # no other place compares against the key
    assert src.count("_api_key") <= 4, "the API key is used in more places than expected; re-check them"

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    server = types.SimpleNamespace(_api_key=b"k-123")
    req = lambda h: types.SimpleNamespace(headers={"authorization": h} if h is not None else {})  # noqa: E731
    serve_app.GLM4Server._check_auth(server, req("Bearer k-123"))
    for bad in ("Bearer k-124", "Bearer k-12", "Bearer", "", None, "Basic k-123"):
        with pytest.raises(APIError) as e:
            serve_app.GLM4Server._check_auth(server, req(bad))
        assert e.value.status_code == 401 and "k-123" not in str(e.value.body())
    assert calls and all(b == b"k-123" for _, b in calls)


# ------------------------------------------------------------------------------------------------------ secrets
def _ray_session_logs() -> Path | None:
    import ray

    if not ray.is_initialized():
        return None
    node = ray._private.worker._global_node
    return Path(node.get_session_dir_path()) / "logs"


def _grep_tree(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        try:
            data = p.read_bytes()
        except OSError:
            continue
        hits += [f"{p}: {n[:6]}..." for n in needles if n.encode() in data]
    return hits


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_secrets_never_in_logs_or_manifest_and_ids_cannot_escape(ray_cluster, tmp_path, s3, bucket, s3_endpoint,
                                                                 tiny_checkpoint):
    """A batch job (driver logging at DEBUG) from s3:// to s3:// with the model on s3:// and distinctive
    credentials in the environment;
    ids are path-traversal strings. Afterwards: the secret key, session token and API key appear nowhere in
    stdout/stderr, manifest.json, the output objects or the Ray session logs; every output object sits under the
    output prefix, and the hostile ids come back as plain data."""
    secret = "SeCrEt" + secrets.token_hex(16)
    token = "ToKeN" + secrets.token_hex(24)
    api_key = "ApIkEy" + secrets.token_hex(16)
    key_id = "AKIAREL" + secrets.token_hex(6).upper()
    ids = ["../../etc/x", "/etc/passwd", "..\\..\\win", "a/../../b", "%2e%2e%2f", "ok-1", "~/x", "s3://other/k"]
    write = pipeline_helpers.write_prompts
    write(f"{bucket}/in/p.parquet", {"pid": ids, "prompt": [f"hello {i}" for i in range(len(ids))]}, fs=s3)
    _upload_tiny(s3, f"{bucket}/model", Path(tiny_checkpoint))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token,
           "GLM4_API_KEY": api_key, "AWS_ENDPOINT_URL": s3_endpoint}
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "jobs.batch", "--model", f"s3://{bucket}/model", "--input", f"s3://{bucket}/in/",
            "--output", f"s3://{bucket}/out", "--prompt-column", "prompt", "--id-column", "pid", "--max-tokens", "2",
            "--num-replicas", "1", "--replica-num-cpus", "0.5", "--batch-size", "4", "--device", "cpu",
            "--model-cache-dir", str(cache), "--ray-address", ray_cluster, "--progress-interval", "1",
            "--log-level", "DEBUG", "--summary-json"]
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    needles = [secret, token, api_key]
    for name, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        assert not [n for n in needles + [key_id] if n in text], f"a secret is in the job's {name} (DEBUG logs)"
    manifest = s3.cat_file(f"{bucket}/out/manifest.json").decode()
    assert not [n for n in needles + [key_id] if n in manifest], "a secret is in manifest.json"
    json.loads(manifest)
    keys = [k for k in s3.find(bucket) if not k.endswith("/")]
    out_keys = [k for k in keys if not k.startswith((f"{bucket}/in/", f"{bucket}/model/"))]
    assert out_keys and all(k.startswith(f"{bucket}/out/") and "/../" not in k for k in out_keys), out_keys
    for k in out_keys:
        data = s3.cat_file(k)
        assert not [n for n in needles + [key_id] if n.encode() in data], f"a secret is in {k}"
    # the hostile ids are data, not paths
    import pyarrow.parquet as pq

    rows = []
    for k in out_keys:
        if k.endswith(".parquet") and "/data/" in k:
            with s3.open(k, "rb") as f:
                rows += pq.read_table(f, columns=["pid"]).column("pid").to_pylist()
    assert sorted(rows) == sorted(ids)
    # nothing was written outside the cache and the output prefix on the local side
    assert cache.is_dir() and all(cache.resolve() in p.resolve().parents for p in cache.rglob("*"))
    logs = _ray_session_logs()
    if logs is not None and logs.is_dir():
        hits = _grep_tree(logs, needles)
        assert not hits, f"a secret is in the Ray logs: {hits}"
