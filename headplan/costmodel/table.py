"""Cost tables: the rates (YAML load/save, checks), the predictions they make, the rates fitted from
timing samples, and the coefficient arrays the search builds its latency and memory rows from."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import HeadplanError
from ..plan import DYNAMIC_KINDS, KINDS, Pattern, Plan, atomic_write, load_yaml, read_input

SCHEMA = 1


@dataclass(frozen=True)
class CostTable:
    device: dict
    head_dim: int
    group: int
    dtype: str
    prefill_launch_us: float
    per_pair_ns: dict  # kind -> ns per (query, key) pair per query head
    dyn_ns_per_token: dict  # dynamic kind -> ns per token per layer call (index building)
    decode_launch_us: float
    decode_bytes_per_s: float
    samples: list = field(default_factory=list, compare=False)
    source: str = "measured"
    dyn_fixed_us: dict = field(default_factory=dict)  # dynamic kind -> fixed us per layer call
    # the dense library (cuDNN / flash through SDPA, causal) on a layer's full heads, and what splitting a layer
    # between it and the sparse kernel costs (gathers, scatters, a second launch); 0 = not measured, never split
    dense_launch_us: float = 0.0
    dense_per_pair_ns: float = 0.0  # per (query, key) pair per query head
    route_fixed_us: float = 0.0
    route_ns_per_token: float = 0.0  # per token per KV head (its G query heads), on top of both parts

    # -- predictions ----------------------------------------------------------------------------
    def head_prefill_ms(self, p: Pattern, n: int, block: int = 64, lwin: int = 0) -> float:
        """Marginal prefill time of one KV head (its G query heads) at length n, in ms, in a layer whose
        own sliding window is ``lwin`` (0 = global): only the pairs the layer itself attends to count."""
        from ..candidates import density

        pairs = density(p, n, block, lwin) * n * (n + 1) / 2
        return self.per_pair_ns.get(p.kind, self.per_pair_ns["full"]) * pairs * self.group * 1e-6

    def sparse_layer_ms(self, patterns: list[Pattern], n: int, block: int = 64, lwin: int = 0) -> float:
        """One layer call of the sparse kernel on all of the layer's heads."""
        t = self.prefill_launch_us * 1e-3 + sum(self.head_prefill_ms(p, n, block, lwin) for p in patterns)
        for k in {p.kind for p in patterns if p.kind in DYNAMIC_KINDS}:  # index building, once per kind per layer
            t += self.dyn_ns_per_token.get(k, 0.0) * n * 1e-6 + self.dyn_fixed_us.get(k, 0.0) * 1e-3
        return t

    def split_layer_ms(self, patterns: list[Pattern], n: int, block: int = 64, lwin: int = 0) -> float | None:
        """The layer with its full heads on the dense library and the others on the sparse kernel (a global
        layer with a full head only; an all-full layer is the dense library alone), or None when the table has
        no dense rates or the layer cannot be split."""
        full = [p for p in patterns if p.kind == "full"]
        if lwin or not full or self.dense_per_pair_ns <= 0:
            return None
        t = self.dense_launch_us * 1e-3 + self.dense_per_pair_ns * len(full) * self.group * n * (n + 1) / 2 * 1e-6
        rest = [p for p in patterns if p.kind != "full"]
        if rest:
            t += self.sparse_layer_ms(rest, n, block, lwin) + self.route_fixed_us * 1e-3 + \
                self.route_ns_per_token * n * len(patterns) * 1e-6
        return t

    def routes_full(self, patterns: list[Pattern], n: int, block: int = 64, lwin: int = 0) -> bool:
        """Whether the runtime sends this layer's full heads to the dense library at length n: where the
        table predicts the split layer faster than the sparse kernel alone."""
        t = self.split_layer_ms(patterns, n, block, lwin)
        return t is not None and t < self.sparse_layer_ms(patterns, n, block, lwin)

    def layer_prefill_ms(self, patterns: list[Pattern], n: int, block: int = 64, lwin: int = 0) -> float:
        """One layer's prefill as the runtime runs it (split when :meth:`routes_full`)."""
        t = self.sparse_layer_ms(patterns, n, block, lwin)
        s = self.split_layer_ms(patterns, n, block, lwin)
        return t if s is None else min(t, s)

    def for_shape(self, head_dim: int, group: int) -> "CostTable":
        """This table's rates carried to another head_dim / GQA group (per-pair and per-token costs scale with
        head_dim; per-query-head rates need no change): an approximation for routing, where a table of the
        model's own shape is missing."""
        if (head_dim, group) == (self.head_dim, self.group):
            return self
        f = head_dim / self.head_dim
        return dataclasses.replace(
            self, head_dim=head_dim, group=group, per_pair_ns={k: v * f for k, v in self.per_pair_ns.items()},
            dense_per_pair_ns=self.dense_per_pair_ns * f,
            route_ns_per_token=self.route_ns_per_token * f * (group + 1) / (self.group + 1),
            source=f"{self.source}, scaled from head_dim {self.head_dim} / group {self.group}")

    def plan_prefill_ms(self, plan: Plan, n: int) -> float:
        return sum(self.layer_prefill_ms([e.pattern for e in layer], n, plan.block_size, plan.model.window(li))
                   for li, layer in enumerate(plan.layers))

    def head_kv_bytes(self, p: Pattern, n: int, dtype_bytes: int = 2, lwin: int = 0) -> float:
        from ..candidates import kv_share

        return kv_share(p, n, lwin) * n * 2 * self.head_dim * dtype_bytes

    def plan_decode_ms(self, plan: Plan, n: int, batch: int = 1) -> float:
        per_layer = [sum(self.head_kv_bytes(e.pattern, n, lwin=plan.model.window(li)) for e in layer) * batch
                     for li, layer in enumerate(plan.layers)]
        return sum(self.decode_launch_us * 1e-3 + b / self.decode_bytes_per_s * 1e3 for b in per_layer)

    # -- io ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        import json

        d = {"schema_version": SCHEMA, **dataclasses.asdict(self)}
        return json.loads(json.dumps(d, default=str))  # plain types only (torch versions are str subclasses)

    def save(self, path) -> None:
        atomic_write(path, yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))


