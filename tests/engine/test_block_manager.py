"""BlockManager: reference counts, chained block hashes, prefix hits, LRU eviction. No torch, no model."""

import ast
import importlib
import os
import subprocess
import sys

import pytest

from glm4.engine.block_manager import BlockManager, compute_block_hashes, hash_block_tokens
from glm4.engine.sampling_params import SamplingParams
from glm4.engine.sequence import Sequence

BS = 4


def make_seq(tokens, rid="r"):
    return Sequence(rid, tokens, SamplingParams())


def admit(bm, seq):
    """Allocate the whole uncached remainder and pretend the model computed it (registers full blocks)."""
    cached = bm.get_num_cached_prefix_tokens(seq)
    assert bm.can_allocate(seq, len(seq) - cached)
    bm.allocate(seq, len(seq) - cached)
    assert seq.num_cached_tokens == cached
    seq.num_computed_tokens = len(seq)
    bm.cache_full_blocks(seq)
    return seq


def check_ref_counts(bm, seqs):
    """Guards against leaked or double-freed blocks: ref counts equal the number of tables holding each block."""
    expected = [0] * bm.num_blocks
    for s in seqs:
        for b in s.block_table:
            expected[b] += 1
    assert [b.ref_count for b in bm.blocks] == expected
    assert bm.num_free_blocks == expected.count(0)


def test_hash_is_chained_and_content_based():
    a = hash_block_tokens(0, [1, 2, 3, 4])
    assert a == hash_block_tokens(0, [1, 2, 3, 4])
    assert a != hash_block_tokens(0, [1, 2, 3, 5])
    # Same block content after a different parent is a different prefix -> different hash.
    h1 = compute_block_hashes([9, 9, 9, 9, 1, 2, 3, 4], BS)
    h2 = compute_block_hashes([8, 9, 9, 9, 1, 2, 3, 4], BS)
    assert h1[1] != h2[1] and h1[1] == hash_block_tokens(h1[0], [1, 2, 3, 4])
    # Only full blocks are hashed; extending an existing list only appends.
    hashes = compute_block_hashes([1, 2, 3, 4, 5], BS)
    assert len(hashes) == 1
    assert compute_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, hashes) is hashes and len(hashes) == 2


