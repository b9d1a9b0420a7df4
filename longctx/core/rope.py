"""Pure RoPE math: inverse frequencies, bases and attention factors for every frequency-scaling method.

Nothing here imports transformers. Every function works in float32 (frequencies, positions) and mirrors the
formula named in its docstring; ``tests/core`` checks each against the formula and against transformers' own
``ROPE_INIT_FUNCTIONS``.

Notation: ``dim`` is the *rotary* dimension (``head_dim * partial_rotary_factor``), ``base`` is θ (``rope_theta``),
``factor`` is the extension ratio s = target length / trained length, ``original_length`` is the trained length L.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "default_inv_freq",
    "pi_inv_freq",
    "ntk_base",
    "dynamic_ntk_base",
    "dynamic_ntk_inv_freq",
    "yarn_correction_range",
    "yarn_inv_freq",
    "yarn_attention_factor",
    "resolve_factor",
    "rotate_by_angles",
    "rotation_tables",
    "ntk_factors",
    "apply_rotation",
]


def _exponents(dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``2i / dim`` for i = 0 … dim/2 − 1, in float32 (computed from int64 like transformers does)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"rotary dim must be an even number >= 2, got {dim}")
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def default_inv_freq(dim: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Original RoPE: ``θ_i = base^(−2i/dim)``."""
    return 1.0 / (base ** _exponents(dim, device))


