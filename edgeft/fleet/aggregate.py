"""Sample-weighted aggregation of LoRA adapters from many devices. Pure numpy.

An adapter is a dict ONNX name -> fp32 array: pairs of LoRA factors (`...lora_A...` of shape
(r, in), `...lora_B...` of shape (out, r), the layer computes x + s * B @ A @ x) plus tensors
trained whole (a classifier head: `modules_to_save`).

Two ways to combine K adapters with weights w_k (samples, normalised to sum 1):

- `fedavg`: the weighted mean of every tensor, A and B separately. Cheap, but the layer's update
  becomes mean(B) @ mean(A), which is not mean(B @ A): the cross terms B_j @ A_k (j != k) enter.
- `exact` (the default): for each LoRA pair the weighted mean of the products,
  D = sum_k w_k B_k @ A_k   (out, in), rank <= K*r,
  re-factored to the adapter's rank r by a truncated SVD, D ~ U_r S_r V_r^T, as
  B = U_r sqrt(S_r) (out, r), A = sqrt(S_r) V_r^T (r, in): the best rank-r approximation of the
  mean update (Eckart-Young), in a balanced factorisation. Tensors trained whole are averaged.

`product_error` says how far an aggregate's B @ A is from the exact weighted mean of the products
(relative Frobenius norm, over all pairs), the figure that tells the two apart on real updates.
"""

from __future__ import annotations

import numpy as np

METHODS = ("exact", "fedavg")


def lora_pairs(names) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({module: (A name, B name)}, [names trained whole]) from the adapter's tensor names."""
    a_names = {n.replace("lora_A", "\0"): n for n in names if "lora_A" in n}
    b_names = {n.replace("lora_B", "\0"): n for n in names if "lora_B" in n}
    pairs = {k: (a_names[k], b_names[k]) for k in a_names if k in b_names}
    paired = {n for ab in pairs.values() for n in ab}
    return pairs, sorted(n for n in names if n not in paired)