def load_cost_table(path) -> CostTable:
    p = Path(path)
    d = load_yaml(read_input(p, "cost table", HeadplanError), str(p), HeadplanError)
    if not isinstance(d, dict) or d.get("schema_version") != SCHEMA:
        raise HeadplanError(f"{p}.schema_version: expected {SCHEMA}")
    _check_table(d, str(p))
    return CostTable(**{k: v for k, v in d.items() if k != "schema_version"})


_SHIPPED: list | None = None


def shipped_tables() -> list:
    """The cost tables measured by the project and shipped with the package (``headplan/costmodel/devices``)."""
    global _SHIPPED
    if _SHIPPED is None:
        here = Path(__file__).parent / "devices"
        _SHIPPED = [load_cost_table(p) for p in sorted(here.glob("*.yaml"))]
    return _SHIPPED


_POSITIVE = ("head_dim", "group", "decode_bytes_per_s")  # divisors and shapes; every other number is a rate >= 0
_TYPES = {"dict": dict, "int": int, "float": (int, float), "str": str, "list": list}


def _check_table(d: dict, where: str) -> None:
    """Every field of a cost table has its type (rates: finite numbers >= 0 per known pattern kind);
    errors name the field, never a value or a key the file made up."""
    fields = {f.name: f for f in dataclasses.fields(CostTable)}
    extra = [k for k in d if k != "schema_version" and k not in fields]
    if extra:
        raise HeadplanError(f"{where}: not a cost table ({len(extra)} unknown field(s))")
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise HeadplanError(f"{where}.{name}: missing field")
            continue
        v = d[name]
        typ = str(f.type).split()[0]
        if isinstance(v, bool) or not isinstance(v, _TYPES[typ]):
            raise HeadplanError(f"{where}.{name}: expected {typ}, got {type(v).__name__}")
        if typ in ("int", "float") and not (math.isfinite(v) and v >= (1 if name in _POSITIVE else 0)):
            raise HeadplanError(f"{where}.{name}: expected a finite number {'> 0' if name in _POSITIVE else '>= 0'}")
        if name in ("per_pair_ns", "dyn_ns_per_token", "dyn_fixed_us"):
            for k, x in v.items():
                if k not in KINDS:
                    raise HeadplanError(f"{where}.{name}: unknown pattern kind")
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise HeadplanError(f"{where}.{name}.{k}: expected a finite number >= 0")
    if "full" not in d["per_pair_ns"]:
        raise HeadplanError(f"{where}.per_pair_ns.full: missing field")


def check_fits(table: CostTable, head_dim: int, group: int) -> None:
    if table.head_dim != head_dim:
        raise HeadplanError(f"cost table was measured for head_dim {table.head_dim}, the model has {head_dim}; "
                            "measure one for this shape (headplan costmodel measure --head-dim ...)")
    if table.group != group:
        raise HeadplanError(f"cost table was measured for GQA group {table.group}, the model has {group}")


def analytic(head_dim: int, group: int, tflops: float = 350.0, tbps: float = 2.8, dtype: str = "bfloat16",
             gpu: str = "nominal H100") -> CostTable:
    """Nominal rates: 4·D FLOPs per pair at ``tflops``; decode reads at ``tbps``."""
    ns = 4 * head_dim / (tflops * 1e12) * 1e9
    per = {k: ns for k in KINDS}
    per["skip"] = 0.0
    return CostTable(device={"name": gpu}, head_dim=head_dim, group=group, dtype=dtype, prefill_launch_us=20.0,
                     per_pair_ns=per, dyn_ns_per_token={"blocksparse": 60.0, "vslash": 120.0},
                     decode_launch_us=18.0, decode_bytes_per_s=tbps * 1e12, source="analytic")



