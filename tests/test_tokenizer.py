"""Tests for glm4/tokenizer.py against the real GLM-4 tokenizer.model and published reference ids.

Reference data lives outside the repo in ../shared/glm4-tokenizer (never copied here).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm4.tokenizer import (
    SPECIAL_TOKENS,
    GLM4Tokenizer,
    IncrementalDetokenizer,
    load_tokenizer,
    write_byte_level_tokenizer,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOK_DIR = SHARED / "glm4-tokenizer"
VECTORS_FILE = TOK_DIR / "test_vectors.json"
CHAT_CONFIG = TOK_DIR / "glm-4-9b-chat" / "tokenizer_config.json"

needs_shared = pytest.mark.skipif(
    not (TOK_DIR / "tokenizer.model").is_file(), reason=f"reference tokenizer data not found at {TOK_DIR}"
)

# A hypothesis profile for this module: CPU is shared with other test runs, so no per-example deadline.
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.fixture(scope="module")
def tok() -> GLM4Tokenizer:
    if not (TOK_DIR / "tokenizer.model").is_file():
        pytest.skip(f"reference tokenizer data not found at {TOK_DIR}")
    return load_tokenizer(TOK_DIR)


@pytest.fixture(scope="module")
def vectors() -> dict:
    if not VECTORS_FILE.is_file():
        pytest.skip(f"{VECTORS_FILE} not found")
    return json.loads(VECTORS_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> GLM4Tokenizer:
    return load_tokenizer(write_byte_level_tokenizer(tmp_path_factory.mktemp("bytetok")))


def _special_pattern() -> re.Pattern[str]:
    return re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


def _tokenize_rendered(tok: GLM4Tokenizer, rendered: str) -> list[int]:
    """How a string-level template is tokenized: special-token text -> its id, the pieces between -> ordinary BPE."""
    specials = tok.special_ids
    ids: list[int] = []
    for piece in _special_pattern().split(rendered):
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(tok.encode(piece))
    return ids


# ------------------------------------------------------------------------------------------------------------------
# (a) test_vectors.json
# ------------------------------------------------------------------------------------------------------------------

KNOWN_VECTOR_KEYS = {
    "tokenizer_file_sha256",
    "special_tokens",
    "published_examples",
    "llama_cpp_pretokenizer_hashes",
    "locally_computed_examples_NOT_published",
}


@needs_shared
def test_vectors_file_has_only_known_kinds(vectors: dict) -> None:
    # A new kind of vector added to the JSON must get a test here rather than be silently ignored.
    assert set(vectors) <= KNOWN_VECTOR_KEYS, set(vectors) - KNOWN_VECTOR_KEYS
    for ex in vectors["published_examples"]:
        assert ("text" in ex) != ("messages" in ex), ex["name"]


@needs_shared
def test_tokenizer_file_sha256(vectors: dict) -> None:
    digest = hashlib.sha256((TOK_DIR / "tokenizer.model").read_bytes()).hexdigest()
    assert digest == vectors["tokenizer_file_sha256"]


@needs_shared
def test_special_token_ids(tok: GLM4Tokenizer, vectors: dict) -> None:
    assert tok.special_ids == vectors["special_tokens"]
    assert list(tok.special_ids) == list(SPECIAL_TOKENS)
    assert tok.num_ranks == 151329
    assert tok.vocab_size == len(tok) == 151343
    assert tok.prefix_ids == [151331, 151333]
    assert tok.stop_token_ids == (151329, 151336, 151338)
    assert tok.eos_token_id == tok.pad_token_id == 151329


@needs_shared
def test_published_examples(tok: GLM4Tokenizer, vectors: dict) -> None:
    examples = vectors["published_examples"]
    assert examples
    for ex in examples:
        if "messages" in ex:
            assert tok.apply_chat_template(ex["messages"], add_generation_prompt=True) == ex["ids"], ex["name"]
        elif ex["ids"][:2] == tok.prefix_ids:
            # Remote `tokenizer(text)`: prefix + BPE.
            assert tok.encode_prompt(ex["text"]) == ex["ids"], ex["name"]
            assert tok.decode(ex["ids"]) == ex["text"]
        else:
            assert tok.encode(ex["text"]) == ex["ids"], ex["name"]
            assert tok.decode(ex["ids"]) == ex["text"]


@needs_shared
def test_llama_cpp_pretokenizer_hashes(tok: GLM4Tokenizer, vectors: dict) -> None:
    # llama.cpp identifies a tokenizer by sha256(str(tokenizer.encode(chktxt))).
    chktxt = next(ex["text"] for ex in vectors["published_examples"] if "chktxt" in ex["name"])
    ids = tok.encode(chktxt)
    hashes = vectors["llama_cpp_pretokenizer_hashes"]
    assert len(hashes) == 2
    for key, (expected, _note) in hashes.items():
        seq = tok.prefix_ids + ids if "[151331,151333]+ids" in key else ids
        assert hashlib.sha256(str(seq).encode()).hexdigest() == expected, key
        if seq is not ids:
            assert seq == tok.encode_prompt(chktxt)


@needs_shared
def test_locally_computed_examples(tok: GLM4Tokenizer, vectors: dict) -> None:
    items = vectors["locally_computed_examples_NOT_published"]["items"]
    assert items
    for item in items:
        assert tok.encode(item["text"]) == item["ordinary_ids"], item["text"]
        assert tok.decode(item["ordinary_ids"]) == item["text"]


# ------------------------------------------------------------------------------------------------------------------
# (b) chat template == the chat repo's Jinja template
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_template() -> str:
    if not CHAT_CONFIG.is_file():
        pytest.skip(f"{CHAT_CONFIG} not found")
    return json.loads(CHAT_CONFIG.read_text(encoding="utf-8"))["chat_template"]


def _render_transformers(chat_template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render exactly as transformers' apply_chat_template does (its sandboxed env, trim_blocks, tojson)."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=add_generation_prompt
    )
    return rendered[0]


def _render_verbatim(chat_template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    """Render with plain Jinja defaults (no trim_blocks), i.e. the template text taken literally."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)


