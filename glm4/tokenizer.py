"""GLM-4 tokenizer: tiktoken byte-level BPE + the 14 GLM-4 special tokens + the GLM-4 chat format.

The file format is the one of the original ``tokenizer.model``: UTF-8 text, one ``<base64(token bytes)> <rank>`` line
per token (151,329 lines for GLM-4-9B). We parse it ourselves (strictly, and never through pickle) and hand the ranks
to ``tiktoken.Encoding`` with ``special_tokens={}``; special tokens are handled here, so text that merely *contains*
``"<|user|>"`` is always encoded as ordinary text (prompt-injection safe, and what the reference chat template does).

Special ids are ``num_ranks + i`` in the fixed GLM-4 order (``SPECIAL_TOKENS``): 151329..151342 with the real file,
256..269 with the byte-level fallback written by :func:`write_byte_level_tokenizer`.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

__all__ = [
    "SPECIAL_TOKENS",
    "PAT_STR",
    "CHAT_ROLES",
    "TOKENIZER_FILE_NAME",
    "GLM4Tokenizer",
    "IncrementalDetokenizer",
    "load_tokenizer",
    "write_byte_level_tokenizer",
]

TOKENIZER_FILE_NAME = "tokenizer.model"

# Fixed order: the id of SPECIAL_TOKENS[i] is num_ranks + i (matches the published GLM-4 ids 151329..151342).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# The original cl100k_base split pattern (GLM-4's tokenization_chatglm.py uses exactly this one).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "observation")

# System preamble added for a message that carries `tools`. The wording is the chat repo's Jinja chat_template
# ("ChatGLM"; the remote Python has the typo "GhatGLM"). Separators follow the remote Python / the format the model
# was trained on ("\n\n## name"): transformers renders the Jinja with trim_blocks=True, which eats one of those two
# newlines after each `{% if tool['type'] == ... %}` tag.
_TOOLS_PREAMBLE = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
)
_FUNCTION_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
_BUILTIN_TOOL_TEXT: dict[str, str] = {
    "python": (
        "\n\n## python\n\n当你向 `python` 发送包含 Python 代码的消息时，该代码将会在一个有状态的 Jupyter notebook "
        "环境中执行。\n`python` 返回代码执行的输出，或在执行 60 秒后返回超时。\n`/mnt/data` 将会持久化存储你的文件。"
        "在此会话中，`python` 无法访问互联网。不要使用 `python` 进行任何网络请求或者在线 API 调用，这些在线内容的访问将不会成功。"
    ),
    "simple_browser": (
        "\n\n## simple_browser\n\n你可以使用 `simple_browser` 工具。该工具支持以下函数：\n"
        "`search(query: str, recency_days: int)`：使用搜索引擎进行查询并显示结果，可以使用 `recency_days` "
        "参数控制搜索内容的时效性。\n`mclick(ids: list[int])`：获取一系列指定 id 的页面内容。每次调用时，须选择3-10个页面。"
        "选择多个角度的页面，同时尽可能选择可信任的信息来源。考虑到部分页面是无法加载的，你也可以多打开一些可能有用的页面而不用担心"
        "内容过多。\n`open_url(url: str)`：打开指定的 URL。\n\n使用 `【{引用 id}†{引用文本}】` 来引用内容。\n\n"
        "操作步骤：1. 使用 `search` 来获得信息列表; 2. 使用 `mclick` 来获取指定 ID 页面的内容; 3. 根据获得的内容进行回复。"
        "在回复中应当引用信息来源。\n 如果用户提供了 URL，也可以用 `open_url` 直接打开页面。\n"
        "如果初次搜索结果没有找到合适的信息，也可以再次使用 `search` 进行搜索。"
    ),
    "cogview": (
        "\n\n## cogview\n\n如果用户的请求中包含了对图像的描述，你可以使用 `cogview` 来生成图像并展示给用户。"
        "你需要向 `cogview` 发送图像描述，规则：\n- 发送给 `cogview` 的消息必须使用英语。用户的中文描述必须完全翻译为英语。\n"
        "- 应当尽可能详细地描述图像生成的需求，需求描述约 100 英文单词。\n- 保持用户原始描述的意图。不要虚构内容或者没见过的人物。\n"
        "- 如无特殊说明，所在地为中国，持有中国立场并遵循中国社会主义价值观。"
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# tokenizer.model parsing
# --------------------------------------------------------------------------------------------------------------------


def _parse_ranks(path: str) -> tuple[bytes, ...]:
    """Parse and validate a tiktoken rank file; return the token bytes indexed by rank.

    Strict on purpose: a truncated or corrupted download must fail here with the file and line, not later as a
    panic inside tiktoken (missing single bytes) or as silently shifted special-token ids (rank gaps).
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise ValueError(f"{path}: empty tokenizer file (expected lines '<base64 token> <rank>')")
    token_of_rank: list[bytes | None] = [None] * len(lines)
    seen_tokens: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(
                f"{path}:{lineno}: malformed line {line[:80]!r}: expected '<base64 token> <rank>' (2 fields), "
                f"got {len(parts)}"
            )
        b64, rank_text = parts
        try:
            # strict_mode rejects non-alphabet characters and bad padding instead of silently skipping them.
            token = binascii.a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: invalid base64 token {b64[:60]!r}: {exc}") from None
        if not token:
            raise ValueError(f"{path}:{lineno}: empty token")
        # bytes.isdigit() is ASCII-only: rejects '+1', '-1', '1.0', non-ASCII digits.
        if not rank_text.isdigit():
            raise ValueError(f"{path}:{lineno}: invalid rank {rank_text[:40]!r}: expected a non-negative integer")
        rank = int(rank_text)
        if rank >= len(lines):
            raise ValueError(
                f"{path}:{lineno}: rank {rank} out of range: ranks must be contiguous 0..{len(lines) - 1} "
                f"({len(lines)} lines)"
            )
        if token_of_rank[rank] is not None:
            raise ValueError(f"{path}:{lineno}: duplicate rank {rank}")
        if token in seen_tokens:
            raise ValueError(f"{path}:{lineno}: duplicate token {token!r} (already rank {seen_tokens[token]})")
        seen_tokens[token] = rank
        token_of_rank[rank] = token
    # n lines, n distinct ranks all < n  =>  ranks are exactly 0..n-1 (no gap is possible).
    missing = [b for b in range(256) if bytes([b]) not in seen_tokens]
    if missing:
        raise ValueError(
            f"{path}: byte-level BPE needs all 256 single bytes as tokens; missing {len(missing)} "
            f"(first: 0x{missing[0]:02x})"
        )
    return tuple(token_of_rank)  # type: ignore[arg-type]  # every slot filled, see above


