"""Use the model on the device: evaluate, classify, generate. Stock ONNX Runtime is enough."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..bundle import Manifest
from ..encode import IGNORE, Encoded, collate
from ..metrics import classification_metrics
from ..plan import inference_batch
from .runtime import inference_session


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_log_probs(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """log p(target) per row of (N, V) fp32 logits, summing in float64 without an (N, V) float64
    copy: over a 49k-word vocabulary that copy, times three, was most of an evaluation's memory."""
    top = logits.max(-1)
    norm = np.log(np.exp(logits - top[:, None]).sum(-1, dtype=np.float64)) + top
    return np.take_along_axis(logits, target[:, None], -1)[:, 0] - norm


# the labelled positions' logits are scored this many bytes at a time: their copy, its exp and the
# shifted copy were three (N, V) temporaries (SmolLM2 at 4 x 256: 576 MiB beside the 192 MiB logits)
SLICE_BYTES = 16 << 20


class Predictor:
    """The inference graph with one generation's adapter weights swapped in."""

    def __init__(self, bundle: Path, manifest: Manifest, params: dict, tokenizer, want_cuda: bool | None = None):
        self.session = inference_session(bundle, manifest, params, want_cuda)
        self.task, self.labels, self.tokenizer = manifest.task, manifest.labels, tokenizer
        self.seq = manifest.max_seq_len
        vocab = self.session.get_outputs()[0].shape[-1]
        self.eval_batch = inference_batch(self.task, manifest.train_shape.batch, self.seq, vocab if isinstance(vocab, int) else 0)

    def set_params(self, params: dict) -> None:
        """Another generation's trainable weights in the same session (they are graph inputs)."""
        bound = self.session.bound
        for k, v in params.items():
            if k in bound:
                bound[k] = np.ascontiguousarray(v, dtype=np.float32)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def evaluate(self, encoded: list, per_row: bool = False) -> dict:
        """The workstation's metrics: loss + accuracy/macro-F1, or loss + perplexity over answer tokens.
        `per_row` adds "correct" (classify): which rows were right, for a paired comparison."""
        loss_sum, count, correct = 0.0, 0, [False] * len(encoded)
        confusion = np.zeros((len(self.labels), len(self.labels)))
        # longest rows first: every later batch's tensors then fit in the arena's free blocks (in file
        # order each longer row took a new block: BENCHMARKS.md section 5), and a batch pads its rows less
        order = sorted(range(len(encoded)), key=lambda k: -len(getattr(encoded[k], "input_ids", ())))  # images: one size
        for i in range(0, len(order), self.eval_batch):
            at = order[i : i + self.eval_batch]
            b = collate([encoded[k] for k in at], self.tokenizer.pad_token_id)
            logits = self.session.run(None, {k: v for k, v in b.items() if k != "labels"})[0]
            if self.task != "causal-lm":
                y = b["labels"]
                loss_sum -= token_log_probs(logits, y).sum()
                count += len(y)
                np.add.at(confusion, (y, logits.argmax(-1)), 1)
                for k, right in zip(at, (logits.argmax(-1) == y).tolist()):
                    correct[k] = right
            else:
                rows, cols = np.nonzero(b["labels"][:, 1:] != IGNORE)  # position t predicts the label at t + 1
                step = max(1, SLICE_BYTES // (4 * logits.shape[-1]))
                for a in range(0, len(rows), step):  # a few positions' (., V) at a time, never a copy of all of them
                    r, c = rows[a : a + step], cols[a : a + step]
                    loss_sum -= token_log_probs(logits[r, c], b["labels"][r, c + 1]).sum()
                count += len(rows)
        loss = loss_sum / max(count, 1)
        if self.task != "causal-lm":
            return {"rows": len(encoded), "eval_loss": loss, **classification_metrics(confusion), **({"correct": correct} if per_row else {})}
        return {"rows": len(encoded), "tokens": count, "eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def predict(self, texts: list[str], batch_size: int = 16) -> list[dict]:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i : i + batch_size], truncation=True, max_length=self.seq)["input_ids"]
            b = collate([Encoded(ids, 0) for ids in enc], self.tokenizer.pad_token_id)
            probs = np.exp(log_softmax(self.logits(b["input_ids"], b["attention_mask"]).astype(np.float64)))
            for text, p in zip(texts[i : i + batch_size], probs):
                k = int(p.argmax())
                out.append({"text": text, "label": self.labels[k], "probability": round(float(p[k]), 6),
                            "probabilities": {name: round(float(q), 6) for name, q in zip(self.labels, p)}})
        return out

    def predict_images(self, images: list, names: list[str] | None = None, batch_size: int = 16) -> list[dict]:
        """Image bundles: files or numpy frames (h, w[, 3|4]) through the bundle's preprocessing
        (edgeft.images, exactly the workstation's), then the inference graph."""
        pre = self.tokenizer.pre
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            x = np.stack([pre(im) for im in chunk])  # (B, 3, size, size)
            probs = np.exp(log_softmax(self.session.run(None, {"pixel_values": x})[0].astype(np.float64)))
            for j, p in enumerate(probs):
                k = int(p.argmax())
                row = {"label": self.labels[k], "probability": round(float(p[k]), 6),
                       "probabilities": {name: round(float(q), 6) for name, q in zip(self.labels, p)}}
                out.append({"image": names[i + j], **row} if names else row)
        return out

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = True) -> dict:
        """Greedy at temperature 0, else sampled with top-k / top-p. No KV cache: each token re-runs the
        prefix, which is fine for the short answers a device model gives."""
        tok = self.tokenizer
        if chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        rng = np.random.default_rng(seed)
        new: list[int] = []
        for _ in range(max_new_tokens):
            window = (ids + new)[-self.seq :]
            x = np.array([window], dtype=np.int64)
            logits = self.logits(x, np.ones_like(x))[0, -1].astype(np.float64)
            nxt = int(logits.argmax()) if temperature <= 0 else sample(logits / temperature, top_k, top_p, rng)
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        return {"prompt": prompt, "completion": tok.decode(new), "tokens": len(new)}


def sample(logits: np.ndarray, top_k: int, top_p: float, rng) -> int:
    order = np.argsort(-logits)
    if top_k > 0:
        order = order[:top_k]
    p = np.exp(logits[order] - logits[order[0]])
    p /= p.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(len(order), p=p)])
