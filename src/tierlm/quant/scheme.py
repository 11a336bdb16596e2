"""QuantScheme: the user's choice (`--quant {none,int8,int4} --group-size G`) and the rules derived from it.

Which matrices are quantised: the seven projection matrices of every layer and the lm_head. Norms, biases
and the embedding table stay in the compute dtype (a tied embedding reads its rows from the quantised head);
under a GGUF's own blocks the embedding keeps them too (its rows dequantised on lookup).
The lm_head is quantised to int8 per channel whatever the kind: it is the most sensitive matrix and
llama.cpp keeps it at 6-8 bits too. The scheme is written into the offload store's manifest; nothing is
ever inferred from a file name.
"""
from __future__ import annotations

from dataclasses import dataclass

from tierlm import native
from tierlm.errors import UsageError

KINDS = ("none", "int8", "int4")
AUTO = "auto"  # the default: a quantised GGUF runs in its own quantisation (QuantScheme.auto)
# `--quant auto` from a GGUF's dominant matrix type. Q4_0/Q4_1 (int4 g=32) and Q8_0 (int8 g=32) map without
# loss; other block types are requantised piece by piece to the nearest width that does not lose more than
# they did (4-bit and below -> int4, 5/6-bit -> int8 per channel); float files stay dense.
_AUTO_SCHEMES = {"Q4_0": ("int4", 32), "Q4_1": ("int4", 32), "Q8_0": ("int8", 32), "Q2_K": ("int4", 32),
                 "Q3_K": ("int4", 32), "Q4_K": ("int4", 32), "Q5_0": ("int8", None), "Q5_1": ("int8", None),
                 "Q5_K": ("int8", None), "Q6_K": ("int8", None), "IQ4_NL": ("int4", 32), "IQ4_XS": ("int4", 32)}
# A file whose dominant type is another of these (Q4_K_M's Q4_K/Q6_K/Q5_0 mix...) keeps every matrix in its own
# blocks ("ggml", quant/ggml.py) where the native library runs them: nothing requantised, llama.cpp's numbers.
_GGML_AUTO = ("Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")
_NORMS = ("attn_norm", "ffn_norm")  # vectors: never quantised
# Never quantised by a requantising scheme: the embedding (its rows are looked up: a tied one reads the head's),
# and vectors. A GGUF's own blocks ("ggml") keep the embedding too: its rows are dequantised when looked up.
_DENSE_LEAVES = ("embed", *_NORMS)
_INT4_EXACT = ("Q4_0", "Q4_1")  # GGUF types int4 g=32 holds without loss (a head of these keeps its blocks)
INT4_GROUPS = (32, 64, 128)  # what torch's CPU int4 kernel accepts (and K must be a multiple)
INT4_BLOCK_N = 64  # the CPU int4 layout packs rows in blocks of 64: N must be a multiple


