"""BatchJobConfig: YAML and CLI parsing, validation, secret handling. No Ray, no model."""

from __future__ import annotations

import argparse
import json

import pytest
from pydantic import BaseModel, ValidationError

from pipeline.config import BatchJobConfig, StorageOptions, add_cli_arguments, config_from_args, redact_uri

BASE = {"input": "in.parquet", "output": "out/", "model": "m/", "prompt_column": "prompt"}


def _parse(argv: list[str]) -> BatchJobConfig:
    p = argparse.ArgumentParser()
    add_cli_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_defaults_and_derived_locations():
    c = BatchJobConfig(**BASE)
    assert c.data_uri == "out/data"
    assert c.resolved_checkpoint_uri == "out/_checkpoint"
    assert c.output_id_column == "id"
    assert c.sampling.temperature == 0.0  # batch default is greedy: reruns give the same text


@pytest.mark.parametrize(
    "data, needle",
    [
        ({**BASE, "promt_column": "x"}, "promt_column"),  # typo at the top level
        ({**BASE, "sampling": {"max_token": 3}}, "max_token"),  # typo in a nested section
        ({**BASE, "engine": {"block_sizes": 8}}, "block_sizes"),
        ({**BASE, "storage": {"endpoint": "http://x"}}, "endpoint"),
    ],
)
def test_unknown_keys_are_errors(data, needle):
    with pytest.raises(ValidationError, match=needle):
        BatchJobConfig.model_validate(data)


def test_exactly_one_prompt_source():
    with pytest.raises(ValidationError, match="exactly one of prompt_column and messages_column"):
        BatchJobConfig(**{**BASE, "messages_column": "m"})
    with pytest.raises(ValidationError, match="exactly one"):
        BatchJobConfig(input="a.parquet", output="b", model="c")
    # a directory may hold OpenAI Batch .jsonl files (no column needed): decided once listed, at run time
    assert BatchJobConfig(input="dir/", output="b", model="c").prompt_column is None
    assert BatchJobConfig(input="requests.jsonl", output="b", model="c").is_openai_batch_input


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"sampling": {"temperature": -1}}, "temperature"),
        ({"sampling": {"top_p": 0}}, "top_p"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"replica_num_cpus": 0}, "replica_num_cpus"),
        ({"max_error_fraction": 1.5}, "max_error_fraction"),
        ({"input": "  "}, "input"),
        ({"carry_columns": ["__token_ids"]}, "reserved"),
        ({"sampling": {"max_tokens": 64}, "engine": {"max_model_len": 64}}, "max_model_len"),
    ],
)
def test_invalid_values_name_the_field(patch, needle):
    with pytest.raises(ValidationError, match=needle):
        BatchJobConfig.model_validate({**BASE, **patch})


def test_every_field_is_described():
    """The descriptions are the user documentation; a field without one is undocumented."""

    def walk(model: type[BaseModel], prefix: str = ""):
        for name, f in model.model_fields.items():
            assert f.description and len(f.description) > 10, f"{prefix}{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(BatchJobConfig)


def test_yaml_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: s3://b/in/\noutput: s3://b/out/\nmodel: /m\nmessages_column: messages\n"
        "sampling: {max_tokens: 32, temperature: 0.5}\nnum_replicas: 3\n"
    )
    c = BatchJobConfig.from_yaml(path, **{"sampling.max_tokens": 8})
    assert (c.input, c.messages_column, c.num_replicas) == ("s3://b/in/", "messages", 3)
    assert (c.sampling.max_tokens, c.sampling.temperature) == (8, 0.5)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        BatchJobConfig.from_yaml(path)


def test_cli_flags_map_to_fields():
    c = _parse(
        ["--model", "/m", "--input", "in/", "--output", "out/", "--prompt-column", "p", "--id-column", "pid",
         "--max-tokens", "7", "--temperature", "0.3", "--num-replicas", "2", "--replica-num-cpus", "0.5",
         "--stop", "A", "--stop", "B", "--carry-columns", "a, b", "--no-prefix-aware", "--overwrite",
         "--max-error-fraction", "0.25", "--set", "engine.block_size=32", "--set", "engine.extra={x: 1}"]
    )
    assert (c.model, c.input, c.output, c.prompt_column, c.id_column) == ("/m", "in/", "out/", "p", "pid")
    assert (c.sampling.max_tokens, c.sampling.temperature, c.sampling.stop) == (7, 0.3, ["A", "B"])
    assert (c.num_replicas, c.replica_num_cpus, c.carry_columns) == (2, 0.5, ["a", "b"])
    assert (c.prefix_aware, c.overwrite, c.max_error_fraction) == (False, True, 0.25)
    assert c.engine.block_size == 32 and c.engine.extra == {"x": 1}


def test_cli_flags_override_the_job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: a\noutput: b\nmodel: c\nprompt_column: p\nsampling: {max_tokens: 100}\n")
    c = _parse(["--config", str(path), "--max-tokens", "5", "--output", "elsewhere"])
    assert (c.sampling.max_tokens, c.output, c.input) == (5, "elsewhere", "a")


def test_secrets_come_from_env_and_never_leak(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    c = BatchJobConfig(**BASE, storage={"secret_access_key": "inline-secret"})
    resolved = c.storage.resolved()
    kw = resolved.s3fs_kwargs()
    assert kw["key"] == "AKIDSECRETKEYID" and kw["secret"] == "inline-secret" and kw["token"] == "session-token-value"
    assert kw["endpoint_url"] == "http://minio:9000"
    dumped = json.dumps(c.redacted()) + json.dumps(c.model_dump(mode="json")) + repr(c) + str(resolved)
    for secret in ("very-secret-value", "inline-secret", "session-token-value", "AKIDSECRETKEYID"):
        assert secret not in dumped


def test_region_is_only_passed_when_set(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert "client_kwargs" not in StorageOptions().resolved().s3fs_kwargs()
    assert StorageOptions(region="eu-west-1").s3fs_kwargs()["client_kwargs"] == {"region_name": "eu-west-1"}


def test_uri_credentials_are_redacted():
    assert redact_uri("http://user:pw@host:9000/x") == "http://***@host:9000/x"
    assert redact_uri("s3://bucket/key") == "s3://bucket/key"
    c = BatchJobConfig(**{**BASE, "storage": {"endpoint_url": "http://u:p@minio:9000"}})
    assert c.redacted()["storage"]["endpoint_url"] == "http://***@minio:9000"


def test_changed_result_settings_are_named():
    """A rerun over a finished output with another config keeps the old results; the job must say so."""
    from pipeline.output_state import changed_result_settings

    old = {"input": "s3://b/in", "model": "m", "sampling": {"temperature": 0.0, "max_tokens": 16},
           "engine": {"dtype": None, "seed": 0}, "num_replicas": 2}
    same_results = {**old, "num_replicas": 8}  # more replicas: same results
    assert changed_result_settings(old, same_results) == []
    new = {**old, "sampling": {"temperature": 0.7, "max_tokens": 16}, "engine": {"dtype": "bfloat16", "seed": 0}}
    assert changed_result_settings(old, new) == ["sampling", "engine.dtype"]
    assert changed_result_settings({}, new) == []  # no manifest config to compare with
