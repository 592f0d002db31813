"""New data on the device, tokenized as the workstation does, with long rows cut or refused."""

from __future__ import annotations

from ..encode import Encoded, encode_causal, encode_classify, require_answers
from ..errors import DataError

UNLIMITED = 1 << 30


def task_encoder(bundle, manifest):
    """What turns rows into model inputs on the device: the bundle's tokenizer, or for an image
    bundle its preprocessing (edgeft.images.ImageEncoder: numpy and Pillow)."""
    from pathlib import Path

    if manifest.task == "image-classify":
        from ..images import ImageEncoder

        return ImageEncoder.for_manifest(manifest)
    from .tokenizer import DeviceTokenizer

    return DeviceTokenizer(Path(bundle) / "tokenizer")


def encode_rows(rows: list[dict], task: str, tokenizer, labels: list[str], seq: int, refuse_long: bool = False,
                where: str = "data", warn=print) -> list[Encoded]:
    """Rows longer than `seq` tokens are cut (with one warning), or refused when asked."""
    if task == "image-classify":  # `tokenizer` is an edgeft.images.ImageEncoder: decoded, resized and cropped once
        return tokenizer.encode(rows, labels)
    if task == "classify":
        encoded = encode_classify(tokenizer, [r["text"] for r in rows], [r["label"] for r in rows], labels, UNLIMITED)
    else:
        encoded, _ = encode_causal(tokenizer, rows, UNLIMITED)
    long = [i for i, e in enumerate(encoded) if len(e.input_ids) > seq]
    if long and refuse_long:
        i = long[0]
        raise DataError(f"{where}: {len(long)} row(s) are longer than the bundle's {seq} tokens (first: row {i + 1}, {len(encoded[i].input_ids)} tokens)",
                        "shorten them, or leave out --refuse-long to truncate")
    if long:
        warn(f"warning: {where}: {len(long)} of {len(rows)} rows are longer than {seq} tokens and were truncated")
        if task == "classify":  # re-encode so the closing special token survives the cut, as on the workstation
            cut = encode_classify(tokenizer, [rows[i]["text"] for i in long], [rows[i]["label"] for i in long], labels, seq)
            for i, e in zip(long, cut):
                encoded[i] = e
        else:
            for i in long:
                encoded[i] = Encoded(encoded[i].input_ids[:seq], encoded[i].labels[:seq])
    if task != "classify":
        require_answers(encoded, where, seq, f"the bundle trains on {seq} tokens: shorten the prompts", warn)
    return encoded
