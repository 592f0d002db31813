"""ONNX Runtime's com.microsoft::ConvGrad in standard ops: the backward pass of a 2-D Conv.

For Y = Conv(X, W) (strides s, dilations d, pads p, group g) and the incoming gradient dY:

  dX  = ConvTranspose(dY, W; s, d, g, the begin pads only), cut to X's size and zero-padded up to
        it (rows and columns of X that no output window reached, when (H + p - d(k-1) - 1) is not a
        multiple of s): with the end pads the transposed conv would drop rows a window did read.
        It takes a Conv weight (Cout, Cin/g, kh, kw) as it is, group included, so depthwise
        convolutions need nothing more.
  dW  = the correlation of X with dY over the batch: the batch becomes the channel axis,
        Conv(X^T, dY^T) with the roles of stride and dilation swapped (stride d, dilation s,
        the same pads), cropped to the kernel. For a depthwise conv (Cin/g = 1) the same with
        group = channels, each channel's batch one group.
  dB  = dY summed over batch and space.

Two faster forms of the same arithmetic, where they apply: a stride-1 dX of an ungrouped or depthwise
conv as the Conv with the kernel flipped (ONNX Runtime's ConvTranspose is slow), and a pointwise dW
as one Gemm.

Only the gradients a graph uses are built (ORT leaves an unneeded output's name empty).
"""

from __future__ import annotations

import numpy as np

INT64_MIN = np.iinfo(np.int64).min


