"""pipeline.io: filesystems, input listing, the prompt reader, the model cache. moto S3, no Ray cluster."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from pipeline import io as pio
from pipeline.config import StorageOptions

from .conftest import free_port, write_prompts


def _storage(endpoint: str, **kw) -> StorageOptions:
    return StorageOptions(endpoint_url=endpoint, **kw)


def test_filesystem_for_local_and_file_uri(tmp_path):
    fs, path = pio.filesystem_for(f"file://{tmp_path}/x")
    assert path == f"{tmp_path}/x" and pio.arrow_filesystem(fs).type_name == "local"
    _, rel = pio.filesystem_for("relative/dir")
    assert Path(rel).is_absolute()


def test_listing_local_file_dir_and_glob(tmp_path):
    for name in ("a.parquet", "sub/b.parquet", "sub/c.parquet"):
        write_prompts(tmp_path / "in" / name, {"prompt": ["x", "y"]})
    (tmp_path / "in" / "_SUCCESS").write_text("")
    (tmp_path / "in" / "notes.txt").write_text("not parquet")
    write_prompts(tmp_path / "in" / "_tmp" / "d.parquet", {"prompt": ["z"]})  # hidden by the leading "_"
    listing = pio.list_input_files(str(tmp_path / "in"))
    assert [f.rel for f in listing.files] == ["a.parquet", "sub/b.parquet", "sub/c.parquet"]
    assert listing.num_rows == 6 and listing.schema.names == ["prompt"]
    assert [f.rel for f in pio.list_input_files(str(tmp_path / "in" / "sub" / "*.parquet")).files] == [
        "b.parquet", "c.parquet"]
    assert [f.rel for f in pio.list_input_files(f"file://{tmp_path}/in/a.parquet").files] == ["a.parquet"]


def test_listing_errors(tmp_path):
    with pytest.raises(pio.InputError, match="input not found"):
        pio.list_input_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(pio.InputError, match=r"no Parquet \(or OpenAI Batch .jsonl\) files"):
        pio.list_input_files(str(tmp_path / "empty"))
    write_prompts(tmp_path / "mixed" / "a.parquet", {"prompt": ["x"]})
    write_prompts(tmp_path / "mixed" / "b.parquet", {"text": ["x"]})
    with pytest.raises(pio.InputError, match="disagree on columns"):
        pio.list_input_files(str(tmp_path / "mixed"))


def test_listing_s3_ignores_directory_markers(s3, s3_endpoint, bucket):
    write_prompts(f"{bucket}/in/a.parquet", {"prompt": ["x", "y", "z"]}, fs=s3)
    write_prompts(f"{bucket}/in/part/b.parquet", {"prompt": ["w"]}, fs=s3)
    s3.pipe(f"{bucket}/in/part/", b"")  # zero-byte "directory" key, as pyarrow's S3 writer leaves
    s3.pipe(f"{bucket}/in/_SUCCESS", b"")
    listing = pio.list_input_files(f"s3://{bucket}/in/", _storage(s3_endpoint))
    assert [f.rel for f in listing.files] == ["a.parquet", "part/b.parquet"] and listing.num_rows == 4


def test_split_row_groups_cuts_at_row_group_boundaries():
    assert pio._split_row_groups((5, 5, 5), 10) == [([0, 1], 0, 10), ([2], 10, 15)]
    assert pio._split_row_groups((3, 0, 3), 2) == [([0], 0, 3), ([2], 3, 6)]
    # One big row group is still split into several tasks (each reads the group, keeps a slice).
    assert pio._split_row_groups((10,), 3) == [([0], 0, 3), ([0], 3, 6), ([0], 6, 9), ([0], 9, 10)]


def test_prompt_reader_derives_stable_ids(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", {"prompt": [f"p{i}" for i in range(7)]}, row_group_size=2)
    write_prompts(tmp_path / "in" / "b.parquet", {"prompt": ["q0", "q1"]})
    listing = pio.list_input_files(str(tmp_path / "in"))
    ds = pio.make_prompt_datasource(listing, ["prompt"], derive_id_column="id", rows_per_task=3)
    tasks = ds.get_read_tasks(1)
    assert len(tasks) == 3 and sum(t.metadata.num_rows for t in tasks) == 9
    rows = [r for t in tasks for block in t() for r in block.to_pylist()]
    assert rows == [{"prompt": f"p{i}", "id": f"a.parquet#{i}"} for i in range(7)] + [
        {"prompt": "q0", "id": "b.parquet#0"}, {"prompt": "q1", "id": "b.parquet#1"}]


def _upload(s3, local: Path, prefix: str) -> None:
    for p in local.iterdir():
        s3.put_file(str(p), f"{prefix}/{p.name}")


def test_model_from_s3_is_downloaded_once_per_node(s3, s3_endpoint, bucket, model_dir, tmp_path, monkeypatch):
    _upload(s3, model_dir, f"{bucket}/model")
    s3.pipe(f"{bucket}/model/pytorch_model.bin", b"pickled weights we never load")
    uri, storage, cache = f"s3://{bucket}/model", _storage(s3_endpoint), str(tmp_path / "cache")

    downloads = []
    real = pio.filesystem_for

    def counting(u, st=None):
        fs, path = real(u, st)
        orig = fs.get_file

        def get_file(rpath, lpath, **kw):
            downloads.append(rpath)
            time.sleep(0.05)  # widen the race window
            return orig(rpath, lpath, **kw)

        fs.get_file = get_file
        return fs, path

    monkeypatch.setattr(pio, "filesystem_for", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pio.resolve_model_dir(uri, storage, cache)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    local = results[0]
    expected = sorted(p.name for p in model_dir.iterdir())
    assert sorted(p.name for p in local.iterdir() if p.name != ".complete") == expected  # no .bin
    assert len(downloads) == len(expected), "each file downloaded exactly once across concurrent callers"
    assert not [p for p in Path(cache).iterdir() if ".tmp-" in p.name]  # no half-written leftovers
    assert pio.resolve_model_dir(uri, storage, cache) == local and len(downloads) == len(expected)


def test_metadata_only_download_skips_weights(s3, s3_endpoint, bucket, model_dir, tmp_path):
    _upload(s3, model_dir, f"{bucket}/m2")
    local = pio.resolve_model_dir(f"s3://{bucket}/m2", _storage(s3_endpoint), str(tmp_path), weights=False)
    names = {p.name for p in local.iterdir()}
    assert "tokenizer.model" in names and "config.json" in names
    assert not any(n.endswith(".safetensors") for n in names)


def test_pickle_only_models_are_refused(s3, s3_endpoint, bucket, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(pio.ModelPathError, match="pickle-based weights are refused"):
        pio.resolve_model_dir(str(tmp_path / "m"), None, str(tmp_path / "cache"))
    _upload(s3, tmp_path / "m", f"{bucket}/pickled")
    with pytest.raises(pio.ModelPathError, match="no \\*.safetensors"):
        pio.resolve_model_dir(f"s3://{bucket}/pickled", _storage(s3_endpoint), str(tmp_path / "cache"))
    with pytest.raises(pio.ModelPathError, match="not found"):
        pio.resolve_model_dir(str(tmp_path / "nope"), None, str(tmp_path / "cache"))


def test_fingerprint_is_location_independent_and_tracks_files(s3, s3_endpoint, bucket, model_dir, tmp_path):
    _upload(s3, model_dir, f"{bucket}/fp")
    local = pio.model_fingerprint(str(model_dir), None)
    remote = pio.model_fingerprint(f"s3://{bucket}/fp", _storage(s3_endpoint))
    assert local == remote and local["config"]["num_layers"] >= 1
    assert len(local["weights"]["files"]) == 2
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    shard = next(copy.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes() + b"\0")
    assert pio.model_fingerprint(str(copy), None)["weights"]["sha256"] != local["weights"]["sha256"]


@pytest.mark.timeout(90)
def test_unreachable_store_fails_fast_with_a_storage_error():
    storage = StorageOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=1, max_attempts=2)
    t0 = time.time()
    with pytest.raises(pio.StorageError, match="listing input s3://b/in"):
        pio.list_input_files("s3://b/in/", storage)
    assert time.time() - t0 < 60
