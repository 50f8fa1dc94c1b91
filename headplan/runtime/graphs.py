"""The decode step without host work: one-token steps over a preallocated per-head cache, captured in a
CUDA graph per batch size and replayed.

``generate()`` on a patched model (runtime/generate.py) runs its decode steps through a :class:`DecodeStep`
when the plan's decode mode allows it (``apply(model, plan, decode=...)``, see :data:`MODES`):

- ``"graph"`` (what ``"auto"`` means on CUDA): the first decode step of a cache runs eagerly (it compiles
  the kernels and builds the device-side head tables), the second is captured into one
  ``torch.cuda.CUDAGraph``, and every later step is a replay of it.
- ``"static"``: the same step (static input buffers, no mask, in-place cache bookkeeping) run eagerly, with
  no graph: how the CPU tests the graph path's logic.
- ``"eager"`` (what ``"auto"`` means elsewhere): the model's own forward over a fresh cache per call.

What the captured step relies on: the cache's buffers never move (allocated for the request's length up
front and never grown; positions and lengths updated in place on the device, ``HeadplanLayer.commit_one``
and ``advance_one``); token ids and position ids are copied into static buffers before each replay; the
mask function returns None inside the step (a decode token's visibility is the head table's business, and
padding slots never enter the per-head cache); the host-side ``seen`` counters of the cache layers are
advanced after each replay, not inside the captured region.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from ..errors import HeadplanError
from . import backend

MODES = ("auto", "graph", "static", "eager")
_IN_STEP = [False]

# keyword arguments of a decode forward that the static step reproduces (or that do not change its result)
_PASSIVE = frozenset({"input_ids", "position_ids", "attention_mask", "use_cache", "return_dict", "logits_to_keep",
                      "cache_position", "past_key_values", "cache", "output_attentions", "output_hidden_states"})


def in_static_step() -> bool:
    """True while a :class:`DecodeStep` runs the model (the mask function then returns None)."""
    return _IN_STEP[0]


@contextlib.contextmanager
def _static_step():
    prev = _IN_STEP[0]
    _IN_STEP[0] = True
    try:
        yield
    finally:
        _IN_STEP[0] = prev


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise HeadplanError(f"decode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def _param(model):
    return next(model.parameters())


def resolve(mode: str, model) -> str:
    """The mode a request runs in: "auto" is "graph" on CUDA and "eager" elsewhere."""
    dev = _param(model).device
    if mode == "auto":
        return "graph" if dev.type == "cuda" else "eager"
    if mode == "graph" and dev.type != "cuda":
        raise HeadplanError(f"decode='graph' needs a model on CUDA (this one is on {dev}); use decode='static' or "
                            "'eager'")
    return mode


def eager_reason(model, st, kwargs: dict, ids, graph: bool) -> str | None:
    """Why this generate() request must take the eager path (the README's fallback list), or None."""
    gc = kwargs.get("generation_config") or model.generation_config

    def get(k, default=None):
        return kwargs[k] if k in kwargs else getattr(gc, k, default)

    if ids is None or kwargs.get("inputs_embeds") is not None:
        return "prompt given as inputs_embeds"
    if int(get("num_beams", 1) or 1) > 1:
        return "beam search"
    if int(get("num_return_sequences", 1) or 1) > 1:
        return "num_return_sequences > 1"
    if get("penalty_alpha") and int(get("top_k", 0) or 0) > 1:
        return "contrastive search"
    if kwargs.get("assistant_model") is not None or get("prompt_lookup_num_tokens") is not None:
        return "assisted decoding"
    if get("dola_layers") is not None:
        return "DoLa decoding"
    if get("output_attentions") or get("output_hidden_states"):
        return "attentions or hidden states requested"
    p = _param(model)
    if graph and not backend.decode_capturable(p.dtype, st.plan.model.head_dim, p.device):
        return (f"the decode kernels are not Triton for {p.dtype}, head_dim {st.plan.model.head_dim} "
                "(or HEADPLAN_BACKEND=reference)")
    return None


class DecodeStep:
    """One-token decode steps of ``model`` over ``cache`` (batch ``batch``), replayed from a CUDA graph when
    ``graph`` is true. Call it with the step's ``input_ids`` (B, 1) and ``position_ids`` ((B, 1), (1, 1) or
    None = the cache length); it returns the model's output (its logits are a static buffer: copy them
    before the next step).

    Counters for tests and benchmarks: ``eager_steps``, ``captures``, ``replays``; ``failed`` holds why a
    capture failed (the step then stays eager, with a warning)."""

    def __init__(self, model, cache, batch: int, max_length: int, graph: bool):
        from ..models import cache_kwarg

        p = _param(model)
        self.model, self.cache, self.batch, self.max_length = model, cache, int(batch), int(max_length)
        self.graph_mode = bool(graph)
        self.kw = cache_kwarg(model)
        self.forward = type(model).forward.__get__(model)  # the class's forward, never an interceptor
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(self.batch, 1, dtype=torch.long, device=p.device)
        self.graph = None
        self.out = None
        self.failed: str | None = None
        self.eager_steps = self.captures = self.replays = 0

    def _run(self):
        with _static_step(), torch.no_grad():
            return self.forward(input_ids=self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                                return_dict=True, **{self.kw: self.cache})

    def _capture(self) -> None:
        seen = [layer.seen for layer in self.cache.layers]
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g):
                out = self._run()
        except Exception as e:  # noqa: BLE001 - stay correct: run this and later steps eagerly
            self.failed = f"{type(e).__name__}: {e}"[:300]
            self.graph_mode = False
            warnings.warn(f"headplan: capturing the decode step failed, decoding eagerly ({self.failed})",
                          stacklevel=3)
            return
        finally:
            for layer, s in zip(self.cache.layers, seen):  # the capture ran update() once without running a step
                layer.seen = s
        self.graph, self.out = g, out
        self.captures += 1

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        self.ids.copy_(input_ids)
        if position_ids is None:
            self.pos.fill_(self.cache.get_seq_length())
        else:
            self.pos.copy_(position_ids.reshape(-1, 1).expand(self.batch, 1))
        if self.graph_mode and self.graph is None and self.eager_steps > 0:
            self._capture()
        if self.graph is None:  # static mode, or the warm-up step before the capture
            self.eager_steps += 1
            return self._run()
        self.graph.replay()
        for layer in self.cache.layers:
            layer.seen += 1
        self.replays += 1
        return self.out

    def takes(self, args: tuple, kwargs: dict) -> bool:
        """Whether a forward call with these arguments is one decode step this object reproduces."""
        ids = kwargs.get("input_ids")
        if args or ids is None or tuple(ids.shape) != (self.batch, 1) or kwargs.get(self.kw) is not self.cache:
            return False
        if self.cache.get_seq_length() == 0 or kwargs.get("use_cache") is False:
            return False
        if any(k not in _PASSIVE and v is not None and v is not False for k, v in kwargs.items()):
            return False
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if kwargs.get("logits_to_keep") not in (None, 0, 1):
            return False
        pos = kwargs.get("position_ids")
        return pos is None or (pos.dim() == 2 and pos.shape[-1] == 1 and pos.shape[0] in (1, self.batch))


