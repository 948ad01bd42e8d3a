"""Fine-tune a LoRA adapter for a local base model on the CPU (``coe models train-adapter``).

Why it is shaped this way:

- **Logits only where there is a loss.** Gemma 3's LM head is 262,144 × 640: applied to every
  position it dominates a step (about 120 s for 8×48 tokens on these 2 cores). The body runs on
  every token, the head only on the few supervised answer positions, which makes a step 20× cheaper
  and gives exactly the same loss.
- **Trained on what coe sends.** Each example is rendered with the base model's own chat template
  (the one vLLM applies), tokenized without extra special tokens as vLLM does, and the supervised
  part is the answer followed by the stop sequence the expert is served with, so that the adapter
  learns to stop where coe cuts.
- **Deterministic for a seed.** Seeded LoRA init and example order, no dropout, a fixed thread
  count; the manifest records every input (base and data hashes, the recipe) and the loss curve.
- **Nothing half-written.** The adapter is built in a staging folder and renamed into place only
  when complete; bad input fails before any training with an error that names the line.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coe.errors import InvalidRequest
from coe.models.tiny import check_replaceable, publish, staging

MANIFEST = "coe-adapter.json"
"""Written into every trained adapter folder: what it was trained from, how, and how it went."""

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", MANIFEST]

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class TrainError(InvalidRequest):
    """Bad training input (data, base model or recipe); nothing was written."""

    code = "invalid_training_input"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the weights, besides the base model and the data."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 80
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 5
    seed: int = 0
    max_tokens: int = 192
    stop: str = "\n\nQuestion:"
    threads: int = 2

    def check(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append("rank must be at least 1")
        if self.steps < 1:
            problems.append("steps must be at least 1")
        if self.batch_size < 1:
            problems.append("batch size must be at least 1")
        if not (0 < self.learning_rate < 1):
            problems.append("learning rate must be in (0, 1)")
        if self.max_tokens < 8:
            problems.append("max tokens must be at least 8")
        if not self.targets:
            problems.append("at least one target module is needed")
        if problems:
            raise TrainError("; ".join(problems))


@dataclass
class Example:
    """One tokenized chat example: the supervised positions are ``prompt_len`` onwards."""

    ids: list[int]
    prompt_len: int
    line: int


@dataclass
class TrainResult:
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_examples(path: Path) -> list[list[dict[str, str]]]:
    """Chat examples from JSONL: ``{"messages": [...]}`` ending in the assistant's answer."""
    if not path.is_file():
        raise TrainError(f"training data {path} does not exist")
    chats: list[list[dict[str, str]]] = []
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as exc:
                raise TrainError(f"{path}:{number}: not JSON ({exc})") from exc
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                raise TrainError(f"{path}:{number}: expected {{\"messages\": [...]}}")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in {"system", "user", "assistant"} \
                        or not isinstance(m.get("content"), str):
                    raise TrainError(f"{path}:{number}: each message needs a role (system, user, assistant) "
                                     "and string content")
            if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
                raise TrainError(f"{path}:{number}: the last message must be the assistant's answer")
            chats.append(messages)
    if not chats:
        raise TrainError(f"training data {path} holds no examples")
    return chats


def encode(tokenizer: Any, chats: Sequence[list[dict[str, str]]], recipe: Recipe) -> list[Example]:
    """Render each chat as vLLM would and mark the answer (plus the stop sequence) as supervised."""
    examples = []
    for line, messages in enumerate(chats, 1):
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise TrainError("the chat template does not render the answer after the generation prompt; "
                             "train-adapter needs a template whose prompt is a prefix of the full chat")
        target = full[len(prompt):].rstrip() + recipe.stop
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
        if ids[:len(prompt_ids)] != prompt_ids:  # a merge across the boundary: tokenize the parts apart
            ids = prompt_ids + tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(ids) > recipe.max_tokens:
            raise TrainError(f"example {line} is {len(ids)} tokens long, over the limit of {recipe.max_tokens} "
                             "(raise --max-tokens or shorten it)")
        examples.append(Example(ids=ids, prompt_len=len(prompt_ids), line=line))
    return examples


def _check_base(base: Path, targets: Sequence[str], model: Any) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise TrainError(f"the base model in {base} has no module named {', '.join(missing)}: the adapter does "
                         f"not fit it (its linear layers include {', '.join(sorted(n for n in names if 'proj' in n))})")


