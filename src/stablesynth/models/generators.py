"""Generators f_h: the driver d → the device's dynamic parameters Θ_d (Eq. 3).

Generators are told the target shapes (a sequence of :class:`ParamSpec`); none is
hand-wired to the device model. Registry names: ``full``, ``lowrank``, ``film``.

Cost at K = 1501, d = 96 (FLOPs of ``factors`` for one driver, counted with
``torch.utils.flop_counter``): ``full`` 27.95 M (DUET's generator), ``lowrank``
(rank 4, code 16) 0.27 M, ``film`` (code 16) 0.12 M; the projector f_p adds 0.055 M.
``lowrank`` and ``film`` start from a shared W0/b0 that the device caches (``shared()``), so the cloud
sends only ``factor_numel`` floats per sample instead of 97·K.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from stablesynth.models.device import ParamSpec
from stablesynth.registry import Registry

GENERATORS: Registry[type[Generator]] = Registry("generator")


def _check_driver(driver: torch.Tensor, driver_dim: int) -> None:
    if driver.dim() != 2 or driver.shape[1] != driver_dim:
        raise ValueError(f"driver must be [B, {driver_dim}], got {tuple(driver.shape)}")


def _check_init(specs: Sequence[ParamSpec], init: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a {name: tensor} start point against the specs (every spec present, shapes, finite)."""
    out = {}
    names = {s.name for s in specs}
    unknown = sorted(set(init) - names)
    if unknown:
        raise ValueError(f"init has unknown tensor {unknown[0]!r} (expected {sorted(names)})")
    for spec in specs:
        if spec.name not in init:
            raise ValueError(f"init is missing tensor {spec.name!r}")
        t = torch.as_tensor(init[spec.name]).detach().float()
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"init[{spec.name!r}] has shape {tuple(t.shape)}, expected {spec.shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"init[{spec.name!r}] contains NaN or inf")
        out[spec.name] = t
    return out