CHAT_CASES = {
    "single_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about autumn."},
    ],
    "multi_turn_history": [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ],
    "chinese_emoji": [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好👋！很高兴见到你，有什么可以帮助你的吗？"},
        {"role": "user", "content": "晚上睡不着应该怎么办"},
    ],
    "observation_metadata_empty": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": ""},  # empty content: skipped by both
        {"role": "user", "content": "Literal <|user|> and [gMASK] inside content"},
    ],
}


@needs_shared
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CHAT_CASES))
def test_chat_template_matches_jinja(
    tok: GLM4Tokenizer, chat_template: str, case: str, add_generation_prompt: bool
) -> None:
    messages = CHAT_CASES[case]
    rendered = _render_transformers(chat_template, messages, add_generation_prompt)
    assert tok.apply_chat_template(messages, add_generation_prompt, tokenize=False) == rendered
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    if case == "observation_metadata_empty":
        # Literal special text in content is ordinary text for us (and for the remote Python); a naive split of the
        # rendered string would turn it into control tokens.
        assert ids.count(tok.special_ids["[gMASK]"]) == 1
        user = tok.special_ids["<|user|>"]
        assert ids.count(user) == 2 and _tokenize_rendered(tok, rendered).count(user) == 3
        rendered = rendered.replace("Literal <|user|> and [gMASK]", "Literal xx and yy")
        messages = [dict(m) for m in messages]
        messages[-1]["content"] = "Literal xx and yy inside content"
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == _tokenize_rendered(tok, rendered)
    assert tok.decode(ids, skip_special_tokens=False) == rendered