def pi_inv_freq(dim: int, base: float, factor: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): positions divided by ``factor`` ≡ frequencies divided by it."""
    _check_factor(factor)
    return default_inv_freq(dim, base, device) / factor


def ntk_base(base: float, factor: float, dim: int) -> float:
    """Static NTK-aware scaling: ``base · s^(dim/(dim−2))`` (bloc97)."""
    _check_factor(factor)
    return float(base * factor ** (dim / (dim - 2)))


def dynamic_ntk_base(base: float, factor: float, dim: int, seq_len: int, original_length: int) -> float:
    """Dynamic NTK (emozilla; transformers' ``dynamic`` rope type) for a sequence of ``seq_len`` tokens.

    ``α = s · n / L − (s − 1)`` with n = max(seq_len, L), base' = base · α^(dim/(dim−2)). At n ≤ L the base is unchanged.
    """
    _check_factor(factor)
    n = max(int(seq_len), int(original_length))
    alpha = factor * n / original_length - (factor - 1)
    return float(base * alpha ** (dim / (dim - 2)))


def dynamic_ntk_inv_freq(
    dim: int, base: float, factor: float, seq_len: int, original_length: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Inverse frequencies of dynamic NTK at ``seq_len`` tokens (see :func:`dynamic_ntk_base`)."""
    return default_inv_freq(dim, dynamic_ntk_base(base, factor, dim, seq_len, original_length), device)


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_length: int, truncate: bool = True
) -> tuple[float, float]:
    """YaRN's ramp bounds: the rotary dims that turn ``beta_fast`` and ``beta_slow`` times over ``original_length``.

    ``d(r) = dim · ln(L / (2π r)) / (2 ln base)``; with ``truncate`` the bounds are floored/ceiled (transformers'
    default); clamped to [0, dim − 1].
    """

    def dim_for(rotations: float) -> float:
        return (dim * math.log(original_length / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """YaRN "NTK-by-parts" frequencies (Peng et al. 2023, eq. 17–18).

    Dims that rotate more than ``beta_fast`` times over L keep their frequency (extrapolation), dims that rotate
    fewer than ``beta_slow`` times are divided by ``factor`` (interpolation), a linear ramp blends between.
    """
    _check_factor(factor)
    low, high = yarn_correction_range(beta_fast, beta_slow, dim, base, original_length, truncate)
    if low == high:
        high += 0.001  # same singularity guard as the reference
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).to(device=device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_extrapolation = 1.0 / pos_freqs
    inv_interpolation = 1.0 / (factor * pos_freqs)
    return inv_interpolation * (1 - extrapolation_weight) + inv_extrapolation * extrapolation_weight


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's attention temperature ``√(1/t) = 0.1 · ln(s) + 1`` (applied to cos/sin, so to q·k squared).

    With DeepSeek-style ``mscale``/``mscale_all_dim`` both set: ``m(s, mscale) / m(s, mscale_all_dim)``.
    """

    def m(scale: float, ms: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * ms * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(m(factor, mscale) / m(factor, mscale_all_dim))
    return m(factor)


def resolve_factor(trained_length: int, factor: float | None = None, target_length: int | None = None) -> float:
    """The extension ratio from either ``factor`` or ``target_length`` (exactly one, or both consistent).

    ``target_length / trained_length``; errors say what was wrong (factor < 1, target ≤ trained length).
    """
    if factor is None and target_length is None:
        raise ValueError("give either factor=… or target_length=… (the context length you need)")
    if target_length is not None:
        target_length = int(target_length)
        if target_length <= trained_length:
            raise ValueError(
                f"target_length={target_length} is not longer than the model's trained length {trained_length}; "
                "nothing to extend"
            )
        from_target = target_length / trained_length
        if factor is not None and not math.isclose(float(factor), from_target, rel_tol=1e-9):
            raise ValueError(
                f"factor={factor} and target_length={target_length} disagree (target/trained = {from_target:g}); "
                "give one of them"
            )
        return float(from_target)
    _check_factor(factor)
    return float(factor)


def ntk_factors(rotary_dim: int, factor: float) -> list[float]:
    """Static NTK as per-dimension frequency factors (LongRoPE's form): θ' = θ·s^(d/(d−2)) divides the frequency of
    pair i by λ_i = s^(2i/(d−2)), i = 0 … d/2 − 1 (λ_0 = 1: the fastest dimension keeps its frequency)."""
    d = int(rotary_dim)
    if d < 4:
        return [1.0] + [float(factor)] * (d // 2 - 1)
    return [float(factor) ** (2 * i / (d - 2)) for i in range(d // 2)]


def rotation_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of per-pair ``angles`` (fp32, ``[..., rot_dim // 2]``: one entry per rotated pair)."""
    angles = angles.float()
    return angles.cos(), angles.sin()


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x`` (rotate-half layout) by precomputed per-pair tables
    (see :func:`rotation_tables`): ``x1·cos − x2·sin, x2·cos + x1·sin``. fp32 arithmetic, written in place into one
    output buffer (four fused passes; no rotate-half copy), returned in ``x.dtype``."""
    half = cos.shape[-1]
    rot_dim = 2 * half
    r = x[..., :rot_dim].float()
    x1, x2 = r[..., :half], r[..., half:]
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        # autograd (training, LoRA): out= ops have no backward; the same arithmetic out of place
        parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if rot_dim < x.shape[-1]:
            parts.append(x[..., rot_dim:].float().expand(*parts[0].shape[:-1], -1))
        return torch.cat(parts, -1).to(x.dtype)
    shape = torch.broadcast_shapes(r.shape[:-1] + (half,), cos.shape)
    out = torch.empty(shape[:-1] + (x.shape[-1],), dtype=torch.float32, device=x.device)
    o1, o2 = out[..., :half], out[..., half:rot_dim]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)
    if rot_dim < x.shape[-1]:
        out[..., rot_dim:] = x[..., rot_dim:]
    return out.to(x.dtype)


def rotate_by_angles(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the rotary part of ``x`` (rotate-half layout) by per-pair ``angles``.

    ``x``: ``[..., rot_dim + pass_dim]``; ``angles``: broadcastable to ``[..., rot_dim // 2]`` (fp32).
    Returns ``x`` with its first ``rot_dim`` dims rotated — the same convention as transformers'
    ``apply_rotary_pos_emb`` (``x·cos + rotate_half(x)·sin``). Computed in fp32, returned in ``x.dtype``.
    """
    cos, sin = rotation_tables(angles)
    return apply_rotation(x, cos, sin)


def _check_factor(factor: float | None) -> None:
    if factor is None or not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise ValueError(f"factor must be a number >= 1, got {factor!r}")
    if factor < 1:
        raise ValueError(
            f"factor must be >= 1 (it is target length / trained length), got {factor}; "
            "longctx extends context, it does not shrink it"
        )