class Generator(nn.Module):
    """Base: ``forward(driver [B, d]) -> {spec.name: [B, *spec.shape]}``.

    ``factors``/``expand`` split the map into what the cloud sends and what the
    device computes from tensors it caches once (``shared``); for ``full`` the
    factors are Θ_d itself and nothing is shared.
    """

    def __init__(self, specs: Sequence[ParamSpec], driver_dim: int,
                 init: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if not specs:
            raise ValueError("a generator needs at least one ParamSpec")
        if driver_dim < 1:
            raise ValueError(f"driver_dim must be >= 1, got {driver_dim}")
        self.specs = tuple(specs)
        self.driver_dim = driver_dim

    def forward(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.expand(self.factors(driver))

    def factors(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def expand(self, factors: Mapping[str, torch.Tensor],
               out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Θ_d from ``factors``; with ``out`` (``{spec.name: [B, *spec.shape]}``, no autograd) written
        into those tensors, which are returned, so a caller can expand straight into its own buffer."""
        raise NotImplementedError

    def shared(self) -> dict[str, torch.Tensor]:
        return {}

    def reset_base(self, init: Mapping[str, torch.Tensor]) -> None:
        """Restart from ``init`` (e.g. the stage-1 head): a fresh generator then outputs it for any driver."""
        raise NotImplementedError

    #: Names of the parameters that hold the base Θ (what a zero modulation outputs), not the modulation.
    base_parameter_names: tuple[str, ...] = ("W0", "b0")

    def magnitude_bound(self, factors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """An upper bound ``[B]`` (float64) on every |value| of each sample's Θ_d as :meth:`expand`
        computes it in float32, from the factors alone (no pass over Θ_d); ``None`` where this
        generator has no cheap bound. A non-finite bound says nothing (the factors hold NaN/Inf).

        It lets an encoder skip the checks a bounded Θ_d cannot fail (finite, within fp16's range).
        """
        return None

    def scaled_bases(self, factors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        """The outputs of the form ``base ⊙ row colᵀ``: ``{name: (base [r, c], row [B, r], col [B, c])}``,
        each value computed by :meth:`expand` as ``(base[i, j] · row[i]) · col[j]`` in float32.

        An encoder may write these outputs itself in one pass (serving/kernels.py) and ask
        :meth:`expand` for the others only, by leaving them out of ``out``. None by default.
        """
        return {}

    def _abs_max(self, name: str) -> float:
        """max |base parameter ``name``|, remembered until it changes: a pass over W0 costs as much
        as the checks a bound saves (in-place updates bump ``_version``; a new tensor has a new address)."""
        t = getattr(self, name)
        key = (t.data_ptr(), t._version)
        cache = self.__dict__.setdefault("_abs_max_cache", {})
        if cache.get(name, (None,))[0] != key:
            cache[name] = (key, float(t.detach().abs().max()) if t.numel() else 0.0)
        return cache[name][1]

    @property
    def factor_numel(self) -> int:
        """Floats the cloud sends per sample (the factors)."""
        raise NotImplementedError


def _weight_bias_specs(specs: Sequence[ParamSpec], kind: str) -> tuple[ParamSpec, ParamSpec]:
    """lowrank/film modulate one matrix [K, H] and its bias [K]; find them among the specs."""
    mats = [s for s in specs if len(s.shape) == 2]
    vecs = [s for s in specs if len(s.shape) == 1]
    if len(specs) != 2 or len(mats) != 1 or len(vecs) != 1 or vecs[0].shape[0] != mats[0].shape[0]:
        raise ValueError(f"{kind} generator needs exactly a weight [K, H] and a bias [K], got {list(specs)}")
    return mats[0], vecs[0]


#: Relative slack on a bound for float32 rounding: a few roundings of at most 2⁻²⁴ each, and rank-r sums.
_BOUND_SLACK = 1.0 + 1e-4


def _row_abs_max(t: torch.Tensor) -> torch.Tensor:
    """max |t| per sample (leading dimension), in float64."""
    return t.detach().reshape(t.shape[0], -1).abs().amax(dim=1).double()


def _default_linear_init(K: int, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    # nn.Linear(H, K)'s own init, so an untrained base behaves like an untrained head.
    layer = nn.Linear(H, K)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _copy_into(out: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, t in theta.items():
        out[name].copy_(t)
    return {name: out[name] for name in theta}


@GENERATORS.register("full")
class FullGenerator(Generator):
    """Θ_d = reshape(A d + a): one linear map to every generated float (DUET's generator, 2·d·Σnumel FLOPs).

    With ``init`` the map's bias starts at Θ_init and its weight at zero, so the fresh
    generator outputs the stage-1 head and the weight still gets gradient (∂/∂A = g dᵀ).
    """

    def __init__(self, specs: Sequence[ParamSpec], driver_dim: int,
                 init: Mapping[str, torch.Tensor] | None = None, rank: int = 0, code_dim: int = 0) -> None:
        super().__init__(specs, driver_dim, init)
        del rank, code_dim  # accepted so every generator takes the same keyword arguments
        self.total = sum(s.numel for s in self.specs)
        # Θ_d = A d + a: the bias a is the base Θ, A the modulation.
        self.base_parameter_names = ("linear.bias",)
        self.linear = nn.Linear(driver_dim, self.total)
        if init is not None:
            self.reset_base(init)

    def reset_base(self, init: Mapping[str, torch.Tensor]) -> None:
        checked = _check_init(self.specs, init)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.copy_(torch.cat([checked[s.name].reshape(-1) for s in self.specs]))

    def factors(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_driver(driver, self.driver_dim)
        flat = self.linear(driver)
        out, start = {}, 0
        for s in self.specs:
            out[s.name] = flat[:, start:start + s.numel].reshape(-1, *s.shape)
            start += s.numel
        return out

    def expand(self, factors: Mapping[str, torch.Tensor],
               out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        theta = {s.name: factors[s.name] for s in self.specs}
        return theta if out is None else _copy_into(out, theta)

    @property
    def factor_numel(self) -> int:
        return self.total


@GENERATORS.register("lowrank")
class LowRankGenerator(Generator):
    """[W | b] = [W0 | b0] + U(d) [V(d) ; c(d)]ᵀ with U: K×r, V: H×r, c: r.

    The bias shift lives in U's column space (c is V's extra row), so it costs r
    floats instead of K. U(d) = U_b + Σ_j z_j U_j with z = Linear(d, code_dim):
    a direct Linear(d, K·r) would cost 2·d·K·r FLOPs, over the 0.62 M budget for r > 1.
    V's map starts at zero: a fresh generator outputs W0/b0 exactly, and U's
    random start gives V gradient from the first step.
    """

    def __init__(self, specs: Sequence[ParamSpec], driver_dim: int,
                 init: Mapping[str, torch.Tensor] | None = None, rank: int = 4, code_dim: int = 16) -> None:
        super().__init__(specs, driver_dim, init)
        if rank < 1 or code_dim < 1:
            raise ValueError(f"rank and code_dim must be >= 1, got rank={rank}, code_dim={code_dim}")
        self.weight_spec, self.bias_spec = _weight_bias_specs(self.specs, "lowrank")
        K, H = self.weight_spec.shape
        self.K, self.H, self.rank = K, H, rank
        w0, b0 = _default_linear_init(K, H)
        self.W0 = nn.Parameter(w0)
        self.b0 = nn.Parameter(b0)
        self.code = nn.Linear(driver_dim, code_dim)
        self.u_map = nn.Linear(code_dim, K * rank)
        self.v_map = nn.Linear(driver_dim, (H + 1) * rank)
        with torch.no_grad():
            # Unit-scale U entries so that U Vᵀ has the scale of W0's entries once V moves.
            nn.init.normal_(self.u_map.weight, std=1.0 / math.sqrt(code_dim))
            nn.init.normal_(self.u_map.bias, std=1.0)
            self.v_map.weight.zero_()
            self.v_map.bias.zero_()
        if init is not None:
            self.reset_base(init)

    def reset_base(self, init: Mapping[str, torch.Tensor]) -> None:
        checked = _check_init(self.specs, init)
        with torch.no_grad():
            self.W0.copy_(checked[self.weight_spec.name])
            self.b0.copy_(checked[self.bias_spec.name])
            self.v_map.weight.zero_()
            self.v_map.bias.zero_()

    def shared(self) -> dict[str, torch.Tensor]:
        return {self.weight_spec.name: self.W0.detach(), self.bias_spec.name: self.b0.detach()}

    def factors(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_driver(driver, self.driver_dim)
        B = driver.shape[0]
        u = self.u_map(self.code(driver)).reshape(B, self.K, self.rank)
        vc = self.v_map(driver).reshape(B, self.H + 1, self.rank)
        return {"u": u, "v": vc[:, : self.H], "c": vc[:, self.H]}

    def expand(self, factors: Mapping[str, torch.Tensor],
               out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        u, v, c = factors["u"], factors["v"], factors["c"]
        weight = self.W0 + torch.bmm(u, v.transpose(1, 2))
        bias = self.b0 + torch.bmm(u, c.unsqueeze(-1)).squeeze(-1)
        theta = {self.weight_spec.name: weight, self.bias_spec.name: bias}
        return theta if out is None else _copy_into(out, theta)

    def magnitude_bound(self, factors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        # |W0 + U Vᵀ| <= max|W0| + r max|U| max|V|; |b0 + U c| <= max|b0| + r max|U| max|c|.
        u = _row_abs_max(factors["u"]) * self.rank
        weight = self._abs_max("W0") + u * _row_abs_max(factors["v"])
        bias = self._abs_max("b0") + u * _row_abs_max(factors["c"])
        return torch.maximum(weight, bias) * _BOUND_SLACK

    @property
    def factor_numel(self) -> int:
        return self.K * self.rank + (self.H + 1) * self.rank


@GENERATORS.register("film")
class FiLMGenerator(Generator):
    """W = W0 ⊙ (1 + γ_row(d)) (1 + γ_col(d))ᵀ, b = b0 ⊙ (1 + γ_row(d)) + β(d).

    γ_row and β (K each) come from a shared code z = Linear(d, code_dim), keeping the
    K-sized maps at 2·code_dim·K FLOPs; γ_col (H) is a direct map of d. The last
    layers of all three start at zero, so a fresh generator outputs W0/b0 exactly;
    they still get gradient because the code layer and d are non-zero.
    """

    def __init__(self, specs: Sequence[ParamSpec], driver_dim: int,
                 init: Mapping[str, torch.Tensor] | None = None, code_dim: int = 16, rank: int = 0) -> None:
        super().__init__(specs, driver_dim, init)
        del rank  # accepted so every generator takes the same keyword arguments
        if code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        self.weight_spec, self.bias_spec = _weight_bias_specs(self.specs, "film")
        K, H = self.weight_spec.shape
        self.K, self.H = K, H
        w0, b0 = _default_linear_init(K, H)
        self.W0 = nn.Parameter(w0)
        self.b0 = nn.Parameter(b0)
        self.code = nn.Linear(driver_dim, code_dim)
        self.row_map = nn.Linear(code_dim, 2 * K)
        self.col_map = nn.Linear(driver_dim, H)
        self._zero_modulation()
        if init is not None:
            self.reset_base(init)

    def _zero_modulation(self) -> None:
        with torch.no_grad():
            for layer in (self.row_map, self.col_map):
                layer.weight.zero_()
                layer.bias.zero_()

    def reset_base(self, init: Mapping[str, torch.Tensor]) -> None:
        checked = _check_init(self.specs, init)
        with torch.no_grad():
            self.W0.copy_(checked[self.weight_spec.name])
            self.b0.copy_(checked[self.bias_spec.name])
        self._zero_modulation()

    def shared(self) -> dict[str, torch.Tensor]:
        return {self.weight_spec.name: self.W0.detach(), self.bias_spec.name: self.b0.detach()}

    def factors(self, driver: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_driver(driver, self.driver_dim)
        row = self.row_map(self.code(driver))
        return {"row_scale": row[:, : self.K], "row_shift": row[:, self.K:],
                "col_scale": self.col_map(driver)}

    def expand(self, factors: Mapping[str, torch.Tensor],
               out: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        g_row = 1.0 + factors["row_scale"]
        g_col = 1.0 + factors["col_scale"]
        if out is None:
            weight = self.W0 * g_row.unsqueeze(-1) * g_col.unsqueeze(1)
            bias = self.b0 * g_row + factors["row_shift"]
            return {self.weight_spec.name: weight, self.bias_spec.name: bias}
        # The same operations in the same order (so the same bits), without a temporary of Θ_d's size;
        # a weight left out of ``out`` is written by whoever took it from scaled_bases().
        weight, bias = out.get(self.weight_spec.name), out[self.bias_spec.name]
        if weight is not None:
            torch.mul(self.W0, g_row.unsqueeze(-1), out=weight).mul_(g_col.unsqueeze(1))
        torch.mul(self.b0, g_row, out=bias).add_(factors["row_shift"])
        return dict(out)

    def scaled_bases(self, factors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        return {self.weight_spec.name: (self.W0.detach(), 1.0 + factors["row_scale"], 1.0 + factors["col_scale"])}

    def magnitude_bound(self, factors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        # |W0 ⊙ g_row g_colᵀ| <= max|W0| max|g_row| max|g_col|; |b0 ⊙ g_row + β| <= max|b0| max|g_row| + max|β|.
        g_row = _row_abs_max(1.0 + factors["row_scale"])
        weight = self._abs_max("W0") * g_row * _row_abs_max(1.0 + factors["col_scale"])
        bias = self._abs_max("b0") * g_row + _row_abs_max(factors["row_shift"])
        return torch.maximum(weight, bias) * _BOUND_SLACK

    @property
    def factor_numel(self) -> int:
        return 2 * self.K + self.H


def create_generator(name: str, specs: Sequence[ParamSpec], driver_dim: int, **kwargs) -> Generator:
    return GENERATORS.get(name)(specs, driver_dim, **kwargs)