@needs_shared
def test_chat_prompt_strings(tok: GLM4Tokenizer) -> None:
    # llama.cpp tests/test-chat-template.cpp "chatglm4" expected rendering (content not stripped).
    expected = (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant<|user|>\nHello<|assistant|>\nHi there<|user|>\n"
        "Who are you<|assistant|>\n   I am an assistant   <|user|>\nAnother question<|assistant|>"
    )
    assert tok.apply_chat_template(CHAT_CASES["multi_turn_history"], tokenize=False) == expected
    single = tok.apply_chat_template([{"role": "user", "content": "u"}], tokenize=False)
    assert single == "[gMASK]<sop><|user|>\nu<|assistant|>"


@needs_shared
def test_chat_newline_and_content_encoded_separately(tok: GLM4Tokenizer) -> None:
    # Remote algorithm: encode(metadata + "\n") and encode(content) separately. With a leading newline in content the
    # one-shot tokenization of the rendered string merges "\n\n" into one token; we follow the remote algorithm.
    ids = tok.apply_chat_template([{"role": "user", "content": "\nhi"}], add_generation_prompt=False)
    assert ids == [151331, 151333, 151336, 198] + tok.encode("\nhi")
    assert ids != _tokenize_rendered(tok, "[gMASK]<sop><|user|>\n\nhi")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "天气 <b>&amp; 'quotes'",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "python"},
    {"type": "simple_browser"},
    {"type": "cogview"},
]


@needs_shared
def test_chat_tools_preamble_matches_jinja_text(tok: GLM4Tokenizer, chat_template: str) -> None:
    messages = [
        {"role": "system", "content": "", "tools": TOOLS},
        {"role": "user", "content": "北京天气如何？"},
    ]
    ours = tok.apply_chat_template(messages, tokenize=False)
    # The Jinja template's text, taken literally, is exactly our prompt ...
    assert ours == _render_verbatim(chat_template, messages, True)
    # ... but transformers renders with trim_blocks=True, which eats the first "\n" after each tool-type tag; we keep
    # the "\n\n## name" separators of the remote Python code (the trained format).
    assert ours.replace("\n\n## ", "\n## ") == _render_transformers(chat_template, messages, True)
    ids = tok.apply_chat_template(messages)
    assert ids[:3] == [151331, 151333, 151335]
    preamble = ours[len("[gMASK]<sop><|system|>\n") : ours.index("<|user|>")]
    assert ids[3:] == [198] + tok.encode(preamble) + [151336, 198] + tok.encode("北京天气如何？") + [151337]
    assert '"description": "天气 <b>&amp; \'quotes\'"' in preamble  # no HTML escaping, non-ASCII kept

    # A message that has both tools and content gets the tools system message first, then itself.
    both = tok.apply_chat_template([{"role": "system", "content": "S", "tools": TOOLS[:1]}], tokenize=False)
    assert both.startswith("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM") and both.endswith("<|system|>\nS<|assistant|>")
    # Empty / None tools add nothing (remote Python truthiness).
    plain = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert tok.apply_chat_template([{"role": "user", "content": "x", "tools": []}], tokenize=False) == plain
    assert tok.apply_chat_template([{"role": "user", "content": "x", "tools": None}], tokenize=False) == plain


# ------------------------------------------------------------------------------------------------------------------
# (c) round-trip properties and streaming detokenization
# ------------------------------------------------------------------------------------------------------------------


