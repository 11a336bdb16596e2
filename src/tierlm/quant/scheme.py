"""QuantScheme: the user's choice (`--quant {none,int8,int4} --group-size G`) and the rules derived from it.

Which matrices are quantised: the seven projection matrices of every layer and the lm_head. Norms, biases
and the embedding table stay in the compute dtype (a tied embedding reads its rows from the quantised head).
The lm_head is quantised to int8 per channel whatever the kind: it is the most sensitive matrix and
llama.cpp keeps it at 6-8 bits too. The scheme is written into the offload store's manifest; nothing is
ever inferred from a file name.
"""
from __future__ import annotations

from dataclasses import dataclass

from tierlm.errors import UsageError

KINDS = ("none", "int8", "int4")
INT4_GROUPS = (32, 64, 128)  # what torch's CPU int4 kernel accepts (and K must be a multiple)
INT4_BLOCK_N = 64  # the CPU int4 layout packs rows in blocks of 64: N must be a multiple


@dataclass(frozen=True)
class QuantScheme:
    kind: str = "none"  # "none" | "int8" | "int4"
    group_size: int | None = None  # int8: None = one scale per output channel; int4: 32 | 64 | 128

    @classmethod
    def parse(cls, kind: str | "QuantScheme" | None, group_size: int | None = None) -> "QuantScheme":
        if isinstance(kind, QuantScheme):
            return kind
        kind = (kind or "none").lower()
        if kind not in KINDS:
            raise UsageError(f"unknown quant {kind!r} (choose from {', '.join(KINDS)})")
        if kind == "none":
            if group_size is not None:
                raise UsageError("--group-size needs --quant int8 or int4")
            return cls()
        if kind == "int4" and group_size is None:
            group_size = 32
        if group_size is not None and group_size not in INT4_GROUPS:
            raise UsageError(f"group size must be one of {', '.join(map(str, INT4_GROUPS))}, got {group_size}")
        return cls(kind, group_size)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        if not self.enabled:
            return "none"
        return f"{self.kind}-{'channel' if self.group_size is None else f'g{self.group_size}'}"

    def for_matrix(self, leaf: str, shape: tuple[int, ...]) -> "QuantScheme":
        """The scheme a matrix [N, K] named `leaf` gets: the head is int8 per channel; a matrix the int4
        layout cannot hold (N not a multiple of 64) or whose K no group size divides stays dense ("none");
        a K the requested group does not divide takes the largest smaller group that does."""
        if not self.enabled or len(shape) != 2 or leaf in ("embed", "attn_norm", "ffn_norm"):
            return QuantScheme()
        if leaf == "lm_head":
            return QuantScheme("int8")
        n, k = shape
        if self.group_size is None:
            return self
        groups = [g for g in INT4_GROUPS if g <= self.group_size and k % g == 0]
        if not groups or (self.kind == "int4" and n % INT4_BLOCK_N):
            return QuantScheme()
        return QuantScheme(self.kind, max(groups))
