"""A tiny random-weight Llama with LoRA adapters, built offline in seconds.

Tests need a real model that vLLM serves (chat template, LoRA, determinism)
without a model hub or a large download. Its outputs are meaningless text, but
they are deterministic under greedy decoding, and each adapter changes them.

Also holds the build-marker helpers the Gemma builder shares: a build happens
in a staging folder next to ``out_dir`` and is renamed into place only when
complete, so a crash never leaves a half-built folder that looks finished.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "coe-build.json"
"""Written last into a finished build; its parameters decide whether to rebuild."""

TINY_BUILD_VERSION = 4
"""Bump when the tiny model's recipe changes, so old builds are rebuilt."""

ADAPTER_PREFIX = "tiny-lora-"
HIDDEN_SIZE = 256
NUM_LAYERS = 4
NUM_HEADS = 4
MAX_POSITIONS = 4096
VOCAB_SIZE = 2048
LORA_RANK = 8

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Zephyr-like turns; each role marker is one special token of the tiny vocabulary."""

# Fixed English text so the vocabulary has ordinary words even if stdlib docstrings change.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Composition of experts routes each request to the model that knows the subject best. A gateway in
front of several language models answers questions about history, science, mathematics, medicine,
law, and computer programming. The router reads the question, picks an expert, and forwards the
request; the expert writes an answer, and the gateway returns it to the user.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two
is four. Write a function that returns the sum of a list of numbers. Explain why the sky is blue.
Sunlight is scattered by the molecules of the air, and blue light is scattered more than red light.
The cell is the basic unit of life. Water boils at one hundred degrees Celsius at sea level. The
Earth goes around the Sun once a year, and the Moon goes around the Earth about once a month.
Hello! How are you today? I am fine, thank you. Can you help me with my homework? Of course, let us
start with the first question. Please summarise the following text in one sentence. Translate this
sentence into French. The weather is nice today, so we will walk in the park after lunch.
A system prompt tells the assistant how to behave. The user asks, and the assistant answers briefly
and politely. If the question is unclear, the assistant asks for more details.
"""

# Stdlib modules whose docstrings add varied English and code words to the corpus.
_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gzip", "hashlib", "heapq", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "math", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "shutil",
    "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "zipfile",
)


@dataclass(frozen=True)
class TinyModel:
    """Where a tiny build lives and the names vLLM should serve it under."""

    path: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    served_name: str = ""


# --- build markers, shared with coe.models.gemma -------------------------------------------


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    """The marker of a finished build, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_matches(out_dir: Path, params: dict[str, Any], required: list[str]) -> bool:
    """True when ``out_dir`` holds a finished build with exactly ``params`` and its files."""
    marker = read_marker(out_dir)
    if marker is None or marker.get("params") != params:
        return False
    return all((out_dir / rel).exists() for rel in required)


def check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a folder that coe did not build (a typo must not delete data)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and read_marker(out_dir) is None)):
        raise FileExistsError(f"{out_dir} exists and is not a coe model build (no {MARKER}); remove it first")


@contextlib.contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A scratch folder beside ``out_dir`` (same file system, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out_dir: Path, params: dict[str, Any], required: list[str]) -> None:
    """Write the marker into ``tmp`` and swap it in for ``out_dir``; a concurrent twin build wins."""
    (tmp / MARKER).write_text(json.dumps({"params": params}, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        if marker_matches(out_dir, params, required):
            return  # another process finished the same build first; ``staging`` drops ours
        check_replaceable(out_dir)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out_dir)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch without disturbing the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- the tiny model -------------------------------------------------------------------------


def corpus_text() -> str:
    """Deterministic training text: the fixed corpus plus sorted stdlib docstrings."""
    parts = [_CORPUS]
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python; the rest still suffices
            continue
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr))
            if doc and getattr(getattr(module, attr), "__module__", None) == name:
                parts.append(doc)
    return "\n\n".join(parts)


def _train_tokenizer(out_dir: Path) -> int:
    """Train a byte-level BPE on the local corpus, save it for transformers; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    transformers: Any = importlib.import_module("transformers")  # untyped calls, kept as Any

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().split("\n\n"), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain completions get <s> like any Llama; chat prompts carry it in the template and
    # vLLM renders them without adding special tokens again.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return int(tok.get_vocab_size())


def _unprintable_ids(tok: Any) -> list[int]:
    """Ids of special tokens and of tokens that are not printable text by themselves."""
    special = set(tok.all_special_ids)
    ids = []
    for i in range(len(tok)):
        text = tok.decode([i])
        visible = text.replace("\n", "").replace("\t", "")
        if i in special or not text or "\ufffd" in text or not visible.isprintable():
            ids.append(i)
    return ids


def _build_into(tmp: Path, final_dir: Path, adapters: int, seed: int) -> None:
    """Write tokenizer, base weights and adapters into ``tmp``."""
    import torch
    from peft import LoraConfig, get_peft_model
    transformers: Any = importlib.import_module("transformers")  # untyped calls, kept as Any
    vocab = _train_tokenizer(tmp)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp))
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with _seeded(seed), torch.no_grad():
        base = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
        # A zero output row gives logit 0, below the max of ~2k random logits: greedy decoding
        # then never picks a special token (skipped, or EOS ending early) or a byte that is not
        # text on its own, so outputs are visible text of exactly max_tokens tokens.
        base.lm_head.weight[_unprintable_ids(tok)] = 0.0
    base.config._name_or_path = str(final_dir)
    base.save_pretrained(str(tmp))

    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        init_lora_weights=False,  # random A and B, so each adapter really changes the outputs
        task_type="CAUSAL_LM",
    )
    for i in range(adapters):
        with _seeded(seed * 7919 + 1000 + i):  # a different seed per adapter
            peft_model = get_peft_model(copy.deepcopy(base), lora)
        peft_model.save_pretrained(str(tmp / "adapters" / f"{ADAPTER_PREFIX}{i}"))


def _required(adapters: int) -> list[str]:
    files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for i in range(adapters):
        name = f"{ADAPTER_PREFIX}{i}"
        files += [f"adapters/{name}/adapter_config.json", f"adapters/{name}/adapter_model.safetensors"]
    return files


def build_tiny(out_dir: Path, adapters: int = 0, seed: int = 0) -> TinyModel:
    """Build (or reuse) the tiny Llama in ``out_dir`` with adapters ``tiny-lora-0..N-1``.

    The same ``seed`` gives the same weights and so the same greedy outputs; the
    tokenizer depends only on the corpus. A folder already holding a build with the
    same parameters is returned as is, so callers may call this on every start.
    """
    if adapters < 0:
        raise ValueError(f"adapters must be >= 0, not {adapters}")
    out_dir = Path(out_dir).absolute()
    params: dict[str, Any] = {
        "builder": "coe.models.tiny",
        "version": TINY_BUILD_VERSION,
        "adapters": adapters,
        "seed": seed,
    }
    required = _required(adapters)
    if not marker_matches(out_dir, params, required):
        check_replaceable(out_dir)
        with staging(out_dir) as tmp:
            _build_into(tmp, out_dir, adapters, seed)
            publish(tmp, out_dir, params, required)
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(adapters)]
    return TinyModel(
        path=out_dir,
        adapters={name: out_dir / "adapters" / name for name in names},
        served_name=out_dir.name,
    )
