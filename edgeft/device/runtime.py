"""ONNX Runtime on the device: version checks, the training API without torch, sessions."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RuntimeMismatch  # defined in errors.py (the one exit-code table)

if TYPE_CHECKING:
    from ..bundle import Manifest


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


def _register_training_package() -> None:
    """Make `onnxruntime.training` importable without running its __init__ (which imports torch).

    `import onnxruntime` itself probes `onnxruntime.training.ortmodule` (torch again) on the
    training build; marking ortmodule absent makes that probe fail fast, as it does on a
    device without torch. Only the torch-free `api` and `artifacts` submodules are used.
    """
    if "onnxruntime.training" in sys.modules:
        return
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return
    path = Path(list(spec.submodule_search_locations)[0]) / "training"
    if not (path / "api").is_dir():
        return  # stock onnxruntime: no training package at all
    package = types.ModuleType("onnxruntime.training")
    package.__path__ = [str(path)]
    package.__spec__ = importlib.util.spec_from_file_location("onnxruntime.training", path / "__init__.py", submodule_search_locations=[str(path)])
    sys.modules["onnxruntime.training"] = package
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)


def onnxruntime():
    if "onnxruntime" not in sys.modules:
        _register_training_package()
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeMismatch("ONNX Runtime is not installed", 'pip install "edgeft[device]"') from None
    ort.set_default_logger_severity(3)  # the exporter leaves unused shape constants; ORT warns about each
    return ort


def check_inference():
    ort = onnxruntime()
    if _version_tuple(ort.__version__) < (1, 19):
        raise RuntimeMismatch(f"onnxruntime {ort.__version__} is too old for this bundle (needs >= 1.19)",
                              'pip install -U "onnxruntime>=1.19" (or "edgeft[device]")')
    return ort


def training_api(manifest: Manifest):
    """onnxruntime.training.api without torch (see _register_training_package)."""
    ort = onnxruntime()
    want = manifest.onnxruntime.get("training", "1.19.2")
    from onnxruntime.capi import _pybind_state as C

    if not hasattr(C, "CheckpointState"):
        raise RuntimeMismatch(f"the installed onnxruntime {ort.__version__} is the stock build, without training kernels",
                              f'device training needs onnxruntime-training {want}: pip uninstall onnxruntime && pip install "onnxruntime-training-cpu=={want}"')
    if _version_tuple(ort.__version__) != _version_tuple(want):
        raise RuntimeMismatch(f"this bundle's training artifacts were made for onnxruntime-training {want}, found {ort.__version__}",
                              f'pip install "onnxruntime-training-cpu=={want}", or re-export the bundle with the installed version')
    _register_training_package()
    from onnxruntime.training import api

    return api


def providers(ort, manifest: Manifest, want_cuda: bool | None = None) -> list[str]:
    """The target's execution providers that this ONNX Runtime has, CPU always last."""
    available = set(ort.get_available_providers())
    wanted = list(manifest.target.get("execution_providers") or [])
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    if want_cuda is False:
        chosen = [p for p in chosen if p != "CUDAExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


_ARENA_REGISTERED = False
_MMAP_SET = False
MEMORY_MODES = ("fast", "lean")
_MODE = "fast"  # set_memory_mode: this process's choice (device train: from its memory plan)


def set_memory_mode(mode: str) -> None:
    """Choose the allocator for this process's sessions from now on ("fast" or "lean"; see lean_memory)."""
    global _MODE
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}")
    _MODE = mode


def memory_mode() -> str:
    """EDGEFT_MEMORY=fast|lean when set, else the process's choice (set_memory_mode), else fast."""
    env = os.environ.get("EDGEFT_MEMORY")
    return env if env in MEMORY_MODES else _MODE


