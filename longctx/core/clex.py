"""CLEX (Chen et al., ICLR 2024): continuous length-extrapolation scaling — the pure math.

The log inverse frequencies ``x(t)`` of a rotary layer follow a learned ODE in the scale ``t ≥ 1``::

    dx/dt = act((x + log θ_ntk(t)) W_up) W_down + d/dt log θ_ntk(t),     x(1) = log(inv_freq)

where ``θ_ntk(t)`` are the NTK-aware inverse frequencies for ``α = 2t − 1`` and ``W_up`` (d/2 × p·d), ``W_down``
(p·d × d/2) are the learned weights. At inference the scale is ``t = ceil(n / L)`` (n the sequence length, L the
trained length), capped at ``max_factor``; the frequencies of ``t = 1 … max_factor`` are integrated once.

Reproduced from the reference (``CLEX/clex_layer.py``) where it changes numbers:

* the time embedding uses base 10000 whatever the model's ``rope_theta`` (``x(1)`` uses the model's own base);
* the integrator is torchdiffeq's fixed-grid ``rk4`` — the 3/8-rule Runge–Kutta step — on the grid
  ``1, 1 + dt, …`` built in fp32, its last point moved onto the last output time, outputs linearly interpolated
  between grid points.

With ``W_down = 0`` (no learned dynamics) the ODE is exactly ``d/dt log θ_ntk``: ``x(t) = log inv_freq +
log θ_ntk(t) − log θ_ntk(1)``, i.e. NTK scaling of the model's own base with ``α = 2t − 1`` (the 10000 cancels) —
see :func:`clex_training_free_table`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from .rope import default_inv_freq, ntk_base

__all__ = ["ACTIVATIONS", "clex_scale", "ntk_time_embedding", "clex_derivative", "rk4_fixed_grid",
           "clex_inv_freq_table", "clex_training_free_table", "log_scale_factor", "read_ode_weights", "ODE_KEYS", "TIME_EMBEDDING_BASE"]

ODE_KEYS = ("clex_layer.proj_func.ode_up_proj", "clex_layer.proj_func.ode_down_proj")  # in CLEX checkpoints
TIME_EMBEDDING_BASE = 10000.0  # the reference's time embedding ignores rope_theta
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"tanh": torch.tanh,
                                                                   "silu": torch.nn.functional.silu}


def clex_scale(seq_len: int, trained_length: int, max_factor: int) -> int:
    """``t = ceil(seq_len / L)``, at least 1, at most ``max_factor`` (the reference's inference rule)."""
    return max(1, min(int(max_factor), -(-int(seq_len) // int(trained_length))))


def ntk_time_embedding(t: torch.Tensor, dim: int, base: float = TIME_EMBEDDING_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d/dt θ_ntk(t), θ_ntk(t))``: NTK inverse frequencies for ``α = 2t − 1`` (``α = 1`` for ``t < 1``) and their
    time derivative, fp32, ``dim`` the rotary dim."""
    alpha = torch.ones_like(t) if bool(t < 1) else 2 * t - 1
    index = torch.arange(0, dim, 2, dtype=torch.float32, device=t.device)
    ntk_base = base * alpha ** (dim / (dim - 2))
    ntk_inv_freq = 1.0 / (ntk_base ** (index / dim))
    derivative = -2 * index / (dim - 2) * 1 / (base ** (index / dim) * (alpha ** (index / (dim - 2) + 1)))
    return derivative, ntk_inv_freq


def clex_derivative(t: torch.Tensor, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str,
                    dim: int) -> torch.Tensor:
    """``dx/dt`` of the CLEX ODE at scale ``t`` for log inverse frequencies ``x``."""
    d_theta, theta = ntk_time_embedding(t, dim)
    hidden = ACTIVATIONS[act]((x + torch.log(theta)) @ up.float())
    return hidden @ down.float() + d_theta / theta


def rk4_fixed_grid(func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], y0: torch.Tensor,
                   times: torch.Tensor, step: float) -> torch.Tensor:
    """torchdiffeq's ``odeint(func, y0, times, method="rk4", options={"step_size": step})``: 3/8-rule RK4 steps on
    a fixed fp32 grid, outputs linearly interpolated at ``times``; returns ``[len(times), *y0.shape]``."""
    start, end = times[0], times[-1]
    steps = int(torch.ceil((end - start) / step + 1).item())
    grid = torch.arange(0, steps, dtype=times.dtype, device=times.device) * step + start
    grid[-1] = end
    out = [y0]
    j, y = 1, y0
    third, two_thirds = 1 / 3, 2 / 3
    for t0, t1 in zip(grid[:-1], grid[1:]):
        dt = t1 - t0
        k1 = func(t0, y)
        k2 = func(t0 + dt * third, y + dt * k1 * third)
        k3 = func(t0 + dt * two_thirds, y + dt * (k2 - k1 * third))
        k4 = func(t1, y + dt * (k1 - k2 + k3))
        y1 = y + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
        while j < len(times) and t1 >= times[j]:
            t = times[j]
            if t == t0:
                out.append(y)
            elif t == t1:
                out.append(y1)
            else:
                out.append(y + (t - t0) / (t1 - t0) * (y1 - y))
            j += 1
        y = y1
    return torch.stack(out)


def clex_inv_freq_table(inv_freq: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str, max_factor: int,
                        time_dt: float) -> torch.Tensor:
    """``[max_factor, d/2]``: row ``t − 1`` holds the inverse frequencies at scale ``t`` (row 0: ``inv_freq``
    itself), integrated from the learned ODE weights; fp32."""
    if act not in ACTIVATIONS:
        raise ValueError(f"CLEX act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    dim = 2 * inv_freq.shape[-1]
    if tuple(up.shape) != (dim // 2, up.shape[1]) or tuple(down.shape) != (up.shape[1], dim // 2):
        raise ValueError(f"CLEX ODE weights of shapes {tuple(up.shape)} / {tuple(down.shape)} do not fit a rotary dim "
                         f"of {dim} (expected ({dim // 2}, p·{dim}) / (p·{dim}, {dim // 2}))")
    times = torch.arange(1.0, max_factor + 1.0, dtype=torch.float32, device=inv_freq.device)
    with torch.no_grad():
        solution = rk4_fixed_grid(lambda t, x: clex_derivative(t, x, up, down, act, dim),
                                  torch.log(inv_freq.float()), times, time_dt)
    return torch.exp(solution)


def clex_training_free_table(dim: int, base: float, max_factor: int) -> torch.Tensor:
    """The ``W_down = 0`` limit in closed form: row ``t − 1`` = NTK-aware inverse frequencies of the model's base
    with ``α = 2t − 1`` (exactly what ``ntk`` with ``alpha=2t−1`` computes; what :func:`clex_inv_freq_table`
    integrates to, within the integrator's error, when the dynamics are zero)."""
    return torch.stack([default_inv_freq(dim, ntk_base(base, 2.0 * t - 1, dim)) for t in range(1, int(max_factor) + 1)])


def log_scale_factor(kv_len: torch.Tensor | int, trained_length: int) -> torch.Tensor:
    """CLEX's query scale ``log(kv_len) / log(L)`` (the reference's flash-attention path; unclamped, so below 1 for
    inputs shorter than ``L``)."""
    return torch.log(torch.as_tensor(kv_len, dtype=torch.float32)) / math.log(trained_length)


def read_ode_weights(source: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ode_up_proj, ode_down_proj)`` from a CLEX checkpoint directory or a weights file (safetensors or torch
    ``.bin``), reading only those two tensors where the format allows."""
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if path.is_dir() else [path]
    found: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    suffix = next((k for k in ODE_KEYS if key.endswith(k)), None)
                    if suffix:
                        found[suffix] = f.get_tensor(key)
        elif file.exists():
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            found.update({k: state[key] for key in state for k in ODE_KEYS if key.endswith(k)})
        if len(found) == 2:
            return found[ODE_KEYS[0]].float(), found[ODE_KEYS[1]].float()
    raise FileNotFoundError(f"no CLEX ODE weights ({', '.join('…' + k for k in ODE_KEYS)}) in {path}")