@functools.lru_cache(maxsize=8)
def _load_core(path: str, mtime_ns: int, size: int) -> tuple[tiktoken.Encoding, tuple[bytes, ...]]:
    """Parse once per (file, version) per process: the real file takes ~1 s to parse and build.

    mtime_ns and size are part of the key only so that a rewritten file is re-read.
    """
    del mtime_ns, size
    token_bytes = _parse_ranks(path)
    return _build_encoding(token_bytes), token_bytes


def _build_encoding(token_bytes: Sequence[bytes]) -> tiktoken.Encoding:
    ranks = {tok: rank for rank, tok in enumerate(token_bytes)}
    # special_tokens={}: specials never come out of tiktoken; see module docstring.
    return tiktoken.Encoding(name="glm4", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


def _resolve_model_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE_NAME
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    return p.resolve()


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


class GLM4Tokenizer:
    """GLM-4 tokenizer (byte-level BPE with GLM-4 special tokens and chat format).

    Build it with :func:`load_tokenizer`. Immutable and thread-safe after construction.
    """

    def __init__(self, model_file: str | os.PathLike[str]) -> None:
        path = _resolve_model_file(model_file)
        st = path.stat()
        encoding, token_bytes = _load_core(str(path), st.st_mtime_ns, st.st_size)
        self._init(str(path), encoding, token_bytes)

    def _init(self, path: str, encoding: tiktoken.Encoding, token_bytes: tuple[bytes, ...]) -> None:
        self.path = path
        self._enc = encoding
        self._num_ranks = len(token_bytes)
        self._special_ids = {name: self._num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        # One flat id -> bytes table (specials as their UTF-8 text) so decode is a single join.
        self._id_to_bytes: tuple[bytes, ...] = token_bytes + tuple(s.encode("utf-8") for s in SPECIAL_TOKENS)
        self._vocab_size = len(self._id_to_bytes)
        self._role_ids = {role: self._special_ids[f"<|{role}|>"] for role in CHAT_ROLES}

    # Pickle the token table rather than the tiktoken object, and rebuild on load: Ray ships tokenizers to workers
    # that may not have the file at the same path.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "token_bytes": self._id_to_bytes[: self._num_ranks]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        token_bytes = tuple(state["token_bytes"])
        self._init(state["path"], _build_encoding(token_bytes), token_bytes)

    def __repr__(self) -> str:
        return f"GLM4Tokenizer(path={self.path!r}, num_ranks={self._num_ranks}, vocab_size={self._vocab_size})"

    def __len__(self) -> int:
        return self._vocab_size

    # ---- properties ---------------------------------------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        """Number of BPE ranks in the file (151329 for GLM-4)."""
        return self._num_ranks

    @property
    def vocab_size(self) -> int:
        """Ranks + 14 specials (151343 for GLM-4; the model pads its embedding to 151552 rows)."""
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token text -> id (a copy)."""
        return dict(self._special_ids)

    @property
    def prefix_ids(self) -> list[int]:
        """``[gMASK] <sop>``: every GLM-4 sequence starts with these two ids."""
        return [self._special_ids["[gMASK]"], self._special_ids["<sop>"]]

    @property
    def stop_token_ids(self) -> tuple[int, int, int]:
        """``(<|endoftext|>, <|user|>, <|observation|>)``: the chat model ends its turn with the next role token."""
        s = self._special_ids
        return (s["<|endoftext|>"], s["<|user|>"], s["<|observation|>"])

    @property
    def eos_token_id(self) -> int:
        return self._special_ids["<|endoftext|>"]

    @property
    def pad_token_id(self) -> int:
        return self._special_ids["<|endoftext|>"]

    def is_special(self, token_id: int) -> bool:
        return self._num_ranks <= token_id < self._vocab_size

    # ---- encoding -----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``; special-token strings inside it are ordinary text. No prefix is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Like :meth:`encode` for many texts (tiktoken releases the GIL and uses a thread pool)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() expects str items, item {i} is {type(t).__name__}")
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode_prompt(self, text: str) -> list[int]:
        """``[gMASK] <sop>`` + encode(text): the remote tokenizer's ``tokenizer(text)`` (plain completion)."""
        return self.prefix_ids + self.encode(text)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """GLM-4 chat prompt for OpenAI-style messages.

        Follows the remote ``tokenization_chatglm.py`` algorithm: ``[gMASK]<sop>``, then per message (empty content
        skipped) ``<|role|>`` + encode(metadata + "\\n") + encode(content) -- the two encoded separately, which only
        differs from tokenizing the rendered string when content starts with a newline -- and finally
        ``<|assistant|>`` (no newline) if ``add_generation_prompt``. A message with a non-empty ``tools`` list is
        preceded by a system message describing the tools.

        Each message: ``role`` in system/user/assistant/observation, ``content`` str, optional ``metadata`` str
        (None = ""), optional ``tools`` (list of ``{"type": "function", "function": {...}}`` or
        ``{"type": "python"|"simple_browser"|"cogview"}``); other keys are ignored.
        With ``tokenize=False`` the prompt string is returned (special tokens as text).
        Raises ValueError naming the message index and field for malformed input.
        """
        turns = _validate_messages(messages)
        if not tokenize:
            out = ["[gMASK]<sop>"]
            for role, metadata, content in turns:
                out.append(f"<|{role}|>{metadata}\n{content}")
            if add_generation_prompt:
                out.append("<|assistant|>")
            return "".join(out)
        ids = self.prefix_ids
        for role, metadata, content in turns:
            ids.append(self._role_ids[role])
            ids.extend(self._enc.encode_ordinary(metadata + "\n"))
            ids.extend(self._enc.encode_ordinary(content))
        if add_generation_prompt:
            ids.append(self._role_ids["assistant"])
        return ids

    # ---- decoding -----------------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = True) -> bytes:
        """Concatenated token bytes. Ids outside ``[0, vocab_size)`` are ignored (the model's padded vocabulary rows
        are not tokens); specials are dropped when skipped, else rendered as their text."""
        table = self._id_to_bytes
        limit = self._num_ranks if skip_special_tokens else self._vocab_size
        return b"".join([table[i] for i in ids if 0 <= i < limit])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (UTF-8 with errors="replace"). See :meth:`decode_bytes`."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes of one token (specials as their text); IndexError outside ``[0, vocab_size)``."""
        if not 0 <= token_id < self._vocab_size:
            raise IndexError(f"token id {token_id} outside [0, {self._vocab_size})")
        return self._id_to_bytes[token_id]


def _validate_messages(messages: Any) -> list[tuple[str, str, str]]:
    """Check chat messages and flatten them to (role, metadata, content) turns, tools preamble included."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    turns: list[tuple[str, str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        if "role" not in msg:
            raise ValueError(f"messages[{i}]: missing field 'role'")
        role = msg["role"]
        if role not in CHAT_ROLES:
            hint = " (use 'observation' for tool results)" if role == "tool" else ""
            raise ValueError(
                f"messages[{i}].role: unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}{hint}"
            )
        if "content" not in msg:
            raise ValueError(f"messages[{i}]: missing field 'content'")
        content = msg["content"]
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a str, got {type(content).__name__}")
        # None -> "" (clients send null fields); the reference would render the text "None".
        metadata = msg.get("metadata")
        if metadata is None:
            metadata = ""
        elif not isinstance(metadata, str):
            raise ValueError(f"messages[{i}].metadata must be a str, got {type(metadata).__name__}")
        tools = msg.get("tools")
        if tools:  # truthiness as in the remote Python (`item.get("tools")`): None / [] add nothing
            turns.append(("system", "", _tools_preamble(tools, i)))
        if content:
            turns.append((role, metadata, content))
    return turns


def _tools_preamble(tools: Any, i: int) -> str:
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ValueError(f"messages[{i}].tools must be a list, got {type(tools).__name__}")
    parts = [_TOOLS_PREAMBLE]
    for j, tool in enumerate(tools):
        where = f"messages[{i}].tools[{j}]"
        if not isinstance(tool, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(tool).__name__}")
        kind = tool.get("type")
        if kind == "function":
            fn = tool.get("function")
            if not isinstance(fn, Mapping):
                raise ValueError(f"{where}.function must be a dict, got {type(fn).__name__}")
            name = fn.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}.function.name must be a non-empty str")
            try:
                # Same serialization as the model's templates (json.dumps, non-ASCII kept, indent 4, key order kept).
                spec = json.dumps(dict(fn), ensure_ascii=False, indent=4)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}.function is not JSON-serializable: {exc}") from None
            parts.append(f"\n\n## {name}\n\n{spec}{_FUNCTION_TOOL_SUFFIX}")
        elif kind in _BUILTIN_TOOL_TEXT:
            parts.append(_BUILTIN_TOOL_TEXT[kind])  # type: ignore[index]
        else:
            # The reference templates silently drop unknown tool types; a dropped tool is a silent prompt bug.
            raise ValueError(
                f"{where}.type: unknown tool type {kind!r}; "
                "expected 'function', 'python', 'simple_browser' or 'cogview'"
            )
    return "".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# Streaming detokenization
# --------------------------------------------------------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turn a stream of generated ids into text deltas without ever emitting half a UTF-8 character.

    ``step(new_ids)`` returns the newly completed text; trailing bytes that are a valid but incomplete UTF-8 sequence
    are held back until the next step (a CJK character or emoji is often split over 2-3 byte tokens). Invalid bytes
    become U+FFFD exactly as in :meth:`GLM4Tokenizer.decode`, so after :meth:`finish` ``text`` equals
    ``tokenizer.decode(token_ids, skip_special_tokens)``.

    ``prompt_ids`` are kept for the caller's bookkeeping only: byte-level BPE decoding needs no left context.
    """

    def __init__(
        self,
        tokenizer: GLM4Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self.prompt_ids: tuple[int, ...] = tuple(prompt_ids or ())
        self.skip_special_tokens = skip_special_tokens
        # The stdlib incremental decoder implements exactly "hold back an incomplete tail, replace invalid bytes".
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._token_ids: list[int] = []
        self._parts: list[str] = []
        self._finished = False

    def step(self, new_ids: Iterable[int] | int) -> str:
        """Feed the ids generated since the last call; return the new text (may be "")."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.step() after finish()")
        ids = list(new_ids) if isinstance(new_ids, Iterable) else [new_ids]
        self._token_ids.extend(ids)
        delta = self._decoder.decode(self._tok.decode_bytes(ids, self.skip_special_tokens))
        if delta:
            self._parts.append(delta)
        return delta

    def finish(self) -> str:
        """End of stream: flush held-back bytes (an incomplete tail becomes U+FFFD). Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        delta = self._decoder.decode(b"", final=True)
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far (held-back bytes excluded)."""
        # Join lazily and cache: callers read `text` every step to look for stop strings.
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def token_ids(self) -> list[int]:
        """All ids fed so far (a copy)."""
        return list(self._token_ids)

    @property
    def num_pending_bytes(self) -> int:
        """Bytes held back as an incomplete UTF-8 sequence."""
        return len(self._decoder.getstate()[0])


# --------------------------------------------------------------------------------------------------------------------
# Loading and the byte-level fallback
# --------------------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike[str]) -> GLM4Tokenizer:
    """Load a GLM-4 tokenizer from a directory containing ``tokenizer.model`` or from the file itself.

    Parsed files are cached per process (keyed on path, mtime and size), so repeated loads are cheap.
    """
    return GLM4Tokenizer(path)


def write_byte_level_tokenizer(path: str | os.PathLike[str]) -> Path:
    """Write a 256-rank byte-level ``tokenizer.model`` (rank i = ``bytes([i])``, no merges); return the file path.

    ``path`` is an existing directory, a new directory (created), or a file path ending in ``.model``. Lets demos and
    tests run with nothing downloaded; specials then get ids 256..269.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOKENIZER_FILE_NAME
    elif p.suffix == ".model" or p.is_file():
        p.parent.mkdir(parents=True, exist_ok=True)
    else:
        p.mkdir(parents=True)
        p = p / TOKENIZER_FILE_NAME
    body = "".join(f"{binascii.b2a_base64(bytes([i]), newline=False).decode('ascii')} {i}\n" for i in range(256))
    # Write-then-rename so a concurrent reader (another test worker, a Ray actor) never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii", newline="\n") as f:
            f.write(body)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p
