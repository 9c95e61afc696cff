import subprocess
import sys

import pytest

from kvtransfer.block_hash import hash_blocks, root_hash


def test_only_full_blocks_are_hashed():
    assert len(hash_blocks(list(range(15)), 16, "m")) == 0
    assert len(hash_blocks(list(range(16)), 16, "m")) == 1
    assert len(hash_blocks(list(range(33)), 16, "m")) == 2


def test_chain_depends_on_prefix_model_and_salt():
    a = hash_blocks([1] * 16 + [2] * 16, 16, "m")
    b = hash_blocks([3] * 16 + [2] * 16, 16, "m")
    assert a[1] != b[1], "equal blocks after different prefixes must differ"
    assert hash_blocks([1] * 16, 16, "m") != hash_blocks([1] * 16, 16, "other-model")
    assert hash_blocks([1] * 16, 16, "m") != hash_blocks([1] * 16, 16, "m", cache_salt="tenant-a")


def test_continuing_a_chain_equals_hashing_at_once():
    tokens = list(range(100))
    whole = hash_blocks(tokens, 16, "m")
    first = hash_blocks(tokens[:32], 16, "m")
    rest = hash_blocks(tokens[32:], 16, "m", parent_hash=first[-1])
    assert first + rest == whole


def test_deterministic_across_processes():
    code = "from kvtransfer.block_hash import hash_blocks; print(hash_blocks(list(range(64)), 16, 'm'))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(outs) == 1
    assert outs.pop().strip() == str(hash_blocks(list(range(64)), 16, "m"))


def test_module_does_not_import_torch():
    code = "import sys, kvtransfer.block_hash; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_hashes_are_64_bit_and_root_is_stable():
    assert 0 <= root_hash("m") < 2**64
    assert root_hash("m") == root_hash("m", None) == root_hash("m", "")


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        hash_blocks([1, 2], 0, "m")