def test_hash_is_stable_across_processes():
    """Python's hash() is salted per process; prefix-cache keys must not be (TP ranks, restarts)."""
    code = ("from glm4.engine.block_manager import compute_block_hashes as c;"
            "print(c(list(range(12)), 4))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.stdout.strip() == str(compute_block_hashes(list(range(12)), 4))


def test_allocate_free_ref_counts_and_prefix_hits():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = admit(bm, make_seq(list(range(10))))  # 2 full blocks + 2 tokens
    assert len(a.block_table) == 3 and a.num_cached_tokens == 0
    b = admit(bm, make_seq(list(range(8)) + [77, 78, 79]))  # shares the 2 full blocks
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    check_ref_counts(bm, [a, b])
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.num_hit_tokens == 8 and bm.num_query_tokens == 21 and bm.hit_rate == pytest.approx(8 / 21)
    bm.free(a)
    check_ref_counts(bm, [b])
    bm.free(b)
    check_ref_counts(bm, [])
    assert bm.num_free_blocks == 10
    # Freed blocks keep their hash: a third request still hits them.
    c = admit(bm, make_seq(list(range(8)) + [5]))
    assert c.num_cached_tokens == 8


def test_last_token_is_never_counted_as_cached():
    """At least one token must run to produce logits, so an exact repeat hits all blocks but the last."""
    bm = BlockManager(num_blocks=10, block_size=BS)
    admit(bm, make_seq(list(range(8))))
    assert bm.get_num_cached_prefix_tokens(list(range(8))) == 4
    assert bm.get_num_cached_prefix_tokens(list(range(9))) == 8
    assert bm.get_num_cached_prefix_tokens(list(range(3))) == 0
    assert bm.get_num_cached_prefix_tokens([1] + list(range(1, 9))) == 0  # first block differs -> chain breaks


def test_hash_registered_only_when_block_is_full_and_computed():
    bm = BlockManager(num_blocks=10, block_size=BS)
    s = make_seq([1, 2, 3])
    bm.allocate(s, 3)
    assert len(s.block_table) == 1
    s.num_computed_tokens = 3
    bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 0
    for tok, cached_before, cached_after in ((4, 0, 1), (5, 1, 1)):
        s.append_token(tok)  # decode: the sampled token is appended, then one slot is added for it
        assert bm.can_append(s, 1)
        bm.append_slot(s, 1)
        assert bm.num_cached_blocks == cached_before, "a block must not be hashed before its K/V is computed"
        s.num_computed_tokens += 1
        bm.cache_full_blocks(s)
        assert bm.num_cached_blocks == cached_after
    assert len(s.block_table) == 2  # 5 tokens -> grew at the block boundary
    assert bm.get_num_cached_prefix_tokens([1, 2, 3, 4, 9]) == 4


def test_can_allocate_counts_revived_cached_blocks():
    """Reusing an unreferenced cached block takes it out of the free pool as well."""
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = admit(bm, make_seq(list(range(8)) + [1]))  # uses all 3 blocks, 2 of them cached
    bm.free(a)
    b = make_seq(list(range(8)) + [2, 3, 4, 5, 6])  # hits 2 blocks, needs 2 more for 5 tokens -> 4 > 3
    assert bm.get_num_cached_prefix_tokens(b) == 8
    assert not bm.can_allocate(b, 5)
    assert bm.can_allocate(b, 4)


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a = admit(bm, make_seq(list(range(0, 8)) + [0]))      # blocks: a0 a1 (cached) + a2 partial
    b = admit(bm, make_seq(list(range(100, 108)) + [0]))  # b0 b1 (cached) + b2 partial
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    order = [bm._take_free_block() for _ in range(6)]
    # Blocks holding nothing go first, then a's (freed earlier) tail-first, then b's.
    assert set(order[:2]) == {a_blocks[2], b_blocks[2]}
    assert order[2:] == [a_blocks[1], a_blocks[0], b_blocks[1], b_blocks[0]]
    assert bm.num_evictions == 4 and bm.num_cached_blocks == 0


def test_eviction_keeps_recently_used_prefix():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = admit(bm, make_seq(list(range(0, 4)) + [0]))
    b = admit(bm, make_seq(list(range(50, 54)) + [0]))
    bm.free(a)
    bm.free(b)
    again = admit(bm, make_seq(list(range(0, 4)) + [1]))  # touches a's block again
    bm.free(again)
    admit(bm, make_seq(list(range(200, 210))))  # 3 blocks: the 2 empty ones + the LRU cached one (b's)
    assert bm.get_num_cached_prefix_tokens(list(range(0, 4)) + [1]) == 4
    assert bm.get_num_cached_prefix_tokens(list(range(50, 54)) + [1]) == 0


def test_duplicate_content_stays_private_and_frees_cleanly():
    """Two sequences computing the same prefix concurrently: one block is cached, the other is recycled."""
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    for s in (a, b):
        bm.allocate(s, 5)  # neither hits: nothing is registered yet
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 1
    bm.free(b)
    bm.free(a)
    check_ref_counts(bm, [])
    assert bm.get_num_cached_prefix_tokens(list(range(6))) == 4


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    admit(bm, make_seq(list(range(9))))
    assert bm.get_num_cached_prefix_tokens(list(range(9))) == 0 and bm.num_cached_blocks == 0
    assert admit(bm, make_seq(list(range(9)))).num_cached_tokens == 0


def test_free_resets_sequence_kv_state():
    bm = BlockManager(num_blocks=4, block_size=BS)
    s = admit(bm, make_seq(list(range(6))))
    bm.free(s)
    assert (s.block_table, s.num_computed_tokens, s.num_cached_tokens, s.num_hashed_blocks) == ([], 0, 0, 0)


def _runtime_imports(tree):
    """Modules a file imports when it runs (imports under `if TYPE_CHECKING:` are for type hints only)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_scheduling_modules_do_not_import_torch():
    """block_manager / scheduler (and the modules they import) stay torch-free, so they test in milliseconds."""
    for name in ("glm4.engine.block_manager", "glm4.engine.scheduler", "glm4.engine.sequence",
                 "glm4.engine.sampling_params"):
        tree = ast.parse(open(importlib.import_module(name).__file__).read())
        mods = list(_runtime_imports(tree))
        assert not [m for m in mods if m.split(".")[0] == "torch"], (name, mods)