def _load_base(base: Path, recipe: Recipe) -> tuple[Any, Any]:
    if not (base / "config.json").is_file():
        raise TrainError(f"{base} is not a model folder (no config.json); build one with `coe models build-gemma`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if not getattr(tokenizer, "chat_template", None):
        raise TrainError(f"the tokenizer in {base} has no chat template; coe trains on chats as vLLM renders them")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.requires_grad_(False)
    _check_base(base, recipe.targets, model)
    return tokenizer, model


def _batch_loss(model: Any, body: Any, head: Any, softcap: float | None, batch: list[Example]) -> Any:
    """Cross-entropy over the supervised tokens, with the LM head applied only there."""
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
        for t in range(e.prompt_len, len(e.ids)):
            rows.append(i)
            cols.append(t - 1)  # the hidden state at t-1 predicts token t
            labels.append(e.ids[t])
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = head(hidden[torch.tensor(rows), torch.tensor(cols)])
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(labels))


def _lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = (step - recipe.warmup_steps) / span
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_adapter(base: Path, data: Path, out_dir: Path, recipe: Recipe | None = None, *,
                  name: str | None = None, progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train a LoRA adapter for ``base`` on ``data`` into ``out_dir`` (replaced atomically)."""
    recipe = recipe or Recipe()
    recipe.check()
    base, data, out_dir = Path(base).absolute(), Path(data).absolute(), Path(out_dir).absolute()
    chats = read_examples(data)
    check_replaceable(out_dir)
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(recipe.threads)
    tokenizer, model = _load_base(base, recipe)
    examples = encode(tokenizer, chats, recipe)
    started = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                          target_modules=list(recipe.targets), init_lora_weights=True, task_type="CAUSAL_LM")
        peft_model: Any = get_peft_model(model, lora)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.0)
        body = peft_model.base_model.model.model
        head = peft_model.base_model.model.lm_head
        softcap = getattr(model.config, "final_logit_softcapping", None)
        order = random.Random(recipe.seed)
        queue: list[Example] = []
        losses: list[float] = []
        step_times: list[float] = []
        peft_model.train()
        for step in range(recipe.steps):
            batch: list[Example] = []
            while len(batch) < recipe.batch_size:
                if not queue:
                    queue = list(examples)
                    order.shuffle(queue)
                batch.append(queue.pop())
            t0 = time.monotonic()
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe)
            loss = _batch_loss(peft_model, body, head, softcap, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            step_times.append(time.monotonic() - t0)
            losses.append(round(float(loss.detach()), 5))
            if progress is not None:
                progress(step, losses[-1])
    wall = time.monotonic() - started
    manifest = {
        "name": name or out_dir.name,
        "base": {"model": _model_id(base), "sha256": _base_hash(base)},
        "data": {"path": data.name, "sha256": file_sha256(data), "examples": len(examples),
                 "tokens_max": max(len(e.ids) for e in examples)},
        "recipe": {**asdict(recipe), "targets": list(recipe.targets)},
        "loss": losses,
        "wall_time_s": round(wall, 1),
        "step_time_s": {"mean": round(sum(step_times) / len(step_times), 3), "max": round(max(step_times), 3)},
        "trainable_parameters": sum(p.numel() for p in trainable),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }
    with staging(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp))
        cfg_path = tmp / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text())
        adapter_cfg["base_model_name_or_path"] = manifest["base"]["model"]  # a name, not this machine's path
        cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card: the manifest says it all
        manifest["adapter_sha256"] = file_sha256(tmp / "adapter_model.safetensors")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private; a server running as another user must read it
        for f in tmp.iterdir():
            f.chmod(0o644)
        publish(tmp, out_dir, {"trainer": "coe.models.train", "adapter_sha256": manifest["adapter_sha256"]},
                ADAPTER_FILES)
    return TrainResult(path=out_dir, manifest=manifest)


def _model_id(base: Path) -> str:
    return base.name


def _base_hash(base: Path) -> str:
    """Hash of the weights file(s): what the adapter was trained against."""
    files = sorted(base.glob("*.safetensors"))
    if not files:
        return ""
    digest = hashlib.sha256()
    for f in files:
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()
