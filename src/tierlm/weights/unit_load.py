"""Load one unit tensor from a model source: its pieces concatenated by rows (fused q/k/v, gate/up) and, under
a quant scheme, quantised — without loss straight from GGUF blocks where the math allows (Q4_0/Q4_1 -> int4
g=32, Q8_0 -> int8 g=32), else from the dequantised values.

Peak memory while loading: the output plus one dense piece (pieces are copied into a preallocated output, or
quantised one at a time, ROW_CHUNK rows at a time)."""
from __future__ import annotations

import torch

from tierlm.errors import ModelFormatError
from tierlm.memory.units import UnitTensor
from tierlm.quant import QuantBlocks, from_blocks, quantize_blocks
from tierlm.quant.scheme import QuantScheme
from tierlm.quant.tensor import QuantTensor
from tierlm.weights.source import ModelSource


def _dense(source: ModelSource, spec: UnitTensor, names: list[str], dtype: torch.dtype) -> torch.Tensor:
    if len(names) == 1:
        out = source.load(names[0], dtype)
    else:
        out = torch.empty(spec.shape, dtype=dtype)
        at = 0
        for name in names:
            piece = source.load(name, dtype)
            if piece.shape[1:] != out.shape[1:] or at + piece.shape[0] > out.shape[0]:
                raise ModelFormatError(f"{source.path}: {name} has shape {tuple(piece.shape)}, "
                                       f"which does not fit {spec.leaf} {spec.shape}")
            out[at:at + piece.shape[0]] = piece
            at += piece.shape[0]
            del piece
        out = out[:at]
    if tuple(out.shape) != spec.shape:
        raise ModelFormatError(f"{source.path}: {'+'.join(names)} has shape {tuple(out.shape)}, "
                               f"the config implies {spec.shape}")
    return out


def load_unit_tensor(source: ModelSource, spec: UnitTensor, dtype: torch.dtype, quant: QuantScheme,
                     present: set[str]) -> torch.Tensor | QuantTensor | None:
    """The tensor `spec` in `dtype`, or quantised under `quant`; None when the source has none of its pieces
    (optional biases). A `dequantized` spec comes back dense: the quantised values in `dtype`."""
    names = [n for n in spec.source_names if n in present]
    if not names:
        return None
    scheme = spec.scheme(quant)  # NOTE: a dequantized spec (a tied embedding) takes its head's scheme
    if not scheme.enabled:
        return _dense(source, spec, names, dtype).contiguous()
    # Piece by piece (rows are quantised independently, so this equals quantising the fused matrix): only one
    # piece is ever dense in fp32. Pieces are packed together, as the int4 layout needs whole 64-row blocks.
    blocks = []
    for name in names:
        b = source.load_blocks(name, scheme)
        blocks.append(b if b is not None else quantize_blocks(source.load(name, torch.float32), scheme))
    out = from_blocks(QuantBlocks.concat(blocks))
    if out.shape != spec.shape:
        raise ModelFormatError(f"{source.path}: {'+'.join(names)} has shape {out.shape}, "
                               f"the config implies {spec.shape}")
    return out.dequantize(dtype) if spec.dequantized else out