def prefill_coefficients(table: CostTable, candidates, n: int, block: int, model):
    """Prefill coefficients of ``candidates`` at length n: per (layer, candidate) marginal ms of one KV
    head (each layer's own window bounds the work), per candidate the ms of a dynamic kind's index
    building (paid once per layer that uses it; 0 for static kinds), and the launch ms of all layers."""
    import numpy as np

    pats = [getattr(c, "pattern", c) for c in candidates]
    per_head = np.array([[table.head_prefill_ms(p, n, block, model.window(li)) for p in pats]
                         for li in range(model.num_layers)])
    dyn_ms = np.array([table.dyn_ns_per_token.get(p.kind, 0.0) * n * 1e-6 + table.dyn_fixed_us.get(p.kind, 0.0) * 1e-3
                       if p.kind in DYNAMIC_KINDS else 0.0 for p in pats])
    fixed = model.num_layers * table.prefill_launch_us * 1e-3
    return per_head, dyn_ms, fixed


def kv_coefficients(table: CostTable, candidates, n: int, model):
    """Per (layer, candidate) KV cache bytes of one KV head at length n, batch 1 (each layer's own window
    bounds what it keeps)."""
    import numpy as np

    pats = [getattr(c, "pattern", c) for c in candidates]
    return np.array([[table.head_kv_bytes(p, n, lwin=model.window(li)) for p in pats]
                     for li in range(model.num_layers)])


def _line(xs, ys):
    """Least squares y = a + b·x kept non-negative: a negative intercept refits through the origin, a
    negative slope leaves the mean."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    (b, a), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    if a < 0:
        return 0.0, max(float((y * x).sum() / (x ** 2).sum()), 0.0)
    if b < 0:
        return max(float(y.mean()), 0.0), 0.0
    return float(a), float(b)


def fit_prefill(samples: list[dict]):
    """Least-squares rates from timing samples: launch (ms), per-pair ns per kind, and for dynamic
    kinds the index-building cost as fixed us + ns per token."""
    import numpy as np

    launch_ms = float(np.median([s["ms"] for s in samples if s["kind"] == "skip"]))
    per_pair, dyn, dyn_fixed = {"skip": 0.0}, {}, {}
    for kind in [k for k in KINDS[:-1] if k not in DYNAMIC_KINDS] + list(DYNAMIC_KINDS):
        ss = [s for s in samples if s["kind"] == kind]
        if not ss:
            continue
        y = np.array([s["ms"] - launch_ms for s in ss])
        pairs = np.array([s["pairs"] for s in ss])
        if kind in DYNAMIC_KINDS:
            # visible pairs run the same flash loop as full heads; the rest is index building and
            # masked tiles, fitted as a + b·N (non-negative) on what the pairs do not explain
            per_pair[kind] = per_pair.get("full", 1e-6)
            a, b = _line([s["n"] for s in ss], y - pairs * per_pair[kind] * 1e-6)
            dyn[kind] = b * 1e6
            dyn_fixed[kind] = a * 1e3
        else:
            per_pair[kind] = max(float((y * pairs).sum() / (pairs ** 2).sum()) * 1e6, 1e-6)
    return launch_ms, per_pair, dyn, dyn_fixed


def fit_route(samples: list[dict]):
    """Dense-library rates (launch us, ns per pair) from the "dense" samples and the split overhead (fixed
    us, ns per token per KV head) from the "route" samples; zeros where a table has none."""
    d = [s for s in samples if s["kind"] == "dense"]
    r = [s for s in samples if s["kind"] == "route"]
    a, b = _line([s["pairs"] for s in d], [s["ms"] for s in d]) if d else (0.0, 0.0)
    c, e = _line([s["n"] * s["heads"] for s in r], [max(s["ms"], 0.0) for s in r]) if r else (0.0, 0.0)
    return a * 1e3, b * 1e6, c * 1e3, e * 1e6


def refit(table: "CostTable") -> "CostTable":
    """Re-fit a table's rates from its stored samples (after a change of the fitting rule)."""
    launch_ms, per_pair, dyn, dyn_fixed = fit_prefill(table.samples)
    dl, dp, rf, rt = fit_route(table.samples)
    return dataclasses.replace(table, prefill_launch_us=launch_ms * 1e3, per_pair_ns=per_pair,
                               dyn_ns_per_token=dyn, dyn_fixed_us=dyn_fixed, dense_launch_us=dl,
                               dense_per_pair_ns=dp, route_fixed_us=rf, route_ns_per_token=rt)


def load_cost(spec: str | None, head_dim: int, group: int):
    """A cost table from a YAML path, or 'analytic' for nominal H100 rates (no GPU needed)."""
    if spec is None:
        return None
    if spec == "analytic":
        return analytic(head_dim, group)
    return load_cost_table(spec)
