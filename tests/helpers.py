"""Shared test helpers: tiny models and hand-written plans."""
import functools

import torch

from headplan.models import load_model
from headplan.plan import plan_from_rows

from cases import MIXED  # noqa: F401  (re-exported: the runtime tests' mixed plans)


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    return load_model(f"random:{family}")


def plan_for(lm, rows_fn):
    """rows_fn(layer, kv_head) -> dict."""
    ident = lm.identity
    rows = [[rows_fn(li, h) for h in range(ident.num_kv_heads)] for li in range(ident.num_layers)]
    return plan_from_rows(ident, rows)


def mixed_plan(lm, with_skip=False):
    pool = MIXED if with_skip else MIXED[:4]
    return plan_for(lm, lambda li, h: pool[(2 * li + h) % len(pool)])


def ids(n, b=1, seed=0, vocab=500):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (b, n), generator=g)


# -- CLI helpers shared by the CLI and eval/report tests ------------------------------------------
SMALL_RUN = ["--lengths", "384,512", "--samples", "2", "--candidates", "small", "--eval-data", "eval-small"]


def invoke(*args):
    """Run the headplan CLI in-process; returns typer's Result (exit_code, output, stderr)."""
    from typer.testing import CliRunner

    from headplan.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def tiny_run(out):
    """`headplan run` on random:llama with small settings into ``out``; asserts success."""
    r = invoke("run", "random:llama", "--out", out, "--density", "0.4", *SMALL_RUN)
    assert r.exit_code == 0, r.output
    return out
