"""What the server checks on every adapter a device sends, before it may enter an aggregate. Pure numpy.

An update is refused (and logged; the round goes on with the others) when:
- it names another base than the bundle's (fingerprint), or another round than the one asked;
- its sha256 (over names, dtypes, shapes and bytes; `digest`) is not the one the device computed;
- its tensors are not exactly the bundle's trainable tensors, as fp32, with the bundle's shapes;
- any value is NaN or infinite;
- it claims no samples (or a negative, or non-finite, count).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def digest(arrays: dict) -> str:
    """sha256 of an adapter: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{tuple(a.shape)}\0".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def problems(arrays: dict, shapes: dict[str, tuple], base_fingerprint: str, meta: dict) -> list[str]:
    """Why this update cannot be aggregated; empty when it can. `meta`: what the device said about it
    (base_fingerprint, sha256, num-examples, and round / expected_round when known)."""
    out = []
    claimed = meta.get("base_fingerprint")
    if claimed != base_fingerprint:
        out.append(f"it was trained on base {claimed or '(not stated)'}, the fleet's bundle holds {base_fingerprint}")
    if "expected_round" in meta and meta.get("round") != meta["expected_round"]:
        out.append(f"it answers round {meta.get('round')}, not round {meta['expected_round']}")
    n = meta.get("num-examples")
    if not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        out.append(f"it claims {n} samples")
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing:
        out.append(f"it lacks {len(missing)} of the adapter's tensors (first: {missing[0]})")
    if extra:
        out.append(f"it has {len(extra)} tensors the adapter does not train (first: {extra[0]})")
    common = sorted(set(arrays) & set(shapes))
    wrong = [n for n in common if tuple(arrays[n].shape) != tuple(shapes[n]) or arrays[n].dtype != np.float32]
    if wrong:
        n = wrong[0]
        out.append(f"{len(wrong)} tensors are not fp32 of the adapter's shape (first: {n} {arrays[n].dtype} "
                   f"{tuple(arrays[n].shape)}, expected float32 {tuple(shapes[n])})")
    bad = [n for n in common if n not in wrong and not np.isfinite(arrays[n]).all()]
    if bad:
        out.append(f"{len(bad)} tensors hold NaN or infinite values (first: {bad[0]})")
    if meta.get("sha256") != digest(arrays):
        out.append("its sha256 is not the one the device sent (corrupted or altered on the way)")
    return out