@dataclass(frozen=True)
class QuantScheme:
    kind: str = "none"  # "none" | "int8" | "int4"
    group_size: int | None = None  # int8: None = one scale per output channel; int4: 32 | 64 | 128
    # The lm_head keeps int4 g=32: `--quant auto` on a GGUF whose output matrix is Q4_0/Q4_1 takes its own
    # blocks without loss (requantising 4-bit values to int8 per channel would add error, bytes and a minute
    # of load time at 7B) — else the head is int8 per channel.
    head_int4: bool = False
    # A Q8_0 lm_head keeps its own blocks (int8 g=32, lossless) where the native kernels run them (their
    # integer dot products are llama.cpp's for that matrix); torch's kernels want it per channel.
    head_q8: bool = False
    # kind "ggml", the file's scheme: (internal name, ggml type id, rows) of every matrix held in its blocks
    ggml_tensors: tuple[tuple[str, int, int], ...] = ()
    # kind "ggml", one matrix's scheme (for_unit): ((ggml type id, rows), ...) of its runs of rows
    runs: tuple[tuple[int, int], ...] = ()

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

    @classmethod
    def resolve(cls, kind: "str | QuantScheme | None", group_size: int | None, storage_types: dict[str, int],
                head_type: str | None = None,
                ggml_tensors: tuple[tuple[str, int, int], ...] = ()) -> "QuantScheme":
        """parse(), where "auto" (or None) picks the scheme that holds the model's stored weights best:
        `storage_types` counts tensors per stored type (ModelSource.storage_types()), `head_type` is the
        stored type of the lm_head (the embedding when tied), `ggml_tensors` the matrices the native kernels
        can run in their own blocks (ModelSource.ggml_tensors())."""
        if isinstance(kind, QuantScheme) or (kind or AUTO).lower() != AUTO:
            scheme = cls.parse(kind, group_size)
            # int4 g=32 asked of a file whose head is Q4_0/Q4_1: its own blocks are exact, int8 would not be
            lossless_head = scheme == cls("int4", 32) and head_type in _INT4_EXACT
            if scheme.enabled and head_type == "Q8_0" and _native():
                return cls(scheme.kind, scheme.group_size, head_q8=True)
            return cls("int4", 32, head_int4=True) if lossless_head else scheme
        if group_size is not None:
            raise UsageError("--group-size needs --quant int8 or int4 (auto follows the file)")
        quantised = {t: n for t, n in storage_types.items() if t in _AUTO_SCHEMES}
        if not quantised:
            return cls()
        dominant = max(quantised, key=lambda t: quantised[t])
        if dominant in _GGML_AUTO and ggml_tensors and native.layer_step_available():
            return cls("ggml", ggml_tensors=tuple(ggml_tensors))
        kind, group = _AUTO_SCHEMES[dominant]
        return cls(kind, group, head_int4=head_type in _INT4_EXACT, head_q8=head_type == "Q8_0" and _native())

    @classmethod
    def check(cls, kind: "str | QuantScheme | None", group_size: int | None) -> None:
        """Validate a user's choice before any model is opened (auto resolves later)."""
        if not isinstance(kind, QuantScheme) and (kind or AUTO).lower() == AUTO:
            cls.resolve(kind, group_size, {})
        else:
            cls.parse(kind, group_size)

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def bf16_activations(self) -> bool:
        """Whether "auto" computes in bf16: torch's fused int8/int4 kernels run 5-10x faster so. GGUF blocks
        ("ggml") take fp32 activations, as llama.cpp: their kernels quantise each row to 8 bits themselves (the
        same speed: Qwen2.5-Coder-0.5B decodes 25.3 tok/s either way), and a bf16 residual stream costs Gemma 3
        270M 1.7% perplexity (llama-perplexity's scheme: 8.756 in bf16, 8.614 in fp32, llama.cpp 8.655)."""
        return self.kind in ("int8", "int4")

    def __str__(self) -> str:
        if not self.enabled:
            return "none"
        if self.kind == "ggml":
            return "gguf-blocks"
        head = "+head-int4" if self.head_int4 else "+head-q8" if self.head_q8 else ""
        return f"{self.kind}-{'channel' if self.group_size is None else f'g{self.group_size}'}{head}"

    def for_unit(self, leaf: str, names: tuple[str, ...], shape: tuple[int, ...]) -> "QuantScheme":
        """The scheme of a unit's matrix `leaf` whose rows are the source tensors `names` (concatenated): under
        "ggml" its runs where every piece is held in its blocks, else dense; for_matrix otherwise."""
        if self.kind != "ggml":
            return self.for_matrix(leaf, shape)
        if len(shape) != 2 or leaf in _NORMS:  # the embedding keeps its blocks: rows dequantised on lookup
            return QuantScheme()
        table = {n: (t, r) for n, t, r in self.ggml_tensors}
        if not all(n in table for n in names):
            return QuantScheme()  # a piece in F16/F32 or a type the kernels lack: the whole matrix dense
        from tierlm.quant.ggml import merge  # noqa: PLC0415 - gguf-py is imported only where GGUF runs
        return QuantScheme("ggml", runs=merge(table[n] for n in names))

    def for_matrix(self, leaf: str, shape: tuple[int, ...]) -> "QuantScheme":
        """The scheme a matrix [N, K] named `leaf` gets: the head is int8 per channel; a matrix the int4
        layout cannot hold (N not a multiple of 64) or whose K no group size divides stays dense ("none");
        a K the requested group does not divide takes the largest smaller group that does."""
        if not self.enabled or len(shape) != 2 or leaf in _DENSE_LEAVES:
            return QuantScheme()
        if leaf == "lm_head":
            lossless = self.head_int4 and shape[0] % INT4_BLOCK_N == 0 and shape[1] % 32 == 0
            if self.head_q8 and shape[1] % 32 == 0:
                return QuantScheme("int8", 32)
            return QuantScheme("int4", 32) if lossless else QuantScheme("int8")
        n, k = shape
        if self.group_size is None:
            return self
        groups = [g for g in INT4_GROUPS if g <= self.group_size and k % g == 0]
        if not groups or (self.kind == "int4" and n % INT4_BLOCK_N):
            return QuantScheme()
        return QuantScheme(self.kind, max(groups))


def _native() -> bool:
    """Whether the integer-dot kernels are on. Not merely the library: multiplying the head with int8
    activations (its Q8_0 blocks, 18.468 ppl on the embedded model vs 18.518 per channel) flips the near-tie
    first token of "What is the capital of France?" ("L'Étoile" for "The"), so the default keeps W8A16 there."""
    return native.available()


def uses_native(kind: str, group_size: int, k: int) -> bool:
    """Whether a matrix of this kind and K runs on the integer-dot kernels (stored in its loaded form): int8 g=32
    (GGUF Q8_0 blocks, for which torch has no fused kernel) whenever the library is in use; int4 g=32 and int8
    per channel with TIERLM_NATIVE=1."""
    if k % 32 or not native.layer_step_available():
        return False
    return (kind == "int8" and group_size == 32) or native.available() and (group_size == 32 or group_size == k)