def lean_memory() -> bool:
    """Lean: freed memory goes back to the OS at once (no ONNX Runtime arena; glibc maps every block
    over 128 KiB on its own) instead of staying in the process for the next step. Every step then
    faults its pages in afresh: EfficientNet-Lite0's step (batch 16 x 160 px) peaks at 428 MiB instead
    of 605 and takes 2.4 s instead of 1.5. A large base's step, whose weights are rebuilt one layer at
    a time (portable_memory.gate_rebuilds), pays little: SmolLM2-135M at 1 x 64 peaks at 360 MiB instead
    of 395 in about the same time (BENCHMARKS.md section 5). `device train` chooses it when the plan
    says the arena would not fit the target's budget and lean would (plan.plan_process)."""
    return memory_mode() == "lean"


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim(0); nothing on another libc)."""
    if sys.platform != "linux":
        return
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def configure_session(ort, options) -> None:
    """Pool threads that sleep rather than spin between runs, and either a CPU arena that grows by what
    is requested, shared by every session in the process, or no arena at all (lean_memory).

    ORT's default arena doubles as it grows and keeps its high-water mark; with no arena,
    every step maps and faults fresh pages. Measured on a MiniLM training step (2 cores):
    default arena 379 MiB / 0.112 s, none 324 MiB / 0.18 s, this 327 MiB / 0.124 s.
    """
    global _ARENA_REGISTERED, _MMAP_SET
    # Several sessions take turns (step, optimizer, rebuild); a pool thread left spinning after its
    # session's run competes for the cores with the next one (tools/bench_device.py step --ort-defaults).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean_memory():
        options.enable_cpu_mem_arena = False
        if not _MMAP_SET and sys.platform == "linux":
            import ctypes
            import ctypes.util

            try:  # M_MMAP_THRESHOLD (-3): glibc otherwise raises it as blocks are freed, and keeps them
                ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 128 << 10)
            except (OSError, AttributeError):
                pass  # not glibc: its own allocator decides
            _MMAP_SET = True
        return
    if not _ARENA_REGISTERED:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # 1 = kSameAsRequested
        _ARENA_REGISTERED = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def plan_for_training(options) -> None:
    """Give every tensor of a training step its own buffer, freed after its last use.

    ORT's planner otherwise makes tensors share buffers, and a buffer then lives as long as
    its longest tenant: on a training graph that keeps most forward temporaries alive until
    the backward pass. SmolLM2-135M portable step (4 x 128, 2 cores): peak RSS 2121 -> 1314
    MiB, same step time (tools/bench_device.py step --ort-defaults); the arena still recycles
    the freed memory at run time."""
    options.enable_mem_reuse = False
    options.enable_mem_pattern = False


def threads(manifest: Manifest) -> int:
    """The target's thread count, never more than this machine has (EDGEFT_THREADS overrides)."""
    if os.environ.get("EDGEFT_THREADS"):
        return int(os.environ["EDGEFT_THREADS"])
    cores = os.cpu_count() or 1
    return min(int(manifest.target.get("threads") or cores), cores)


def training_session(manifest: Manifest):
    """(device, SessionOptions) for the training Module: CUDA where the target lists it and ORT has it."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads(manifest)
    configure_session(ort, options)
    plan_for_training(options)
    return ("cuda" if "CUDAExecutionProvider" in providers(ort, manifest) else "cpu"), options


class InferenceGraph:
    """An inference session with its constant inputs bound: the frozen base and a generation's
    trainable weights (graph inputs, so the bundle stores the base once and any generation's
    weights run without rebuilding the session). `run` takes the batch alone."""

    def __init__(self, session, bound: dict):
        self.session, self.bound = session, bound

    def run(self, output_names, feeds: dict):
        return self.session.run(output_names, {**self.bound, **feeds})

    def get_inputs(self):
        return [i for i in self.session.get_inputs() if i.name not in self.bound]

    def get_outputs(self):
        return self.session.get_outputs()


def inference_session(bundle: Path, manifest: Manifest, params: dict, want_cuda: bool | None = None) -> InferenceGraph:
    """The bundle's inference graph fed `params` (a generation's trainable weights) and the frozen
    base from the bundle's one base file; stock ONNX Runtime is enough."""
    import numpy as np

    from .backends import load_frozen

    ort = check_inference()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads(manifest)
    configure_session(ort, options)
    info = manifest.inference
    session = ort.InferenceSession(str(Path(bundle) / info.get("file", "inference_model.onnx")), options,
                                   providers=providers(ort, manifest, want_cuda),
                                   disabled_optimizers=info.get("disabled_optimizers", []))
    wanted = {i.name for i in session.get_inputs()}
    bound = {k: v for k, v in load_frozen(bundle, manifest).items() if k in wanted}
    bound.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items() if k in wanted})
    return InferenceGraph(session, bound)


def peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
    except OSError:
        return peak_rss_mib()
