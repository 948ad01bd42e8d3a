"""A zero-weight LoRA adapter for any causal LM: its outputs are exactly the base model's.

Why: vLLM 0.32's CPU LoRA ops mark "no adapter" with slot index -1 and use it as
a Python index, so a base-model request that shares a batch with LoRA requests
runs with the last adapter slot's weights and gives wrong tokens (upstream
vllm-project/vllm#48421, #49656). Sending base-model requests through an
adapter whose B matrices are zero gives them a real slot and the base model's
exact outputs. Managed backends do this by default (``launch.zero_base_adapter``).

Only the adapter's shapes matter, so the model is built from its config with
random weights (no checkpoint is read); the result is cached in ``out_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MARKER = "coe-zero.json"


def build_zero_adapter(model_dir: Path, out_dir: Path, rank: int = 8) -> Path:
    """Write (or reuse) a zero LoRA for the model in ``model_dir``; returns ``out_dir``."""
    model_dir = Path(model_dir).absolute()
    out_dir = Path(out_dir).absolute()
    config_file = model_dir / "config.json"
    params = {"model": str(model_dir), "rank": rank,
              "config_mtime_ns": config_file.stat().st_mtime_ns if config_file.exists() else None}
    marker = out_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()) == params:
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("cpu"):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    lora = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=True, task_type="CAUSAL_LM")
    peft_model: Any = get_peft_model(model, lora)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            assert not param.detach().any(), f"{name} is not zero"
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    # vLLM resolves the base by its own --model; point the adapter at that folder, not a hub name.
    cfg_path = out_dir / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2))
    marker.write_text(json.dumps(params))
    return out_dir
