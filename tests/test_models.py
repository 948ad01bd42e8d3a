"""The offline model builders: the tiny test model for real, Gemma's chat template alone.

No vLLM here: these check what the builders write, in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from coe.models import GEMMA_CHAT_TEMPLATE, TINY_CHAT_TEMPLATE, build_tiny
from coe.models.gemma import GEMMA_DEFAULT_SYSTEM, GEMMA_EXAMPLES
from coe.models.tiny import MARKER

pytest.importorskip("transformers")
pytest.importorskip("peft")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models") / "tiny"


def test_build_tiny(tiny: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    model = build_tiny(tiny, adapters=2, seed=0)
    assert model.path == tiny.absolute()
    assert model.served_name == "tiny"
    assert list(model.adapters) == ["tiny-lora-0", "tiny-lora-1"]

    config = AutoConfig.from_pretrained(str(tiny))
    assert config.hidden_size == 256 and config.num_hidden_layers == 4
    assert config.max_position_embeddings >= 2048

    tok = AutoTokenizer.from_pretrained(str(tiny))
    assert config.vocab_size == len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nBe brief.</s>\n<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
    )
    no_prompt = str(tok.apply_chat_template(CONVERSATION, tokenize=False))
    assert not no_prompt.endswith("<|assistant|>\n")
    # The template carries <s>; plain text gets it from the tokenizer, exactly once each way.
    assert tok(text, add_special_tokens=False).input_ids.count(tok.bos_token_id) == 1
    assert tok("Hello world").input_ids[0] == tok.bos_token_id
    assert tok.decode(tok("Hello world", add_special_tokens=False).input_ids) == "Hello world"

    weights = {name: _digest(path / "adapter_model.safetensors") for name, path in model.adapters.items()}
    assert len(set(weights.values())) == 2, "adapters must differ from each other"
    for path in model.adapters.values():
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_tiny_adapters_change_outputs(tiny: Path) -> None:
    """Greedy next tokens differ between base and each adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_tiny(tiny, adapters=2, seed=0)
    tok = AutoTokenizer.from_pretrained(str(tiny))
    ids = torch.tensor([tok("What is the capital of France?").input_ids])

    def logits(adapter: Path | None) -> torch.Tensor:
        net: Any = AutoModelForCausalLM.from_pretrained(str(tiny))
        if adapter is not None:
            net = PeftModel.from_pretrained(net, str(adapter))
        with torch.no_grad():
            out: torch.Tensor = net(ids).logits[0]
        return out

    base = logits(None)
    outs = [logits(path) for path in model.adapters.values()]
    assert not torch.equal(base.argmax(-1), outs[0].argmax(-1))
    assert not torch.equal(base.argmax(-1), outs[1].argmax(-1))
    assert not torch.equal(outs[0].argmax(-1), outs[1].argmax(-1))
    # Special tokens can never win greedy decoding (their logit rows are zero).
    assert int(base.argmax(-1).min()) > max(tok.all_special_ids)


def test_build_tiny_is_idempotent(tiny: Path) -> None:
    build_tiny(tiny, adapters=2, seed=0)
    marker = tiny / MARKER
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()}
    again = build_tiny(tiny, adapters=2, seed=0)
    assert again.path == tiny.absolute()
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()} == before
    assert json.loads(marker.read_text())["params"]["adapters"] == 2


def test_build_tiny_rebuilds_on_other_params(tmp_path: Path) -> None:
    out = tmp_path / "t"
    build_tiny(out, adapters=1, seed=0)
    first = _digest(out / "model.safetensors")
    model = build_tiny(out, adapters=0, seed=1)
    assert model.adapters == {}
    assert not (out / "adapters" / "tiny-lora-0").exists()
    assert _digest(out / "model.safetensors") != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_build_tiny_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tiny_template_constant_matches_saved(tiny: Path) -> None:
    build_tiny(tiny, adapters=2, seed=0)
    assert (tiny / "chat_template.jinja").read_text() == TINY_CHAT_TEMPLATE


def _render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>"
    )


def test_gemma_chat_template() -> None:
    text = _render(GEMMA_CHAT_TEMPLATE, CONVERSATION, add_generation_prompt=True)
    assert text == (
        "<bos>Be brief.\n\n" + GEMMA_EXAMPLES + "Question: What is the capital of France?\nAnswer:"
    )
    assert "```python\ndef add(a, b):\n    return a + b\n```" in GEMMA_EXAMPLES


def test_gemma_chat_template_multi_turn_default_system() -> None:
    messages = [
        {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    text = _render(GEMMA_CHAT_TEMPLATE, messages, add_generation_prompt=True)
    assert text.startswith("<bos>" + GEMMA_DEFAULT_SYSTEM + "\n\n" + GEMMA_EXAMPLES)
    assert text.endswith("\n\nQuestion: What is 2+2?\nAnswer: 4\n\nQuestion: And 3+3?\nAnswer:")
    assert not _render(GEMMA_CHAT_TEMPLATE, messages, add_generation_prompt=False).endswith("Answer:")


def test_gemma_chat_template_joins_system_messages_and_tolerates_none() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You teach science."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": None},
    ]
    text = _render(GEMMA_CHAT_TEMPLATE, messages, add_generation_prompt=False)
    assert text.startswith("<bos>You teach science.\nBe brief.\n\nQuestion: Write a Python")
    assert text.endswith("Question: Why is the sky blue?\nAnswer: \n\n")
