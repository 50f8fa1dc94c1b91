"""Issue 13: workflow rough edges (argument checks first, baselines and check, quieter output, flags,
defaults that fit the model, one length parser)."""
import pytest

from headplan.errors import HeadplanError
from helpers import invoke


def _one_line_exit_2(r, msg):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.output, r.stderr


# -- item 6: one parser for the 'k' suffix (k = 1024) --------------------------------------------
def test_k_means_1024_in_every_flag():
    from headplan.api import parse_length, parse_lengths
    from headplan.search import parse_latency, parse_memory

    assert parse_lengths("2k,4K,1000") == [1000, 2048, 4096]
    assert parse_length("32k") == 32768
    assert parse_latency("40@32k") == (40.0, 32768)
    assert parse_memory("20@8x2k") == (20.0, 8, 2048)
    with pytest.raises(HeadplanError, match="not a length"):
        parse_lengths("2x")
    with pytest.raises(HeadplanError, match="--latency-budget takes"):
        parse_latency("40@abc")


# -- item 4/5: --version, flags ------------------------------------------------------------------
def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == "headplan 0.1.0"


def _commands():
    import typer.main

    from headplan.cli import app

    root = typer.main.get_command(app)
    todo = [(root.name, root)]
    while todo:
        name, cmd = todo.pop()
        yield name, cmd
        for sub, c in getattr(cmd, "commands", {}).items():
            todo.append((f"{name} {sub}", c))


def test_every_bool_option_is_an_on_off_flag():
    seen = 0
    for name, cmd in _commands():
        for p in cmd.params:
            if getattr(p, "is_flag", False) and p.name not in ("help", "version"):
                seen += 1
                assert p.secondary_opts and p.secondary_opts[0].startswith("--no-"), (name, p.opts)
        sub = name.split()[1:]
        if sub:
            r = invoke(*sub, "--help")
            assert all("<bool>" not in line for line in r.output.splitlines() if "--help" not in line), r.output
    assert seen >= 6
