#!/usr/bin/env python
"""A real model's architecture and tokenizer at a larger shape, with random weights.

No registry package carries a 1.5B model, yet export memory must be measured at that size
(issue #12): memory and time depend on the shapes, not on the values. The tokenizer, chat template
and every config field not overridden come from the real model, so the folder trains and exports
like any other.

    .venv/bin/python tools/make_scaled_model.py                       # Qwen2.5-1.5B's shape
    .venv/bin/python tools/make_scaled_model.py --from assets/models/Qwen2.5-Coder-0.5B-Instruct \\
        --out assets/models/qwen2.5-1.5b-random --preset qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # the published configs' shapes
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", default=str(ROOT / "assets/models/Qwen2.5-Coder-0.5B-Instruct"))
    ap.add_argument("--out", default=str(ROOT / "assets/models/qwen2.5-1.5b-random"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source, out = Path(args.source), Path(args.out)
    if out.is_dir():
        print(f"exists: {out}")
        return
    config = AutoConfig.from_pretrained(source)
    config.update(PRESETS[args.preset])
    if getattr(config, "layer_types", None):  # one entry per layer
        config.layer_types = [config.layer_types[0]] * config.num_hidden_layers
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        for f in source.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json", "generation_config.json"):
                shutil.copy2(f, tmp / f.name)
        tmp.rename(out)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, random weights, {args.preset} shape")


if __name__ == "__main__":
    main()
