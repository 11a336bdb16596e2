"""Load one unit tensor from a model source: its pieces concatenated by rows (fused q/k/v, gate/up) and, under
a quant scheme, quantised — without loss straight from GGUF blocks where the math allows (Q4_0/Q4_1 -> int4
g=32, Q8_0 -> int8 g=32), else from the dequantised values — and put in kernel form.

Peak memory while loading: the output plus LOAD_THREADS + 1 row pieces (ModelSource.piece_rows: ~8 MiB of
fp32 each) and their temporaries. Pieces are read, converted and copied into the preallocated output one at
a time, so no tensor is ever whole in a dense or unpacked form (a 7B w_gateup dense in fp32 is 360 MiB).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from tierlm.errors import ModelFormatError
from tierlm.offload.units import UnitTensor
from tierlm.quant import QuantBlocks, from_blocks, kernels, quantize_blocks
from tierlm.quant.scheme import INT4_BLOCK_N, QuantScheme
from tierlm.quant.tensor import QuantTensor
from tierlm.weights.source import ModelSource


def _pieces(source: ModelSource, names: list[str]) -> Iterator[tuple[str, slice]]:
    for name in names:
        n, step = source.tensor_shape(name)[0], source.piece_rows(name)
        for r in range(0, n, step):
            yield name, slice(r, min(n, r + step))


def _shape_error(source: ModelSource, spec: UnitTensor, names: list[str], shape: tuple[int, ...]) -> ModelFormatError:
    what = " + ".join(source.file_name(n) for n in names)
    return ModelFormatError(f"{source.path}: tensor {what} has shape {shape}, the metadata implies {spec.shape}")


def _check_rows(source: ModelSource, spec: UnitTensor, names: list[str]) -> None:
    shapes = [source.tensor_shape(n) for n in names]
    rows = sum(s[0] for s in shapes)
    if any(tuple(s[1:]) != spec.shape[1:] for s in shapes) or rows != spec.shape[0]:
        got = (rows, *shapes[0][1:]) if len(names) > 1 else tuple(shapes[0])
        raise _shape_error(source, spec, names, got)


def _dense(source: ModelSource, spec: UnitTensor, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    _check_rows(source, spec, names)
    if len(spec.shape) < 2:
        return torch.cat([source.load(n, dtype) for n in names]) if len(names) > 1 else source.load(names[0], dtype)
    out = torch.empty(spec.shape, dtype=dtype)
    at = 0
    for name, rows in _pieces(source, names):
        n = rows.stop - rows.start
        source.load(name, dtype, rows, out=out[at:at + n])  # rows of a contiguous tensor are contiguous
        at += n
    return out


def _row_axis(t: QuantTensor, part: str) -> int:
    return 1 if part == "kernel_scales" and t.kind == "int4" else 0  # int4 kernel scales are [G, N, 2]


def _assemble(pieces: Iterator[QuantTensor], n: int) -> QuantTensor:
    """Pieces of consecutive rows (kernel form) copied into one matrix of `n` rows, allocated once."""
    out: dict[str, torch.Tensor] = {}
    first, at = None, 0
    for p in pieces:
        if first is None:
            first = p
            for name, t in p.parts().items():
                shape = list(t.shape)
                shape[_row_axis(p, name)] = n
                out[name] = torch.empty(shape, dtype=t.dtype)
        rows = p.shape[0]
        for name, t in p.parts().items():
            out[name].narrow(_row_axis(p, name), at, rows).copy_(t)
        at += rows
    assert first is not None and at == n, "pieces must cover every row"
    return QuantTensor(first.kind, (n, first.shape[1]), first.group_size, out["qweight"], out.get("scales"),
                       out.get("mins"), out.get("kernel_scales"))


LOAD_THREADS = 2  # pieces converted at once: numpy/torch release the GIL, and loading a 7B file is CPU-bound


def _ahead(fn, items: list[tuple[str, slice]]) -> Iterator[QuantTensor]:
    """fn(*item) for every item, in order, LOAD_THREADS at a time: at most LOAD_THREADS + 1 pieces are in memory
    beyond the output (one being copied into it, the others converting). Pieces are independent."""
    if len(items) < 2:
        yield from (fn(*it) for it in items)
        return
    with ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="tierlm-load") as pool:
        pending = deque(pool.submit(fn, *it) for it in items[:LOAD_THREADS])
        for it in items[LOAD_THREADS:]:
            yield pending.popleft().result()  # copied into the output before the next piece starts
            pending.append(pool.submit(fn, *it))
        while pending:
            yield pending.popleft().result()


def _blocks(source: ModelSource, name: str, rows: slice, scheme: QuantScheme) -> QuantBlocks:
    b = source.load_blocks(name, scheme, rows)
    return b if b is not None else quantize_blocks(source.load(name, torch.float32, rows), scheme)


def load_unit_tensor(source: ModelSource, spec: UnitTensor, dtype: torch.dtype, quant: QuantScheme,
                     present: set[str]) -> torch.Tensor | QuantTensor | None:
    """The tensor `spec` in `dtype`, or quantised under `quant` in kernel form for activations in `dtype`; None
    when the source has none of its pieces (optional biases). A `dequantized` spec comes back dense: the
    quantised values in `dtype`."""
    names = [n for n in spec.source_names if n in present]
    if not names:
        return None
    scheme = spec.scheme(quant)  # NOTE: a dequantized spec (a tied embedding) takes its head's scheme
    if not scheme.enabled:
        return _dense(source, spec, names, dtype).contiguous()
    _check_rows(source, spec, names)
    if scheme.kind == "ggml":  # the file's blocks as they are (quant/ggml.py)
        out = source.load_ggml(names)
        return out.dequantize_in_pieces(dtype, kernels.piece_rows(out)) if spec.dequantized else out
    # NOTE: kernel form from here on (see quant/tensor.py): resident units, stored units and a tied head's dense
    # embedding copy all hold the numbers the kernel multiplies with, so every path computes with one matrix.
    ready = lambda b: kernels.prepare(from_blocks(b), dtype)  # noqa: E731
    if scheme.kind == "int4" and any(source.tensor_shape(n)[0] % INT4_BLOCK_N for n in names):
        # a piece of rows not in whole 64-row blocks (tiny models' k/v): concatenate before packing (small)
        out = ready(QuantBlocks.concat([_blocks(source, n, slice(None), scheme) for n in names]))
    else:
        def piece(name: str, rows: slice) -> QuantTensor:
            packed = source.load_packed(name, scheme, rows)
            return kernels.prepare(packed, dtype) if packed is not None else ready(_blocks(source, name, rows, scheme))
        out = _assemble(_ahead(piece, list(_pieces(source, names))), spec.shape[0])
    return out.dequantize_in_pieces(dtype, kernels.piece_rows(out)) if spec.dequantized else out