def conv_grad(rw, i: list[str], o: list[str], a: dict) -> None:
    dy, x, w = i[:3]
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"", ""):
        raise NotImplementedError(f"ConvGrad with auto_pad {a['auto_pad']}")
    kernel = list(a.get("kernel_shape", []))
    if len(kernel) != 2:
        raise NotImplementedError(f"ConvGrad of a {len(kernel)}-D convolution (2-D only)")
    strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    pads, group = list(a.get("pads", [0, 0, 0, 0])), int(a.get("group", 1))
    i64 = lambda v: rw.const(v, np.int64)  # noqa: E731
    want = lambda k: len(o) > k and bool(o[k])  # noqa: E731

    depthwise = group > 1 and (_dims(rw, w) or [0, 0])[:2] == [group, 1]
    flip_pads = [d * (k - 1) - p for d, k, p in zip(dilations * 2, kernel * 2, pads)]
    if want(0) and (group == 1 or depthwise) and strides == [1, 1] and min(flip_pads) >= 0:
        # stride 1: the transposed conv is the conv with the kernel flipped, its channel axes swapped (group 1)
        # and the pads mirrored. ONNX Runtime's Conv is far faster than its ConvTranspose (a grouped one took
        # 30-45 ms for 672 channels at 10 x 10, batch 16), and with a constant kernel it is its blocked-layout
        # (NCHWc) Conv, the flip folded once (BENCHMARKS.md section 12). A strided conv keeps the ConvTranspose:
        # putting zeros between dY's values costs more than the grouped ConvTranspose does (measured).
        kernel_t = w if kernel == [1, 1] else rw.op("Slice", [w, i64([-1, -1]), i64([INT64_MIN] * 2), i64([2, 3]), i64([-1, -1])])
        if group == 1:
            kernel_t = rw.op("Transpose", [kernel_t], perm=[1, 0, 2, 3])
        rw.op("Conv", [dy, kernel_t], o[0], dilations=dilations, pads=flip_pads, group=group, kernel_shape=kernel)
    elif want(0) and strides == [1, 1]:
        # stride 1: the transposed conv with the forward's pads is exactly X's size (most convolutions
        # of a MobileNet-style net: every pointwise one), so no cut and pad, and no copies of dX for them
        rw.op("ConvTranspose", [dy, w], o[0], strides=strides, dilations=dilations, pads=pads, group=group, kernel_shape=kernel)
    elif want(0) and (hw := _spatial_dims(rw, x)) is not None:
        # X's size known (an image bundle's fixed crop): output_padding adds the last rows a window read
        # past the transposed conv's natural size, in one op (no cut and pad copies of a large dX)
        extra = [(h + pads[a] + pads[a + 2] - ((k - 1) * d + 1)) % s for a, (h, k, d, s) in enumerate(zip(hw, kernel, dilations, strides))]
        rw.op("ConvTranspose", [dy, w], o[0], strides=strides, dilations=dilations, pads=pads, group=group, kernel_shape=kernel,
              output_padding=extra)
    elif want(0):
        # no end pads: the transposed conv then reaches every row the forward windows read; cut at X's
        # size, then zero rows no window reached
        begin = [pads[0], pads[1], 0, 0]
        full = rw.op("ConvTranspose", [dy, w], strides=strides, dilations=dilations, pads=begin, group=group, kernel_shape=kernel)
        x_shape = rw.op("Shape", [x])
        cut = rw.op("Slice", [full, i64([0, 0]), rw.op("Slice", [x_shape, i64([2]), i64([4])]), i64([2, 3])])
        missing = rw.op("Sub", [x_shape, rw.op("Shape", [cut])])  # (0, 0, dh, dw), >= 0
        rw.op("Pad", [cut, rw.op("Concat", [i64([0, 0, 0, 0]), missing], axis=0)], o[0], mode="constant")
    if want(1):
        dy_t = rw.op("Transpose", [dy], perm=[1, 0, 2, 3])  # (Cout, N, Ho, Wo): the batch as input channels
        x_t = rw.op("Transpose", [x], perm=[1, 0, 2, 3])  # (Cin, N, H, W)
        if group == 1 and kernel == [1, 1] and strides == [1, 1] and not any(pads):
            # a pointwise conv's dW is one product over batch and space, (Cout, N*H*W) x (Cin, N*H*W)^T:
            # a Gemm, where the Conv below would slide an H x W kernel once (48 ms for 157 MFLOP, section 12)
            flat = lambda t: rw.op("Reshape", [t, i64([0, -1])])  # noqa: E731
            dw = rw.op("Gemm", [flat(dy_t), flat(x_t)], transB=1)
            rw.op("Unsqueeze", [dw, i64([2, 3])], o[1])
        elif group == 1:
            r = rw.op("Conv", [x_t, dy_t], strides=dilations, dilations=strides, pads=pads)  # (Cin, Cout, kh', kw')
            cut = r if kernel == [1, 1] and strides == [1, 1] else rw.op("Slice", [r, i64([0, 0]), i64(kernel), i64([2, 3])])
            rw.op("Transpose", [cut], o[1], perm=[1, 0, 2, 3])
        else:
            shape = _dims(rw, w)
            if shape is None or shape[1] != 1 or shape[0] != group:
                raise NotImplementedError("ConvGrad weight gradient of a grouped convolution other than depthwise (multiplier 1)")
            stacked = rw.op("Reshape", [x_t, i64([1, -1, 0, 0])], allowzero=0)  # (1, C * N, H, W), channel-major
            r = rw.op("Conv", [stacked, dy_t], strides=dilations, dilations=strides, pads=pads, group=group)  # (1, C, kh', kw')
            cut = rw.op("Slice", [r, i64([0, 0]), i64(kernel), i64([2, 3])])
            rw.op("Transpose", [cut], o[1], perm=[1, 0, 2, 3])  # (C, 1, kh, kw)
    if want(2):
        rw.op("ReduceSum", [dy, i64([0, 2, 3])], o[2], keepdims=0)


def _dims(rw, name: str):
    """A value's shape where the graph states it (an initializer, an input, shape inference's value_info)."""
    for init in list(rw.graph.initializer) + rw.inits:
        if init.name == name:
            return list(init.dims)
    for v in list(rw.graph.input) + list(rw.graph.value_info):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            return [d.dim_value for d in v.type.tensor_type.shape.dim]
    return None


def _spatial_dims(rw, name: str):
    """(H, W) of a 4-D value when the graph states them as numbers, else None."""
    for v in list(rw.graph.value_info) + list(rw.graph.input):
        if v.name == name and v.type.tensor_type.HasField("shape"):
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
                return [dims[2].dim_value, dims[3].dim_value]
    return None
