"""The one evaluation loop: dense, then each method, over the same input."""

from __future__ import annotations

from ..plan import Plan


class MethodLoop:
    """The one "dense, then each method" loop of an evaluation: ``each(fn)`` runs ``fn("dense")`` under the
    model's own attention, then ``fn(name)`` with each plan applied, one progress step each, and returns
    ``{"dense": ..., name: ...}``, the model left as it found it. The grid, validation and RULER all measure
    through it."""

    def __init__(self, model, methods: dict[str, Plan], advance=lambda n=1: None):
        self.model, self.methods, self.names, self.advance = model, methods, list(methods), advance

    def each(self, fn) -> dict:
        from ..runtime import applied, dense

        with dense(self.model):
            out = {"dense": fn("dense")}
        self.advance()
        for m in self.names:
            with applied(self.model, self.methods[m], check=False):
                out[m] = fn(m)
            self.advance()
        return out
