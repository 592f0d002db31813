"""A bundle's tokenizer on the device: `tokenizers` plus jinja2 for chat templates.

It offers the part of a transformers tokenizer that edgeft.encode calls, so a data
row becomes the same tokens and loss mask here as on the workstation.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import EdgeftError


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer_json(folder: Path) -> str:
    """tokenizer.json, or the tokenizer.json.gz a bundle carries (export gzips it)."""
    import gzip

    plain = Path(folder) / "tokenizer.json"
    if plain.is_file():
        return plain.read_text(encoding="utf-8")
    return gzip.decompress((Path(folder) / "tokenizer.json.gz").read_bytes()).decode("utf-8")


class DeviceTokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self._tok = Tokenizer.from_str(read_tokenizer_json(folder))
        self._tok.no_padding()
        self._tok.no_truncation()
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text(encoding="utf-8")))
        self.specials = {k: _token(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token")}
        self.eos_token = self.specials["eos_token"]
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template
        pad = self.specials["pad_token"] or self.eos_token
        self.pad_token_id = (self._tok.token_to_id(pad) if pad else None) or 0
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __call__(self, text, truncation: bool = False, max_length: int | None = None, add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False) -> dict:
        if truncation and max_length:
            self._tok.enable_truncation(max_length)
        try:
            batch = isinstance(text, list)
            encs = self._tok.encode_batch(text, add_special_tokens=add_special_tokens) if batch else [self._tok.encode(text, add_special_tokens=add_special_tokens)]
        finally:
            self._tok.no_truncation()
        out = {"input_ids": [e.ids for e in encs]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encs]
        return out if batch else {k: v[0] for k, v in out.items()}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        """Rendered the way transformers renders it: sandboxed jinja2, trim/lstrip blocks, loop controls."""
        if self._template is None:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise EdgeftError(f"chat template error: {message}", "check the rows' roles and order")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.specials.items() if v is not None})


class PadOnly:
    """What is left of a tokenizer once every row is encoded: the id that pads a batch (encode.collate)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