def decoder_for(model, st, batch: int, max_length: int, graph: bool) -> DecodeStep:
    """The plan's decode step for this batch size, with an emptied cache for at least ``max_length`` tokens.

    The last one made is kept on the PlanState and reused (cache and graph) while the batch size, dtype and
    device match and its length covers the request without exceeding twice it; ``release(model)`` frees it."""
    from .cache import HeadplanCache

    p = _param(model)
    key = (int(batch), p.dtype, str(p.device), bool(graph))
    d = st.decoders.get(key)
    if d is not None and max_length <= d.max_length <= 2 * max_length + 64:
        d.cache.clear()
        return d
    st.decoders.clear()  # one decoder at a time: each holds a whole preallocated cache
    d = DecodeStep(model, HeadplanCache(st.tables, max_length, grow=False), batch, max_length, graph)
    st.decoders[key] = d
    return d


def release(model) -> None:
    """Free the decode steps (graphs and preallocated caches) that generate() keeps on a patched model."""
    from .state import state_of

    st = state_of(model)
    if st is not None:
        st.decoders.clear()


@contextlib.contextmanager
def intercept(model, step: DecodeStep):
    """Inside the block, ``model``'s forward runs the decode steps that ``step`` takes through it."""
    prev = model.__dict__.get("forward")
    inner = prev if prev is not None else type(model).forward.__get__(model)

    @functools.wraps(inner)  # generate() reads the signature (position_ids) through __wrapped__
    def forward(*args, **kwargs):
        if step.takes(args, kwargs):
            return step(kwargs["input_ids"], kwargs.get("position_ids"))
        return inner(*args, **kwargs)

    model.forward = forward
    try:
        yield step
    finally:
        if prev is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = prev
