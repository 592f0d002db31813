"""Images for --task image-classify: the data files and the one preprocessing. Torch-free.

The device runs this very module (numpy and Pillow only: no torch, no torchvision), so an
image becomes the same float tensor on the workstation and on the device:

  decode (Pillow) -> RGB -> resize the shorter side to `resize` (bilinear, Pillow's) ->
  centre crop `size` x `size` -> float32 / 255 -> (x - mean) / std -> (3, size, size)

`Preprocess` holds those numbers; it comes from the model folder's config.json on the
workstation and from the bundle's manifest on the device. Augmentation (workstation only)
lives in edgeft.workstation.augment and works on the resized uint8 image, before the crop.

Data: a folder with one sub-folder per class (the ImageFolder convention), or a .jsonl/.csv
whose rows name an image (`image`, `path` or `file`, relative to the data file) and a label.
Bad files are DataErrors naming the file, never a traceback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PATH_FIELDS = ("image", "path", "file")


def _pil():
    """Pillow's Image module, or a plain message naming the package (a device without it cannot read images)."""
    try:
        import PIL.Image

        return PIL.Image
    except ImportError:
        from .errors import ResourceError

        raise ResourceError("reading images needs Pillow, which is not installed", "pip install pillow (part of edgeft[device] and edgeft[train])") from None


@dataclass(frozen=True)
class Preprocess:
    size: int = 224  # the square the model sees
    resize: int = 256  # the shorter side before the centre crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if self.size < 8 or self.resize < self.size:
            raise ValueError(f"preprocessing: size {self.size} must be >= 8 and resize {self.resize} >= size")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, size: int | None = None) -> "Preprocess":
        base = cls(int(d.get("size", 224)), int(d.get("resize", 256)), tuple(d.get("mean", cls.mean)), tuple(d.get("std", cls.std)))
        if size and size != base.size:  # keep the crop fraction
            return cls(size, max(size, round(size * base.resize / base.size)), base.mean, base.std)
        return base

    # -- the steps ------------------------------------------------------------
    def resized(self, image) -> np.ndarray:
        """A PIL image (any mode) or an array -> uint8 (h, w, 3), shorter side == resize."""
        Image = _pil()

        if isinstance(image, np.ndarray):
            image = from_array(image)
        image = image.convert("RGB")
        w, h = image.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.resize, round(w * scale)), max(self.resize, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def crop(self, resized: np.ndarray, top: int | None = None, left: int | None = None) -> np.ndarray:
        h, w = resized.shape[:2]
        top = (h - self.size) // 2 if top is None else top
        left = (w - self.size) // 2 if left is None else left
        return resized[top : top + self.size, left : left + self.size]

    def normalize(self, crop: np.ndarray) -> np.ndarray:
        """uint8 (size, size, 3) -> float32 (3, size, size)."""
        x = crop.astype(np.float32) / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __call__(self, image) -> np.ndarray:
        """A PIL image, a file path or a numpy frame (h, w), (h, w, 1|3|4) uint8 -> (3, size, size) float32."""
        if isinstance(image, (str, Path)):
            image = open_image(image)
        return self.normalize(self.crop(self.resized(image)))

    def batch(self, images) -> np.ndarray:
        return np.stack([self(i) for i in images]) if len(images) else np.zeros((0, 3, self.size, self.size), np.float32)


def from_array(frame: np.ndarray):
    """A camera frame as numpy: (h, w) gray, (h, w, 3) RGB or (h, w, 4) RGBA; uint8, or float in [0, 1]."""
    Image = _pil()

    a = np.asarray(frame)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise DataError(f"an image array must be (h, w), (h, w, 3) or (h, w, 4), got shape {a.shape}", "pass an RGB or grayscale frame")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating):
            raise DataError(f"an image array must be uint8 or float in [0, 1], got {a.dtype}")
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(a)


def open_image(path: str | Path):
    """Decode an image file fully (so a truncated file fails here, named), as a PIL image."""
    Image = _pil()
    UnidentifiedImageError = Image.UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}", "check the path (rows name images relative to their data file)")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                        "remove or replace the file") from None


