"""Θ_d rebuilt on the device from a ``factors`` or ``driver`` reply, in numpy.

The cloud's generators (``stablesynth.models.generators``) are small: a few linear maps and one
elementwise or rank-r expansion. Their equations are restated here for one sample, reading the
weights of the bundle's ``generator.safetensors`` under the cloud's parameter names. For FiLM
the expansion is elementwise in the cloud's order, so Θ_d from ``factors`` is bit-identical to
the cloud's; where a matrix product is involved (low-rank ``U Vᵀ``, every ``driver`` reply) only
the summation order may differ (see docs/device.md for the measured differences).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Params = dict[str, np.ndarray]


def _linear(x: np.ndarray, weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """torch.nn.Linear: x Wᵀ + b."""
    return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]


def _need(factors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> None:
    if set(factors) != set(shapes):
        raise ValueError(f"factors {sorted(factors)} are not {sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(factors[name].shape) != shape:
            raise ValueError(f"factor {name!r} has shape {list(factors[name].shape)}, expected {list(shape)}")


class GeneratorDecoder:
    """``theta(factors)`` and ``theta_from_driver(d)`` of one generator kind (full, lowrank, film)."""

    def __init__(self, kind: str, weights: Mapping[str, np.ndarray], num_classes: int, hidden_dim: int) -> None:
        if kind not in ("full", "lowrank", "film"):
            raise ValueError(f"unknown generator {kind!r} (known: full, lowrank, film)")
        self.kind = kind
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        self.K, self.H = num_classes, hidden_dim
        expected = {"full": ("linear.weight", "linear.bias"),
                    "lowrank": ("W0", "b0", "code.weight", "code.bias", "u_map.weight", "u_map.bias",
                                "v_map.weight", "v_map.bias"),
                    "film": ("W0", "b0", "code.weight", "code.bias", "row_map.weight", "row_map.bias",
                             "col_map.weight", "col_map.bias")}[kind]
        missing = [k for k in expected if k not in self.w]
        if missing:
            raise ValueError(f"{kind} generator weights lack {missing}")
        if kind == "lowrank":
            self.rank = self.w["v_map.bias"].shape[0] // (self.H + 1)
        self.driver_dim = int(self.w["linear.weight" if kind == "full" else "code.weight"].shape[1])

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        K, H = self.K, self.H
        if self.kind == "full":
            return {"weight": (K, H), "bias": (K,)}
        if self.kind == "lowrank":
            return {"u": (K, self.rank), "v": (H, self.rank), "c": (self.rank,)}
        return {"row_scale": (K,), "row_shift": (K,), "col_scale": (H,)}

    def factors(self, driver: np.ndarray) -> Params:
        """The generator's factors of one driver d [driver_dim]."""
        d = np.asarray(driver, dtype=np.float32).reshape(1, -1)
        if d.shape[1] != self.driver_dim:
            raise ValueError(f"driver has {d.shape[1]} values, the generator takes {self.driver_dim}")
        K, H = self.K, self.H
        if self.kind == "full":
            flat = _linear(d, self.w, "linear")[0]
            return {"weight": flat[:K * H].reshape(K, H), "bias": flat[K * H:]}
        if self.kind == "lowrank":
            u = _linear(_linear(d, self.w, "code"), self.w, "u_map")[0].reshape(K, self.rank)
            vc = _linear(d, self.w, "v_map")[0].reshape(H + 1, self.rank)
            return {"u": u, "v": vc[:H], "c": vc[H]}
        row = _linear(_linear(d, self.w, "code"), self.w, "row_map")[0]
        return {"row_scale": row[:K], "row_shift": row[K:], "col_scale": _linear(d, self.w, "col_map")[0]}

    def theta(self, factors: Mapping[str, np.ndarray]) -> Params:
        """Θ_d = expand(factors): the cloud generator's ``expand`` for one sample."""
        _need(factors, self.factor_shapes())
        f = {k: np.asarray(v, dtype=np.float32) for k, v in factors.items()}
        if self.kind == "full":
            return {"weight": f["weight"].copy(), "bias": f["bias"].copy()}
        if self.kind == "lowrank":
            return {"weight": self.w["W0"] + f["u"] @ f["v"].T, "bias": self.w["b0"] + f["u"] @ f["c"]}
        g_row = np.float32(1.0) + f["row_scale"]
        g_col = np.float32(1.0) + f["col_scale"]
        # The cloud's order of operations, (W0 ⊙ g_row) ⊙ g_col, so the bits agree.
        return {"weight": self.w["W0"] * g_row[:, None] * g_col[None, :], "bias": self.w["b0"] * g_row + f["row_shift"]}

    def theta_from_driver(self, driver: np.ndarray) -> Params:
        return self.theta(self.factors(driver))
