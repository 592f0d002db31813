"""`Learner`: the Python API a device app calls; the `edgeft device` commands use it too. Torch-free.

    from edgeft.device.learner import Learner
    learner = Learner("bundles/sentiment")
    p = learner.predict("the battery died after a week")      # {"label", "probability", ...}
    learner.add_examples([{"text": p["text"], "label": "negative"}])  # the user's correction
    learner.update()                                          # one generation on the pending rows

Why one object: the app predicts from one thread while another trains. Predictions use the
current generation's weights until a new one is promoted; then the new inference session is built
beside the old one and swapped in by one reference assignment, so no prediction ever sees a half
state. A change made by another process (the `device watch` service, `device rollback`) is picked
up on the next call: state.json is replaced atomically, and its inode tells.

Rows added are durable before `add_examples` returns (pending.py), and `update()` trains each
row in exactly one generation, surviving a kill at any point (it resumes the same round).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import DataError, TrainingDiverged, UsageError


def validate_rows(rows, task: str, labels: list[str], where: str = "row") -> list[dict]:
    """The rows as the trainer reads them from a file ({'text','label'} or a causal shape), checked
    with the file loader's rules so an app's bad row fails here, not in the next update."""
    from ..datasets import _causal_row, _label

    if isinstance(rows, dict) or not isinstance(rows, (list, tuple)):
        raise DataError("add_examples takes a list of rows (dicts)", 'e.g. [{"text": "...", "label": "positive"}]')
    out = []
    for i, row in enumerate(rows, 1):
        loc = f"{where} {i}"
        if not isinstance(row, dict):
            raise DataError(f"{loc}: expected a dict, got {type(row).__name__}", 'e.g. {"text": "...", "label": "positive"}')
        if task == "image-classify":
            out.append(_image_row(row, loc, labels))
            continue
        if task != "classify":
            out.append(_causal_row(row, loc))
            continue
        for field in ("text", "label"):
            if field not in row:
                raise DataError(f"{loc}: no field {field!r}", 'classify rows are {"text": "...", "label": "..."}')
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise DataError(f"{loc}: 'text' must be a non-empty string", "give every row its text")
        label = _label(row["label"], loc, "label")
        if label not in labels:
            raise DataError(f"{loc}: label {label!r} is not one the model was trained with",
                            f"known labels: {', '.join(labels)}; new classes need a new workstation run")
        out.append({"text": row["text"], "label": label})
    if not out:
        raise DataError("no rows given", "pass at least one row")
    return out


def _image_row(row: dict, loc: str, labels: list[str]) -> dict:
    """An image feedback row: {"image": path of a saved frame, "label"}; the file is decoded now."""
    from ..datasets import _label
    from ..images import open_image

    if not isinstance(row.get("image"), (str, Path)) or "label" not in row:
        raise DataError(f"{loc}: image rows are {{'image': path, 'label': ...}}", "save the camera frame as a file and pass its path")
    label = _label(row["label"], loc, "label")
    if label not in labels:
        raise DataError(f"{loc}: label {label!r} is not one the model was trained with", f"known labels: {', '.join(labels)}")
    open_image(row["image"])
    return {"image": str(Path(row["image"]).resolve()), "label": label}


def training_config(data, eval_data, options: dict):
    """DeviceTrainConfig, with an unknown option as a UsageError rather than a TypeError."""
    import dataclasses

    from .trainer import DeviceTrainConfig

    known = {f.name for f in dataclasses.fields(DeviceTrainConfig)} - {"data", "eval_data"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)}", f"use: {', '.join(sorted(known))}")
    return DeviceTrainConfig(data=str(data), eval_data=str(eval_data) if eval_data else None, **options)


class Learner:
    """One bundle and its device state folder: predict, generate, collect rows, train generations."""

    def __init__(self, bundle, state_dir=None, verify: bool = True, log=None):
        from ..bundle import read_manifest, verify_bundle
        from .pending import PendingStore
        from .state import default_state_dir

        self.bundle = Path(bundle)
        self.manifest = verify_bundle(self.bundle) if verify else read_manifest(self.bundle)
        self.task, self.labels = self.manifest.task, self.manifest.labels
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.bundle)
        self.store = PendingStore(self.state_dir.resolve() / "learner")  # round.json names its data file: absolute, whatever the cwd
        self.log = log or (lambda message: None)
        self._swap = threading.Lock()  # guards self._model (a tuple, replaced whole)
        self._updating = threading.Lock()
        self._model = None  # (state stamp, generation, Predictor)
        self._tokenizer = None
        self._settled = False

    # -- state and models --------------------------------------------------------
    def settle(self) -> None:
        """Once, before this object first acts on the state folder: make durable what a killed
        process left visible but not yet fsynced (a batch's name, round.json, state.json, a history
        line), so a power cut later cannot take back what this process built on."""
        if not self._settled:
            self.store.settle()
            self.state().settle()
            self._settled = True

    def state(self):
        from .state import DeviceState

        return DeviceState(self.state_dir, self.bundle, self.manifest)

    def _stamp(self):
        try:
            st = os.stat(self.state_dir / "state.json")
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .data import task_encoder

            self._tokenizer = task_encoder(self.bundle, self.manifest)
        return self._tokenizer

    def _build(self, generation: int, state=None):
        from .infer import Predictor

        state = state or self.state()
        return Predictor(self.bundle, self.manifest, state.params(generation), self.tokenizer)

    def model(self, generation: int | None = None):
        """The Predictor of `generation` (default: the current one, cached and swapped on change)."""
        if generation is not None:
            return self._build(generation)
        stamp = self._stamp()
        held = self._model
        if held is not None and held[0] == stamp:
            return held[2]
        state = self.state()
        gen = state.current
        if held is not None and held[1] == gen:
            predictor = held[2]
        else:
            predictor = self._build(gen, state)
        with self._swap:
            self._model = (stamp, gen, predictor)
        return predictor

    def refresh(self) -> int:
        """Load the current generation now (after an update), so the next prediction does not wait."""
        self.model()
        return self._model[1]

    # -- inference -----------------------------------------------------------------
    def predict(self, texts, generation: int | None = None):
        """Classify: one dict for a string, a list for a list (label, probability, probabilities).
        Image bundles: an image file path or a numpy frame from a camera ((h, w), (h, w, 3) RGB or
        (h, w, 4), uint8 or float in [0, 1]) -> one dict; a list of them -> a list."""
        if self.task == "image-classify":
            return self._predict_images(texts, generation)
        if self.task != "classify":
            raise UsageError("predict is for classify bundles", "use generate (`edgeft device generate`) for causal-lm bundles")
        single = isinstance(texts, str)
        items = [texts] if single else list(texts)
        if not items or not all(isinstance(t, str) and t.strip() for t in items):
            raise UsageError("predict needs non-empty text strings", "e.g. learner.predict('great battery life')")
        out = self.model(generation).predict(items)
        return out[0] if single else out

    def _predict_images(self, images, generation: int | None):
        import numpy as np

        single = isinstance(images, (str, Path, np.ndarray))
        items = [images] if single else list(images)
        if not items:
            raise UsageError("predict needs an image", "e.g. learner.predict(frame) with a numpy (h, w, 3) uint8 frame, or a file path")
        names = [str(i) if isinstance(i, (str, Path)) else None for i in items]
        out = self.model(generation).predict_images(items, names if all(names) else None)
        return out[0] if single else out

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = True, generation: int | None = None) -> dict:
        """Causal LM: greedy at temperature 0, else top-k / top-p sampling. {"prompt", "completion", "tokens"}."""
        if self.task != "causal-lm":
            raise UsageError("generate is for causal-lm bundles", "use predict (`edgeft device predict`) for classify bundles")
        if not 0 < top_p <= 1 or top_k < 0 or temperature < 0 or max_new_tokens < 1:
            raise UsageError("need 0 < --top-p <= 1, --top-k >= 0, --temperature >= 0, --max-new-tokens >= 1", "e.g. --temperature 0.7 --top-p 0.9")
        return self.model(generation).generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat=chat)

    def evaluate(self, data, generation: int | None = None, warn=None) -> dict:
        """Metrics of a generation on a data file (or a list of rows)."""
        from ..datasets import load_task_rows
        from .data import encode_rows

        if isinstance(data, (str, Path)):
            rows, where = load_task_rows(data, self.task, self.labels), str(data)
        else:
            rows, where = validate_rows(data, self.task, self.labels), "rows"
        m = self.manifest
        encoded = encode_rows(rows, m.task, self.tokenizer, m.labels, m.max_seq_len, where=where, warn=warn or self.log)
        gen = self.state().current if generation is None else generation
        return {"generation": gen, **self.model(generation).evaluate(encoded)}

    # -- learning ------------------------------------------------------------------
    def add_examples(self, rows, key: str | None = None) -> dict:
        """Validate rows and store them durably for the next update. With `key` (e.g. a file's
        sha256), rows already added under that key are not added again."""
        clean = validate_rows(rows, self.task, self.labels)
        self.settle()
        name = self.store.add(clean, key)
        return {"added": 0 if name is None else len(clean), "duplicate": name is None, **self.store.counts()}

    def train(self, data, eval_data=None, progress: bool = False, **options) -> dict:
        """One generation on a data file (what `edgeft device train` runs); options are
        DeviceTrainConfig's (max_steps, epochs, lr, replay_ratio, tolerance, seed, ...)."""
        from .trainer import DeviceTrainer

        cfg = training_config(data, eval_data, options)
        summary = DeviceTrainer(self.bundle, self.state_dir, cfg, log=self.log, progress=progress).run()
        if summary["promoted"] and self._model is not None:  # an app that predicts: built beside the old session, then swapped in
            self.refresh()  # (`device train` never predicts: no session its memory plan does not count)
        return summary

    def update(self, min_rows: int = 1, **options) -> dict | None:
        """Train one generation on the pending rows, then consume them; None when fewer than
        `min_rows` are waiting. An interrupted round is resumed first, with its own options."""
        training_config("pending rows", None, options)  # an unknown option fails now, not in a committed round
        with self._updating, self.store.lock():
            self.settle()
            r = self.store.open_round(min_rows, options)
            if r is None:
                return None
            done = self.trained_by(r)
            if done is not None:  # killed after the generation was recorded: only the bookkeeping is left
                self.store.finish(r, done)
                self.log(f"round {r['id']} was already trained as generation {done['id']}; its rows are consumed")
                return {"generation": done["id"], "promoted": done["status"] == "promoted", "reason": done.get("reason"),
                        "current": self.state().current, "rows": r["rows"], "round": r["id"], "recovered": True}
            try:
                summary = self.train(r["data"], **r["options"])
            except TrainingDiverged:
                failed = self.trained_by(r)
                if failed is not None:  # recorded as failed: these rows are not retried forever
                    self.store.finish(r, failed)
                raise
            self.store.finish(r, self.state().generation(summary["generation"]))
            return {**summary, "rows": r["rows"], "round": r["id"], "recovered": False}

    def trained_by(self, r: dict) -> dict | None:
        """The generation record trained on round `r`, if one was written."""
        for g in self.state().data["generations"]:
            d = g.get("data") or {}
            if d.get("file") == r["data"] and d.get("sha256") == r["sha256"]:
                return g
        return None

    def status(self) -> dict:
        state = self.state()
        gens = state.data["generations"]
        return {"bundle": str(self.bundle), "state": str(self.state_dir), "task": self.task, "labels": self.labels,
                "current": state.current, "generations": len(gens), "last": gens[-1], **self.store.counts(),
                "trained_rows": sum(h.get("rows", 0) for h in self.store.history())}
