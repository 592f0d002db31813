"""Two engines for a device training step, and the optimizer they share.

- `onnxruntime-training`: ORT's training build runs the bundle's training artifacts
  (x86-64 only, ORT 1.19.2: the last release).
- `portable`: stock ONNX Runtime (any platform, >= 1.19) runs the bundle's `portable/`
  step, the same graph rewritten into standard ops (see edgeft.workstation.portable).

Both read the frozen base from the bundle's one file (`manifest.frozen`) and feed it to their
graphs as inputs. Both return the loss and the summed gradients of a micro-batch; AdamW is one graph of
standard ops over the trainable parameters as a flat vector, run by whichever ORT is
installed. So a checkpoint is the same few flat arrays on either engine, and a device can
resume a job on the other one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import BundleError, Manifest
from .runtime import (check_inference, configure_session, lean_memory, onnxruntime, plan_for_training, providers, threads, training_api,
                      training_session)
from .state import StateError


def portable_entry(manifest: Manifest) -> dict:
    entry = manifest.portable
    if not entry:
        raise BundleError("this bundle has no portable training step (it was exported by an older edgeft)",
                          "re-export it with `edgeft export`, or install onnxruntime-training-cpu==1.19.2 (x86-64 only)")
    return entry


def choose_backend(manifest: Manifest, wanted: str = "auto") -> type:
    """The portable step unless asked otherwise: it runs on any ONNX Runtime and, rebuilding in
    the backward pass what it can instead of holding it, trains at the training build's speed in
    less memory. Checked before any data is read, so a device that cannot train says so first."""
    if wanted == "onnxruntime-training":
        training_api(manifest)
        return OrtTrainingBackend
    portable_entry(manifest)
    check_inference()
    return PortableBackend


def _session(ort, path: Path, manifest: Manifest, training: bool = False, supplied: dict | None = None):
    """supplied: the constants the graph holds but does not store (OrtValues by name: the step's base)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads(manifest)
    configure_session(ort, options)
    if training:
        plan_for_training(options)
    if supplied:
        options.add_external_initializers(list(supplied), list(supplied.values()))
    return ort.InferenceSession(str(path), options, providers=providers(ort, manifest),
                                disabled_optimizers=(manifest.portable or {}).get("disabled_optimizers", []))


class Layout:
    """Where each trainable tensor lives in the flat vector (manifest order)."""

    def __init__(self, shapes: dict):
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.offsets, total = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            self.offsets[name] = (total, total + size)
            total += size
        self.size = total

    def flatten(self, arrays: dict) -> np.ndarray:
        return np.concatenate([np.asarray(arrays[n], np.float32).ravel() for n in self.shapes])

    def views(self, flat: np.ndarray) -> dict:
        return {n: flat[a:b].reshape(self.shapes[n]) for n, (a, b) in self.offsets.items()}


class AdamW:
    """torch.optim.AdamW as the bundle's standard-op graph; its state is three flat vectors and a step."""

    def __init__(self, bundle: Path, manifest: Manifest, layout: Layout, params: dict):
        ort = check_inference()
        self.layout = layout
        self.session = _session(ort, Path(bundle) / portable_entry(manifest)["optimizer"], manifest)
        self.params = layout.flatten(params)
        self.exp_avg = np.zeros(layout.size, np.float32)
        self.exp_avg_sq = np.zeros(layout.size, np.float32)
        self.step = 0

    # values per run of the graph: it is elementwise, so slices give the same values, and its dozen
    # temporaries stay a few MiB. Whole, they were each the adapter's size: Qwen2.5-0.5B's 8.8M LoRA
    # values (34 MiB) took the process up 417 MiB, against the 4 x 34 the plan counts.
    CHUNK = 1 << 20

    def update(self, grads: np.ndarray, lr: float) -> None:
        """New parameters (callers may keep the old ones: the best weights); the moments in place."""
        self.step += 1
        scalars = {"lr": np.array(lr, np.float32), "step": np.array(self.step, np.float32)}
        grads = grads.astype(np.float32, copy=False)
        params = np.empty_like(self.params, dtype=np.float32)
        for a in range(0, self.layout.size, self.CHUNK):
            b = min(a + self.CHUNK, self.layout.size)
            params[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b] = self.session.run(None, {
                **scalars, "params": self.params[a:b], "grads": grads[a:b], "exp_avg": self.exp_avg[a:b], "exp_avg_sq": self.exp_avg_sq[a:b]})
        self.params = params

    def release_arena(self) -> None:
        """Hand the shared CPU arena's free regions (the step's buffers, freed) back to the OS, through a
        one-value run of this graph: before the eval step's session is built and run beside them. Qwen2.5-
        0.5B on the Pi 4 profile: 1338 -> 662 MiB after the last step; the promotion check then peaked
        at 1705 MiB, 1.2 x the plan. Nothing to do without an arena (lean)."""
        if lean_memory():
            return
        options = check_inference().RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        one = np.zeros(1, np.float32)
        self.session.run(None, {"lr": np.array(0, np.float32), "step": np.array(1, np.float32), "params": one, "grads": one, "exp_avg": one, "exp_avg_sq": one}, options)

    def arrays(self) -> dict:
        return {"params": self.params, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def restore(self, arrays: dict, step: int, adam_step: int | None = None) -> None:
        """A job's checkpoint: parameters, moments, and AdamW's step count (the job's steps unless it
        started from earlier moments)."""
        for key in ("params", "exp_avg", "exp_avg_sq"):
            if arrays[key].shape != (self.layout.size,):
                raise StateError(f"the interrupted job's checkpoint holds {arrays[key].shape[0]} values, the bundle {self.layout.size}",
                                 "pass --restart to discard the interrupted generation")
        self.params, self.exp_avg, self.exp_avg_sq = (np.array(arrays[k], np.float32) for k in ("params", "exp_avg", "exp_avg_sq"))
        self.step = step if adam_step is None else adam_step

    def load_moments(self, arrays: dict, step: int) -> None:
        """Start from earlier moments (and their step count, for the bias correction); the parameters stay."""
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in arrays or arrays[key].shape != (self.layout.size,):
                raise StateError(f"the saved optimizer moments do not fit this bundle's {self.layout.size} trainable values",
                                 "delete them to start the moments afresh")
        self.exp_avg, self.exp_avg_sq = (np.array(arrays[k], np.float32) for k in ("exp_avg", "exp_avg_sq"))
        self.step = step


def load_frozen(bundle: Path, manifest: Manifest) -> dict:
    """The frozen base (packed codes, scales, zero points; fp32 norms and biases) by input name."""
    from safetensors.numpy import load_file

    if not getattr(manifest, "frozen", None):
        raise BundleError("this bundle names no frozen base file (it was exported by an older edgeft)", "re-export it with `edgeft export`")
    return load_file(str(Path(bundle) / manifest.frozen))


class OrtTrainingBackend:
    name = "onnxruntime-training"

    def __init__(self, bundle: Path, manifest: Manifest):
        api = training_api(manifest)
        ort = onnxruntime()
        b = Path(bundle)
        self.ortvalue = ort.OrtValue.ortvalue_from_numpy
        # the frozen base is the graphs' user inputs, not ORT parameters: wrapped once, without a copy
        self.frozen = {k: self.ortvalue(v) for k, v in load_frozen(b, manifest).items()}
        self.state = api.CheckpointState.load_checkpoint(str(b / "checkpoint"))
        device, options = training_session(manifest)
        self.module = api.Module(str(b / "training_model.onnx"), self.state, str(b / "eval_model.onnx"), device=device, session_options=options)
        # the checkpoint is nominal (names and shapes): give the parameters storage before any is set by name
        # the zeros and their OrtValue must outlive the call: a temporary is freed before ORT reads it, and a
        # buffer large enough to be its own mmap (EfficientNet-Lite0's 367k LoRA values, 1.4 MB) is then
        # unmapped under it (SIGSEGV in a fresh process; inside a process whose malloc had raised its mmap
        # threshold, it read freed heap instead)
        zeros = np.zeros(self.module.get_parameters_size(False), np.float32)
        buffer = self.ortvalue(zeros)
        self.module.copy_buffer_to_parameters(buffer._ortvalue, False)
        del buffer, zeros
        self.names = list(manifest.trainable)

    def set_params(self, params: dict) -> None:
        for name in self.names:
            self.state.parameters[name] = np.ascontiguousarray(params[name], dtype=np.float32)

    def _run(self, batch: dict, training: bool) -> float:
        self.module.train(training)
        inputs = [self.frozen[n] if n in self.frozen else self.ortvalue(np.ascontiguousarray(batch[n])) for n in self.module.input_names()]
        return float(self.module(*inputs).numpy())

    def forward_backward(self, batch: dict) -> float:
        return self._run(batch, True)

    def take_grads(self) -> np.ndarray:
        grads = np.concatenate([np.asarray(self.state.parameters[n].grad, np.float32).ravel() for n in self.names])
        self.module.lazy_reset_grad()
        return grads

    def eval_loss(self, batch: dict) -> float:
        return self._run(batch, False)


class PortableBackend:
    name = "portable"

    def __init__(self, bundle: Path, manifest: Manifest):
        entry = portable_entry(manifest)
        ort = check_inference()
        b = Path(bundle)
        self.params: dict = {}
        self.frozen = load_frozen(b, manifest)  # one copy, fed to both graphs
        if entry.get("rebuild"):  # a small base: rebuilt in fp32 once, here, not in every step
            rebuild = _session(ort, b / entry["rebuild"], manifest)
            names = [o.name for o in rebuild.get_outputs()]
            self.frozen.update(zip(names, rebuild.run(None, self.feeds(rebuild, {}))))
        # the base as constants of the steps (a bundle that names them): wrapped once, without a copy, and kept
        # alive with the sessions that read them in place
        self.supplied = entry.get("supplied") or {}
        self.constants = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self.frozen[n]))
                          for n in dict.fromkeys(n for names in self.supplied.values() for n in names)}
        self.step = _session(ort, b / entry["train_step"], manifest, training=True, supplied=self._supplied("train_step"))
        self.eval = None  # made on first use: a session costs seconds to build on a large graph
        self.eval_path, self.manifest = b / entry["eval_step"], manifest
        self.grad_names = [o.name for o in self.step.get_outputs()[1:]]
        self.names = list(manifest.trainable)
        self.grads: np.ndarray | None = None

    def _supplied(self, graph: str) -> dict:
        return {n: self.constants[n] for n in self.supplied.get(graph, [])}

    def set_params(self, params: dict) -> None:
        self.params = {n: np.ascontiguousarray(params[n], dtype=np.float32) for n in self.names}

    def feeds(self, session, batch: dict) -> dict:
        wanted = {i.name for i in session.get_inputs()}
        everything = {**batch, **self.frozen, **self.params}
        return {k: v for k, v in everything.items() if k in wanted}

    def forward_backward(self, batch: dict) -> float:
        loss, *grads = self.step.run(None, self.feeds(self.step, batch))
        by_name = dict(zip(self.grad_names, grads))
        flat = np.concatenate([by_name[n + "_grad"].ravel() for n in self.names])
        self.grads = flat if self.grads is None else self.grads + flat
        return float(loss)

    def take_grads(self) -> np.ndarray:
        grads, self.grads = self.grads, None
        return grads

    def drop_step(self) -> None:
        """Free the training step's session (its graph and kernels: tens of MiB for a large base) before the
        eval step's is built: the best-weights loss and the promotion check run on the eval step alone."""
        import gc

        from .runtime import trim_heap

        self.step = None
        gc.collect()
        trim_heap()

    def eval_loss(self, batch: dict) -> float:
        if self.eval is None:
            # planned as the step is (a buffer per tensor, freed after its last use): the promotion check
            # runs here after training, and so reuses the arena the step freed instead of adding a block
            self.eval = _session(check_inference(), self.eval_path, self.manifest, training=True, supplied=self._supplied("eval_step"))
        return float(self.eval.run(None, self.feeds(self.eval, batch))[0])


BACKEND_CLASSES = {cls.name: cls for cls in (OrtTrainingBackend, PortableBackend)}
