"""Turn parsed rows into token ids, and token ids into padded batches. Torch-free.

The workstation (a transformers tokenizer) and the device (edgeft.device.tokenizer)
share this code, so a row becomes the same tokens and labels on both sides.

Causal LM: loss only on answer tokens where there is an answer. Answer spans are
found in characters on the rendered chat template and mapped to tokens through
the tokenizer's offsets, so template quirks never shift the mask by a token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (causal-lm) or one class id (classify)


def encode_classify(tokenizer, texts: list[str], labels: list[str], names: list[str], max_len: int) -> list[Encoded]:
    index = {n: i for i, n in enumerate(names)}
    ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
    return [Encoded(x, index[y]) for x, y in zip(ids, labels)]


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans of every assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the data has chat 'messages' but the model's tokenizer has no chat template",
            "use {'prompt','completion'} or {'text'} rows, or add a chat_template to tokenizer_config.json",
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(through) or not through.startswith(before):
            raise DataError("the chat template does not render turns as prefixes of the conversation", "use prompt/completion rows for this model")
        spans.append((len(before), len(through)))
    return full, spans


def encode_causal(tokenizer, rows: list[dict], max_len: int) -> tuple[list[Encoded], int]:
    """Returns the encoded rows and how many were truncated."""
    eos = tokenizer.eos_token or ""
    out, truncated = [], 0
    for row in rows:
        if "messages" in row:
            text, spans = render_chat(tokenizer, row["messages"])
        elif "prompt" in row:
            if getattr(tokenizer, "chat_template", None):
                text, spans = render_chat(tokenizer, [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}])
            else:
                text = row["prompt"] + row["completion"] + eos
                spans = [(len(row["prompt"]), len(text))]
        else:
            text = row["text"] + eos
            spans = [(0, len(text))]
        enc = tokenizer(text, add_special_tokens=not ("messages" in row or "prompt" in row and tokenizer.chat_template), return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [t if any(a <= s < b for a, b in spans) and e > s else IGNORE for t, (s, e) in zip(ids, offsets)]
        if len(ids) > max_len:
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        out.append(Encoded(ids, labels))
    return out, truncated


def require_answers(encoded: list[Encoded], where: str, max_len: int, hint: str, warn) -> None:
    """A causal row cut before its first answer token teaches nothing and scores a loss of 0: a
    set with no answer left at all is an error (training would silently do nothing; Qwen's chat
    template and a GSM8K question fill 64 tokens), some such rows a warning."""
    empty = sum(1 for e in encoded if all(t == IGNORE for t in e.labels))
    if encoded and empty == len(encoded):
        raise DataError(f"{where}: no row keeps an answer token within {max_len} tokens (the prompt, as the model's template "
                        "renders it, fills them)", hint)
    if empty:
        warn(f"warning: {where}: {empty} of {len(encoded)} rows keep no answer token within {max_len} tokens and teach nothing")


def batch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Deterministic per (seed, epoch), so a resumed run sees the same batches."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def batches_per_epoch(n_rows: int, batch_size: int, world: int = 1) -> int:
    """Micro-batches each process gets per epoch (the rule: edgeft.schedule's docstring)."""
    return -(-n_rows // batch_size) // world


def micro_batch_ids(n_rows: int, batch_size: int, seed: int, index: int, world: int = 1, rank: int = 0) -> list[int]:
    """The rows of global micro-batch `index` for process `rank` of `world`: the one rule both
    trainers use, so resume needs only the step and the device batches as the workstation does."""
    per_epoch = batches_per_epoch(n_rows, batch_size, world)
    if per_epoch < 1:
        raise DataError(f"{n_rows} training rows give no micro-batch of {batch_size} to each of {world} processes",
                        "lower the batch size or add data")
    epoch, pos = divmod(index, per_epoch)
    return batch_order(n_rows, batch_size, seed, epoch)[pos * world + rank]


def collate(items: list[Encoded], pad_id: int, pad_to: int | None = None) -> dict:
    """int64 numpy arrays; the workstation wraps them with torch.as_tensor (no copy)."""
    import numpy as np

    if items and hasattr(items[0], "pixels"):  # edgeft.images.ImageItem: the encoder that made it batches it
        from .images import ImageEncoder

        return ImageEncoder.collate_items(items)
    width = pad_to or max(len(e.input_ids) for e in items)
    ids = np.full((len(items), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), width), dtype=np.int64)
    per_token = isinstance(items[0].labels, list)
    labels = np.full((len(items), width), IGNORE, dtype=np.int64) if per_token else np.array([e.labels for e in items], dtype=np.int64)
    for i, e in enumerate(items):
        n = min(len(e.input_ids), width)
        ids[i, :n] = e.input_ids[:n]
        mask[i, :n] = 1
        if per_token:
            labels[i, :n] = e.labels[:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