def normalise(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative, finite and not all zero: {list(weights)}")
    return w / w.sum()


def weighted_mean(arrays: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    out = np.zeros(arrays[0].shape, np.float64)
    for a, wk in zip(arrays, w):
        out += wk * a.astype(np.float64)
    return out.astype(np.float32)


def with_server_step(adapters: list[dict], weights, start: dict | None, server_lr: float) -> tuple[list[dict], np.ndarray]:
    """(adapters, coefficients) of the aggregate start + server_lr * (weighted mean - start): the
    weighted mean itself when server_lr is 1 (FedAvg); above 1, the round's mean step taken longer
    (a server learning rate, as in FedOpt): coefficients server_lr * w_k, and 1 - server_lr on the start."""
    w = normalise(weights)
    if start is None or server_lr == 1.0:
        return list(adapters), w
    return [*adapters, start], np.append(server_lr * w, 1.0 - server_lr)


def fedavg(adapters: list[dict], weights, start: dict | None = None, server_lr: float = 1.0) -> dict:
    """Every tensor's weighted mean, A and B separately."""
    ads, c = with_server_step(adapters, weights, start, server_lr)
    return {n: weighted_mean([a[n] for a in ads], c) for n in adapters[0]}


def mean_product(adapters: list[dict], w: np.ndarray, a_name: str, b_name: str) -> np.ndarray:
    """sum_k w_k B_k @ A_k, (out, in), in float64."""
    out = None
    for ad, wk in zip(adapters, w):
        p = wk * (ad[b_name].astype(np.float64) @ ad[a_name].astype(np.float64))
        out = p if out is None else out + p
    return out


def stacked(adapters: list[dict], c: np.ndarray, a_name: str, b_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(P (out, K*r), Q (K*r, in)) with P @ Q = sum_k c_k B_k @ A_k: the clients' factors side by side
    (c may be negative: a server step's weight on the start)."""
    p = np.concatenate([ck * ad[b_name].astype(np.float64) for ad, ck in zip(adapters, c)], axis=1)
    q = np.concatenate([ad[a_name].astype(np.float64) for ad in adapters], axis=0)
    return p, q


def small_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        return np.linalg.svd(m, full_matrices=False)
    except np.linalg.LinAlgError:  # LAPACK's divide and conquer can fail to converge; the eigenproblem of m^T m cannot
        s2, v = np.linalg.eigh(m.T @ m)
        order = np.argsort(s2)[::-1]
        s = np.sqrt(np.clip(s2[order], 0, None))
        v = v[:, order]
        u = (m @ v) / np.where(s > 0, s, 1.0)
        return u, s, v.T


def refactor(p: np.ndarray, q: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(B (out, r), A (r, in)) with B @ A the best rank-r approximation of p @ q, balanced: B and A
    carry the square root of each singular value, so neither factor dwarfs the other when training
    resumes. Computed from the factors, never the (out, in) product: QR of each side, then the SVD of
    a (K*r, K*r) matrix (the full product's SVD fails to converge on some real layers, and is slower)."""
    qp, rp = np.linalg.qr(p)  # p (out, k) = qp (out, k) rp (k, k)
    qq, rq = np.linalg.qr(q.T)  # q.T (in, k) = qq (in, k) rq (k, k)
    u, s, vt = small_svd(rp @ rq.T)  # p @ q = qp (u s vt) qq.T
    u, s, vt = qp @ u[:, :rank], s[:rank], vt[:rank] @ qq.T
    if len(s) < rank:  # fewer directions than the rank (one client, a narrow layer): pad with zero directions
        u = np.pad(u, ((0, 0), (0, rank - len(s))))
        vt = np.pad(vt, ((0, rank - len(s)), (0, 0)))
        s = np.pad(s, (0, rank - len(s)))
    root = np.sqrt(s)
    return (u * root).astype(np.float32), (root[:, None] * vt).astype(np.float32)


def exact(adapters: list[dict], weights, start: dict | None = None, server_lr: float = 1.0) -> dict:
    """The weighted mean of each pair's products B @ A, re-factored to the adapter's rank by SVD;
    tensors trained whole averaged."""
    ads, c = with_server_step(adapters, weights, start, server_lr)
    pairs, whole = lora_pairs(adapters[0])
    out = {n: weighted_mean([a[n] for a in ads], c) for n in whole}
    for a_name, b_name in pairs.values():
        rank = adapters[0][a_name].shape[0]
        out[b_name], out[a_name] = refactor(*stacked(ads, c, a_name, b_name), rank)
    return {n: out[n] for n in adapters[0]}  # the input's order


def aggregate(method: str, adapters: list[dict], weights, start: dict | None = None, server_lr: float = 1.0) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown aggregation {method!r}; one of {', '.join(METHODS)}")
    if not adapters:
        raise ValueError("nothing to aggregate")
    if server_lr <= 0:
        raise ValueError(f"the server step must be positive, not {server_lr}")
    return (exact if method == "exact" else fedavg)(adapters, weights, start, server_lr)


def product_error(aggregated: dict, adapters: list[dict], weights, start: dict | None = None) -> float:
    """||B @ A - sum_k w_k B_k @ A_k||_F over all LoRA pairs together, relative to ||sum_k w_k B_k @ A_k||_F,
    or, given the round's `start` adapter, to the size of the round's mean update ||sum_k w_k B_k @ A_k - B_0 @ A_0||_F
    (the devices share the start, so the products are close to each other and to it: the error that matters
    is against what the round changed)."""
    w = normalise(weights)
    pairs, _ = lora_pairs(aggregated)
    err = ref = 0.0
    for a_name, b_name in pairs.values():
        target = mean_product(adapters, w, a_name, b_name)
        got = aggregated[b_name].astype(np.float64) @ aggregated[a_name].astype(np.float64)
        err += float(np.sum((got - target) ** 2))
        base = start[b_name].astype(np.float64) @ start[a_name].astype(np.float64) if start is not None else 0.0
        ref += float(np.sum((target - base) ** 2))
    return float(np.sqrt(err / ref)) if ref > 0 else 0.0
