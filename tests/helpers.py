"""Shared helpers for the CPU tests: input generators, bit comparisons, float64 references.

Plain functions (no fixtures) so any test module can import them as
``from tests.helpers import ...``.
"""

from __future__ import annotations

import math

import torch

from mxrewrite.formats.e2m1 import e2m1_decode, unpack_nibbles
from mxrewrite.formats.e8m0 import e8m0_to_float32

# (mantissa bits, exponent of the smallest normal) of each element format, for ulp bounds
ELEMENT_GRID = {
    torch.float8_e4m3fn: (3, -6),
    torch.float8_e5m2: (2, -14),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wide_range(shape: tuple[int, ...], dtype: torch.dtype, seed: int, block: int = 16) -> torch.Tensor:
    """Gaussian values spread over about 2**-60 .. 2**60: a random exponent per ``block``
    consecutive elements and another per element, so blocks differ in scale and most
    blocks hold values far below their maximum (subnormal and flushed elements)."""
    g = generator(seed)
    *lead, last = shape
    block_exp = torch.randint(-50, 50, (*lead, last // block, 1), generator=g).float()
    elem_exp = torch.randint(-14, 4, (*lead, last // block, block), generator=g).float()
    x = torch.randn(*lead, last // block, block, generator=g) * torch.exp2(block_exp + elem_exp)
    return x.reshape(shape).to(dtype)


def edge_rows(block: int = 32) -> tuple[torch.Tensor, list[str]]:
    """float32 rows of ``block`` elements, one edge case each, and the names of the cases.

    The special values sit in the first 16 elements so that 16-element NVFP4 blocks see them too.
    """
    g = generator(1234)
    base = lambda: torch.randn(block, generator=g)  # noqa: E731
    f32 = torch.finfo(torch.float32)
    rows = {}
    rows["zeros"] = torch.zeros(block)
    rows["neg_zeros"] = torch.full((block,), -0.0)
    r = base(); r[5] = 3e38; rows["huge_near_fp32_max"] = r
    r = base(); r[5] = 1e30; rows["one_huge"] = r
    r = base(); r[2] = f32.max; r[3] = -f32.max; rows["fp32_max"] = r
    rows["fp32_subnormal"] = base() * 1e-39
    rows["deep_subnormal"] = base() * 1e-44
    r = torch.zeros(block); r[1] = 1e-45; rows["min_subnormal"] = r
    rows["tiny_normal_2^-120"] = base() * 2.0**-120
    rows["bf16_subnormal_2^-130"] = base() * 2.0**-130
    r = base(); r[3] = float("inf"); rows["plus_inf"] = r
    r = base(); r[3] = float("-inf"); rows["minus_inf"] = r
    r = base(); r[3] = float("nan"); rows["one_nan"] = r
    r = base(); r[3] = float("inf"); r[4] = float("-inf"); r[7] = float("nan"); rows["inf_and_nan"] = r
    rows["all_nan"] = torch.full((block,), float("nan"))
    r = base(); r[0] = 448.0; rows["exactly_448"] = r
    r = base(); r[0] = 57344.0; rows["exactly_57344"] = r
    rows["powers_of_two"] = torch.exp2(torch.arange(block, dtype=torch.float32) - block // 2)
    rows["gaussian"] = base()
    return torch.stack(list(rows.values())), list(rows)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor (any dtype), for bit-exact comparison."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    a, b = bits(ours), bits(theirs)
    if not torch.equal(a, b):
        bad = (a != b).nonzero()
        raise AssertionError(f"{what}: {len(bad)} bytes differ, first at {bad[0].tolist()} "
                             f"(ours {a[tuple(bad[0])].item():#04x}, theirs {b[tuple(bad[0])].item():#04x})")


def float32_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 at |x| (float64 result)."""
    x = x.float().abs()
    return (torch.nextafter(x, torch.tensor(float("inf"))) - x).double()


def ceil_log2(value: float) -> int:
    """Exact ceil(log2(value)) of a positive float, from its binary representation."""
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, mantissa in [0.5, 1)
    return exponent - 1 if mantissa == 0.5 else exponent


def half_ulp(v: torch.Tensor, mbits: int, min_exp: int) -> torch.Tensor:
    """Half the spacing of a float format with ``mbits`` mantissa bits at magnitude ``v`` (float64)."""
    v = v.double().abs()
    exp = torch.floor(torch.log2(torch.where(v > 0, v, 1.0)))
    exp = torch.clamp(exp, min=min_exp)
    return torch.exp2(exp - mbits - 1)


def e2m1_half_ulp(v: torch.Tensor) -> torch.Tensor:
    """Half the spacing of e2m1 at magnitude ``v``: grid 0.5 below 2, 1 below 4, 2 up to 6."""
    v = v.double().abs()
    return torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0)).double()


def mx_values64(data_u8: torch.Tensor, scales_u8: torch.Tensor, elem_dtype: torch.dtype,
                block_size: int) -> torch.Tensor:
    """Exact float64 values of an MX tensor given as raw bytes."""
    elems = data_u8.view(elem_dtype).double()
    scale = e8m0_to_float32(scales_u8).double()
    return (elems.unflatten(-1, (-1, block_size)) * scale.unsqueeze(-1)).flatten(-2)


def nvfp4_values64(packed: torch.Tensor, scales_u8: torch.Tensor, tensor_scale: torch.Tensor) -> torch.Tensor:
    """Exact float64 values of an NVFP4 tensor (block scale times tensor scale in float64)."""
    elems = e2m1_decode(unpack_nibbles(packed)).double()
    scale = scales_u8.view(torch.float8_e4m3fn).double() * tensor_scale.double()
    return (elems.unflatten(-1, (-1, 16)) * scale.unsqueeze(-1)).flatten(-2)


class MXCallCounter:
    """Counts, per replaced module, the calls that really took the fused path: every ``MXRMSNorm`` call, and
    every ``MXLinear`` call whose input was a ``NormCastTensor``; a plain input to an ``MXLinear`` is counted
    in ``own_cast`` when the linear casts it itself (``linears="all"``), else in ``plain_linears`` (it runs
    ``nn.Linear``)."""

    def __init__(self, model: torch.nn.Module):
        from mxrewrite.modules import MXLinear, MXRMSNorm, NormCastTensor

        self.norms: dict[str, int] = {}
        self.linears: dict[str, int] = {}
        self.plain_linears: dict[str, int] = {}
        self.own_cast: dict[str, int] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, MXRMSNorm):
                self._handles.append(module.register_forward_pre_hook(self._count(self.norms, name)))
            elif isinstance(module, MXLinear):
                def hook(module, args, name=name):
                    if isinstance(args[0], NormCastTensor):
                        target = self.linears
                    else:
                        target = self.own_cast if module.own_cast is not None else self.plain_linears
                    target[name] = target.get(name, 0) + 1
                self._handles.append(module.register_forward_pre_hook(hook))

    @staticmethod
    def _count(table: dict[str, int], name: str):
        def hook(*_):
            table[name] = table.get(name, 0) + 1
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