# -- data files ----------------------------------------------------------------
def _folder_rows(root: Path) -> tuple[list[Path], list[str]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders", "put each class's images in a sub-folder named for the class (ImageFolder)")
    paths, labels = [], []
    for d in classes:
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                paths.append(f)
                labels.append(d.name)
    if not paths:
        raise DataError(f"{root}: no images in its class folders ({', '.join(d.name for d in classes[:5])})",
                        f"image files end in {', '.join(IMAGE_SUFFIXES[:4])}, ...")
    return paths, labels


def _file_rows(path: Path, label_field: str) -> tuple[list[Path], list[str]]:
    from .datasets import _label, _read

    records, where = _read(path)
    if not records:
        raise DataError(f"{path} has no rows")
    paths, labels = [], []
    for row, loc in zip(records, where):
        field = next((f for f in PATH_FIELDS if row.get(f) not in (None, "")), None)
        if field is None:
            raise DataError(f"{loc}: no image path (one of {', '.join(PATH_FIELDS)})", 'write rows like {"image": "cells/0001.png", "label": "defective"}')
        if label_field not in row:
            raise DataError(f"{loc}: no {label_field!r} field", f"every row needs a label (--label-field to rename); fields here: {', '.join(row)}")
        image = Path(str(row[field]))
        paths.append(image if image.is_absolute() else path.parent / image)
        labels.append(_label(row[label_field], loc, label_field))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) not found (first: {missing[0]})", "paths are relative to the data file's folder")
    return paths, labels


def load_image_rows(path: str | Path, label_field: str = "label") -> tuple[list[Path], list[str]]:
    """(image paths, labels) from a class-folder tree or a .jsonl/.csv of path + label."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"image data not found: {path}", "pass a folder with one sub-folder per class, or a .jsonl/.csv of image path and label")
    if path.is_dir():
        return _folder_rows(path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise DataError(f"{path} is one image, not a data set", "pass its folder of class folders, or a .jsonl listing images and labels")
    return _file_rows(path, label_field)


def image_files(paths) -> list[Path]:
    """Files to predict on: image files as given, folders expanded to the images inside (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif not p.exists():
            raise DataError(f"image not found: {p}")
        else:
            out.append(p)
    if not out:
        raise DataError("no images to predict on", "pass image files or folders holding images")
    return out


# -- the device's side: rows -> items -> batches, as the text tokenizer does for text -------------
def image_task_rows(path: str | Path, labels: list[str] | None = None, label_field: str = "label") -> list[dict]:
    """Rows {"image": absolute path, "label"} (what a device trains on, keeps for replay, and a bundle
    retains); with `labels`, a label outside them is refused, named (a device cannot grow classes)."""
    paths, names = load_image_rows(path, label_field)
    if labels is not None:
        unknown = sorted(set(names) - set(labels))
        if unknown:
            raise DataError(f"{path}: label(s) {', '.join(map(repr, unknown[:5]))} are not ones the model was trained with",
                            f"known labels: {', '.join(labels)}; new classes need a new workstation run")
    return [{"image": str(Path(p).resolve()), "label": n} for p, n in zip(paths, names)]


@dataclass
class ImageItem:
    """One image ready to batch: its centre crop as uint8 (size, size, 3), normalized at collate."""

    pixels: np.ndarray
    labels: int
    pre: Preprocess

    def key(self) -> list:
        import hashlib

        return [hashlib.sha256(self.pixels.tobytes()).hexdigest()[:16], self.labels]


class ImageEncoder:
    """The image counterpart of the device's tokenizer: rows -> ImageItems -> a batch."""

    pad_token_id = 0  # a field `collate` reads; images need no padding

    def __init__(self, pre: Preprocess):
        self.pre = pre

    @classmethod
    def for_manifest(cls, manifest) -> "ImageEncoder":
        return cls(Preprocess.from_dict(manifest.extra.get("preprocess") or {}))

    def encode(self, rows: list[dict], labels: list[str]) -> list[ImageItem]:
        return [ImageItem(self.pre.crop(self.pre.resized(open_image(r["image"]))), labels.index(r["label"]), self.pre) for r in rows]

    @staticmethod
    def collate_items(items: list[ImageItem]) -> dict:
        return {"pixel_values": np.stack([i.pre.normalize(i.pixels) for i in items]),
                "labels": np.asarray([i.labels for i in items], dtype=np.int64)}