def _chunked(ids: list[int], cuts: list[int]) -> list[list[int]]:
    points = sorted({c % (len(ids) + 1) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(points, points[1:])]


def _check_stream(tok: GLM4Tokenizer, text: str, ids: list[int], cuts: list[int]) -> None:
    det = IncrementalDetokenizer(tok, prompt_ids=tok.prefix_ids)
    emitted = ""
    for chunk in _chunked(ids, cuts):
        delta = det.step(chunk)
        assert "\ufffd" not in delta  # valid text: a held-back partial character is never emitted as garbage
        emitted += delta
        assert det.text == emitted
        assert text.startswith(emitted)
    assert det.finish() == ""
    assert det.text == text
    assert det.token_ids == ids


@needs_shared
@PROPERTY_SETTINGS
@given(text=st.text(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_roundtrip_real(tok: GLM4Tokenizer, text: str, cuts: list[int]) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.num_ranks for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    _check_stream(tok, text, ids, cuts)
    # One id per step, the way the engine feeds it.
    det = IncrementalDetokenizer(tok)
    assert "".join(det.step(i) for i in ids) + det.finish() == text


@PROPERTY_SETTINGS
@given(text=st.text(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_roundtrip_byte_level(byte_tok: GLM4Tokenizer, text: str, cuts: list[int]) -> None:
    # Byte-level ids split every multi-byte character, the hardest case for the hold-back logic.
    ids = byte_tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text
    _check_stream(byte_tok, text, ids, cuts)


@PROPERTY_SETTINGS
@given(
    ids=st.lists(st.integers(min_value=-3, max_value=300), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=6),
    skip=st.booleans(),
)
def test_stream_equals_decode_for_any_ids(byte_tok: GLM4Tokenizer, ids: list[int], cuts: list[int], skip: bool) -> None:
    # Arbitrary (also invalid UTF-8, special, out-of-range) ids: streamed text after finish() == decode().
    det = IncrementalDetokenizer(byte_tok, skip_special_tokens=skip)
    parts = [det.step(chunk) for chunk in _chunked(ids, cuts)]
    parts.append(det.finish())
    assert "".join(parts) == det.text == byte_tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_holds_back_partial_character(byte_tok: GLM4Tokenizer) -> None:
    det = IncrementalDetokenizer(byte_tok)
    b = "你".encode()  # 3 bytes
    assert det.step(b[0]) == "" and det.num_pending_bytes == 1
    assert det.step([b[1]]) == "" and det.num_pending_bytes == 2
    assert det.step([b[2], ord("a")]) == "你a" and det.num_pending_bytes == 0
    assert det.step([0xFF]) == "\ufffd"  # invalid byte: replaced at once, like decode()
    assert det.step([b[0]]) == ""
    assert det.finish() == "\ufffd"  # stream ended inside a character
    assert det.text == "你a\ufffd\ufffd" == byte_tok.decode([*b, ord("a"), 0xFF, b[0]])
    with pytest.raises(RuntimeError):
        det.step([1])


@needs_shared
def test_detokenizer_specials(tok: GLM4Tokenizer) -> None:
    ids = tok.encode("你好") + [tok.eos_token_id]
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(det.step(i) for i in ids) == "你好<|endoftext|>"
    det = IncrementalDetokenizer(tok)
    assert "".join(det.step(i) for i in ids) == "你好"


# ------------------------------------------------------------------------------------------------------------------
# decode details, loading, caching, pickling
# ------------------------------------------------------------------------------------------------------------------


@needs_shared
def test_decode_specials_and_out_of_range(tok: GLM4Tokenizer) -> None:
    ids = [151331, 151333, 9703, 151336, 151342, 151343, 151551, -1, 21873]
    assert tok.decode(ids) == "Hello Hello"
    assert tok.decode(ids, skip_special_tokens=False) == "[gMASK]<sop>Hello<|user|><|end_of_video|> Hello"
    assert tok.decode_bytes([9281, 239]) == "👋".encode()[:3]
    assert tok.decode([9281, 239]) == "\ufffd"  # incomplete UTF-8 -> replacement
    assert tok.decode([]) == ""
    assert tok.token_bytes(198) == b"\n" and tok.token_bytes(151336) == b"<|user|>"
    with pytest.raises(IndexError):
        tok.token_bytes(151343)
    assert tok.is_special(151329) and not tok.is_special(151328) and not tok.is_special(151343)


@needs_shared
def test_special_text_is_ordinary(tok: GLM4Tokenizer) -> None:
    ids = tok.encode("<|user|>[gMASK]<|endoftext|>")
    assert all(i < tok.num_ranks for i in ids)
    assert tok.decode(ids) == "<|user|>[gMASK]<|endoftext|>"
    assert tok.encode_batch(["Hello", "<|user|>"]) == [[9703], tok.encode("<|user|>")]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@needs_shared
def test_load_from_file_dir_cache_and_pickle(tok: GLM4Tokenizer) -> None:
    again = load_tokenizer(TOK_DIR / "tokenizer.model")
    assert again._enc is tok._enc  # parsed once per process
    # Ray ships the tokenizer to workers by its state (__getstate__/__setstate__): rebuild it from that state
    # directly rather than through pickle (the project never unpickles anything, tests included).
    clone = GLM4Tokenizer.__new__(GLM4Tokenizer)
    clone.__setstate__(tok.__getstate__())
    assert clone.encode("Hello I am doing") == [9703, 358, 1079, 3730]
    assert clone.special_ids == tok.special_ids and clone.vocab_size == tok.vocab_size


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------------------------
# (d) byte-level fallback
# ------------------------------------------------------------------------------------------------------------------


def test_byte_level_tokenizer(byte_tok: GLM4Tokenizer) -> None:
    assert byte_tok.num_ranks == 256 and byte_tok.vocab_size == 270
    assert byte_tok.special_ids == {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert byte_tok.prefix_ids == [258, 260]
    assert byte_tok.stop_token_ids == (256, 263, 265)
    assert byte_tok.eos_token_id == byte_tok.pad_token_id == 256
    assert byte_tok.encode("abc") == [97, 98, 99]
    assert byte_tok.encode_prompt("hé") == [258, 260, 104, 0xC3, 0xA9]
    assert byte_tok.decode([258, 260, 104, 0xC3, 0xA9, 270, 999]) == "hé"
    assert byte_tok.decode([258, 104], skip_special_tokens=False) == "[gMASK]h"
    ids = byte_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids == [258, 260, 263, 10, 104, 105, 264]


def test_write_byte_level_tokenizer_paths(tmp_path: Path) -> None:
    written_dir = write_byte_level_tokenizer(tmp_path / "new" / "dir")
    assert written_dir == tmp_path / "new" / "dir" / "tokenizer.model"
    existing = tmp_path / "existing"
    existing.mkdir()
    assert write_byte_level_tokenizer(existing) == existing / "tokenizer.model"
    as_file = write_byte_level_tokenizer(tmp_path / "x" / "custom.model")
    assert as_file.is_file()
    lines = written_dir.read_text(encoding="ascii").splitlines()
    assert len(lines) == 256 and lines[0] == "AA== 0" and lines[65] == "QQ== 65"
    assert written_dir.read_bytes() == as_file.read_bytes() == (existing / "tokenizer.model").read_bytes()
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["tokenizer.model"]  # no temp file left
    assert load_tokenizer(as_file).vocab_size == 270


def test_cache_sees_rewritten_file(tmp_path: Path) -> None:
    path = write_byte_level_tokenizer(tmp_path)
    assert load_tokenizer(tmp_path).encode("ab") == [97, 98]
    # Add a merge "ab" -> 256: the file changes (size/mtime), so the cache must not serve the old parse.
    path.write_text(path.read_text(encoding="ascii") + "YWI= 256\n", encoding="ascii")
    tok2 = load_tokenizer(tmp_path)
    assert tok2.num_ranks == 257 and tok2.encode("ab") == [256]
    assert tok2.special_ids["<|endoftext|>"] == 257


# ------------------------------------------------------------------------------------------------------------------
# (e) errors name the culprit
# ------------------------------------------------------------------------------------------------------------------


def _byte_lines() -> list[str]:
    import base64

    return [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]


@pytest.mark.parametrize(
    ("mutate", "lineno", "fragment"),
    [
        (lambda ls: ls.__setitem__(9, "Cg=="), 10, "2 fields"),
        (lambda ls: ls.__setitem__(9, "Cg== 9 extra"), 10, "2 fields"),
        (lambda ls: ls.__setitem__(4, "not*base64 4"), 5, "invalid base64"),
        (lambda ls: ls.__setitem__(4, "BA= 4"), 5, "invalid base64"),
        (lambda ls: ls.__setitem__(7, "Bw== -7"), 8, "invalid rank"),
        (lambda ls: ls.__setitem__(7, "Bw== x"), 8, "invalid rank"),
        (lambda ls: ls.__setitem__(7, "Bw== 6"), 8, "duplicate rank 6"),
        (lambda ls: ls.__setitem__(7, "Bw== 999"), 8, "out of range"),
        (lambda ls: ls.append("AA== 256"), 257, "duplicate token"),
        (lambda ls: ls.insert(3, ""), 4, "2 fields"),
    ],
)
def test_malformed_tokenizer_file(tmp_path: Path, mutate, lineno: int, fragment: str) -> None:
    lines = _byte_lines()
    mutate(lines)
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    with pytest.raises(ValueError) as exc_info:
        load_tokenizer(path)
    msg = str(exc_info.value)
    assert f"{path}:{lineno}:" in msg and fragment in msg, msg


def test_tokenizer_file_missing_bytes_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    lines = _byte_lines()
    lines[65] = "YWI= 65"  # "ab" instead of "A": ranks contiguous, but byte 0x41 has no token
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    with pytest.raises(ValueError, match=r"missing 1 \(first: 0x41\)") as exc_info:
        load_tokenizer(path)
    assert str(path) in str(exc_info.value)
    empty = tmp_path / "empty" / "tokenizer.model"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty tokenizer file"):
        load_tokenizer(empty.parent)


def test_tokenizer_file_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(pickle.dumps({b"a": 0}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1:"):
        load_tokenizer(path)


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ({"role": "user", "content": "x"}, "messages must be a list of dicts, got dict"),
        ("hello", "messages must be a list of dicts, got str"),
        (None, "messages must be a list of dicts, got NoneType"),
        ([{"role": "user", "content": "x"}, "oops"], "messages[1] must be a dict, got str"),
        ([{"content": "x"}], "messages[0]: missing field 'role'"),
        ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}], "messages[1].role: unknown role 'bot'"),
        ([{"role": "tool", "content": "y"}], "use 'observation'"),
        ([{"role": "user"}], "messages[0]: missing field 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": None}], "messages[1].content must be a str"),
        ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], "messages[0].content must be a str, got list"),
        ([{"role": "assistant", "content": "a", "metadata": 3}], "messages[0].metadata must be a str, got int"),
        ([{"role": "system", "content": "", "tools": "python"}], "messages[0].tools must be a list"),
        ([{"role": "system", "content": "", "tools": [{"type": "web"}]}], "messages[0].tools[0].type: unknown tool"),
        (
            [{"role": "system", "content": "", "tools": [{"type": "python"}, {"type": "function", "function": {}}]}],
            "messages[0].tools[1].function.name",
        ),
        (
            [{"role": "system", "content": "", "tools": [{"type": "function", "function": {"name": "f", "x": {1}}}]}],
            "messages[0].tools[0].function is not JSON-serializable",
        ),
    ],
)
def test_bad_messages(byte_tok: GLM4Tokenizer, messages, fragment: str) -> None:
    for tokenize in (True, False):
        with pytest.raises(ValueError) as exc_info:
            byte_tok.apply_chat_template(messages, tokenize=tokenize)
        assert fragment in str(exc_info.value), str(exc_info.value)


def test_metadata_none_is_empty(byte_tok: GLM4Tokenizer) -> None:
    a = byte_tok.apply_chat_template([{"role": "assistant", "content": "a", "metadata": None}], tokenize=False)
    assert a == "[gMASK]<sop><|assistant|>\na<|assistant|>"
