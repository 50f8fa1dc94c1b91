"""Profiling: what each KV head would lose under each candidate pattern, at several lengths.

Signal ``recall``: the share of the head's attention probability mass that a candidate keeps,
averaged over query rows, the query heads of the KV group, and samples. The profile stores the
loss ``1 - recall`` per (layer, KV head, candidate, length).

Memory stays bounded: statistics are taken inside the attention call of one layer at a time, one
query block at a time (never all heads' N x N at once).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..candidates import Candidate, density, kv_share
from ..errors import HeadplanError, ProfileError
from ..kernels import patterns as P
from ..plan import ModelIdentity, atomic_write
from ..report import Reporter

FORMAT = "headplan-profile"
FORMAT_VERSION = 1
ROW_BLOCK = 256
_ATTN_NAME = "headplan_profile"


@dataclass(frozen=True)
class Profile:
    model: ModelIdentity
    model_spec: str
    method: str
    lengths: tuple[int, ...]
    candidates: tuple[Candidate, ...]
    block_size: int
    data: dict
    samples: int
    loss: torch.Tensor  # (layers, kv_heads, candidates, lengths) float32
    density: torch.Tensor  # (candidates, lengths) float64
    kv: torch.Tensor  # (candidates, lengths) float64
    versions: dict
    sha256: str = ""  # of the file it was loaded from

    def header(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "method": self.method,
            "model": self.model.__dict__, "model_spec": self.model_spec, "lengths": list(self.lengths),
            "candidates": [c.to_dict() for c in self.candidates], "block_size": self.block_size,
            "data": self.data, "samples": self.samples, "versions": self.versions,
        }


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def save_profile(prof: Profile, path: str | Path) -> str:
    from safetensors.torch import save

    tensors = {"loss": prof.loss.float().contiguous(), "density": prof.density.double().contiguous(),
               "kv": prof.kv.double().contiguous()}
    header = prof.header()
    meta = {"headplan": json.dumps(header, sort_keys=True), "digest": _digest(header, tensors)}
    data = save(tensors, metadata=meta)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def load_profile(path: str | Path) -> Profile:
    from safetensors import safe_open
    from safetensors.torch import load

    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile not found: {p}")
    raw = p.read_bytes()
    try:
        tensors = load(raw)
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types
        raise ProfileError(f"{p}: not a safetensors profile ({e})") from None
    if "headplan" not in meta or "digest" not in meta:
        raise ProfileError(f"{p}: safetensors file has no headplan profile header")
    try:
        header = json.loads(meta["headplan"])
    except json.JSONDecodeError:
        raise ProfileError(f"{p}: profile header is not valid JSON") from None
    if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
        raise ProfileError(f"{p}: unsupported profile format {header.get('format')!r} v{header.get('format_version')}")
    for k in ("loss", "density", "kv"):
        if k not in tensors:
            raise ProfileError(f"{p}: profile lacks tensor {k!r}")
    if _digest(header, tensors) != meta["digest"]:
        raise ProfileError(f"{p}: profile header or tensors were modified (digest mismatch)")
    try:
        prof = Profile(
            model=ModelIdentity(**header["model"]), model_spec=header["model_spec"], method=header["method"],
            lengths=tuple(header["lengths"]), candidates=tuple(Candidate.from_dict(c) for c in header["candidates"]),
            block_size=int(header["block_size"]), data=header["data"], samples=int(header["samples"]),
            loss=tensors["loss"], density=tensors["density"], kv=tensors["kv"], versions=header["versions"],
            sha256=hashlib.sha256(raw).hexdigest())
    except (KeyError, TypeError) as e:
        raise ProfileError(f"{p}: profile header lacks or mistypes field {e}") from None
    m = prof.model
    want = (m.num_layers, m.num_kv_heads, len(prof.candidates), len(prof.lengths))
    if tuple(prof.loss.shape) != want:
        raise ProfileError(f"{p}: loss tensor has shape {tuple(prof.loss.shape)}, header implies {want}")
    return prof


# ------------------------------------------------------------------------------------------------
# statistics inside the attention call
# ------------------------------------------------------------------------------------------------

class _Collector:
    def __init__(self, candidates: list[Candidate], n_layers: int, n_kv: int, block: int):
        self.cands = candidates
        self.block = block
        self.loss = torch.zeros(n_layers, n_kv, len(candidates), dtype=torch.float64)
        rows = [c.pattern.row() for c in candidates]
        self.table = P.make_table(rows)
        kinds = self.table[:, P.C_KIND]
        self.stream_idx = [i for i, c in enumerate(candidates) if c.pattern.kind == "streaming"]
        self.full_idx = [i for i, c in enumerate(candidates) if c.pattern.kind == "full"]
        self.skip_idx = [i for i, c in enumerate(candidates) if c.pattern.kind == "skip"]
        self.mask_idx = [i for i in range(len(candidates))
                         if i not in self.stream_idx + self.full_idx + self.skip_idx]
        del kinds

    @torch.no_grad()
    def layer(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, scale: float):
        """q (Hq, N, D), k (Hkv, N, D) of one sequence (no padding)."""
        Hq, N, D = q.shape
        Hkv = k.shape[0]
        G = Hq // Hkv
        dev = q.device
        st = self.table[self.stream_idx].to(torch.int64)
        for h in range(Hkv):
            qh = q[h * G:(h + 1) * G].float()
            kh = k[h].float()
            dyn = {}
            for ci in self.mask_idx:
                row = self.table[ci]
                kind = int(row[P.C_KIND])
                if kind == P.BLOCKSPARSE:
                    dyn[ci] = P.build_block_index(qh, kh, int(row[P.C_TOPK]), self.block)
                elif kind == P.VSLASH:
                    dyn[ci] = P.build_vslash_index(qh, kh, int(row[P.C_VERT]), int(row[P.C_SLASH]), scale)
            kept = torch.zeros(len(self.cands), dtype=torch.float64)
            for r0 in range(0, N, ROW_BLOCK):
                r1 = min(N, r0 + ROW_BLOCK)
                s = torch.matmul(qh[:, r0:r1], kh[:r1].T) * scale  # (G, r, r1)
                i = torch.arange(r0, r1, device=dev)[:, None]
                j = torch.arange(r1, device=dev)[None, :]
                s = s.masked_fill(j > i, -math.inf)
                a = torch.softmax(s, dim=-1)
                if self.stream_idx:
                    cs = torch.nn.functional.pad(a.cumsum(-1), (1, 0))  # (G, r, r1 + 1)
                    ii = i[:, 0]  # (r,)
                    sink = st[:, P.C_SINK].to(dev)[:, None]  # (C, 1)
                    w = P.window(st[:, P.C_ALPHA].to(dev)[:, None], st[:, P.C_BETA].to(dev)[:, None], ii[None] + 1)
                    lo = (ii[None] - w + 1).clamp(min=0)  # first key of the window (C, r)
                    covered = lo <= sink
                    lo_c = torch.minimum(lo, ii[None] + 1)
                    sink_c = torch.minimum(sink.expand_as(lo), lo_c)
                    C = len(self.stream_idx)
                    csx = cs.unsqueeze(1).expand(G, C, r1 - r0, r1 + 1)
                    g = lambda idx: csx.gather(-1, idx.expand(G, C, r1 - r0).unsqueeze(-1)).squeeze(-1)  # noqa
                    mass = g(sink_c) + g((ii[None] + 1).expand_as(lo)) - g(lo_c)
                    mass = torch.where(covered.unsqueeze(0), torch.ones_like(mass), mass)
                    kept[self.stream_idx] += mass.double().sum(dim=(0, 2)).cpu()
                for ci in self.full_idx:
                    kept[ci] += G * (r1 - r0)
                if self.mask_idx:
                    kept += self._masked(a, i, j, r0, r1, dyn)
            self.loss[layer_idx, h] += 1.0 - kept / (G * N)


    def _masked(self, a, i, j, r0, r1, dyn):
        """Kept mass of the dynamic (and strided) candidates for one query block."""
        kept = torch.zeros(len(self.cands), dtype=torch.float64)
        G, r, _ = a.shape
        block = self.block
        ab = None
        rows = torch.arange(r0, r1, device=a.device)
        for ci in self.mask_idx:
            row = self.table[ci]
            kind = int(row[P.C_KIND])
            if kind == P.BLOCKSPARSE:
                if ab is None:  # attention mass per key block (G, r, nbk)
                    nbk = -(-r1 // block)
                    ab = torch.nn.functional.pad(a, (0, nbk * block - r1)).view(G, r, nbk, block).sum(-1)
                idx = dyn[ci][rows // block].long()  # (r, K) selected key blocks, -1 padded
                valid = (idx >= 0) & (idx < ab.shape[-1])
                g = ab.gather(-1, idx.clamp(min=0, max=ab.shape[-1] - 1).expand(G, r, idx.shape[1]))
                kept[ci] += float((g * valid).sum())
            elif kind == P.VSLASH:
                cols, offs = dyn[ci]
                cols = cols[(cols >= 0) & (cols < r1)].long()
                offs = offs[offs >= 0].long()
                colmass = a[:, :, cols].sum() if cols.numel() else a.new_zeros(())
                jj = rows[:, None] - offs[None, :]  # (r, ns)
                ok = jj >= 0
                dg = a.gather(-1, jj.clamp(min=0).expand(G, r, offs.numel())) * ok
                colset = torch.zeros(r1, dtype=torch.bool, device=a.device)
                colset[cols] = True
                overlap = dg * colset[jj.clamp(min=0)]
                kept[ci] += float(colmass + dg.sum() - overlap.sum())
            else:
                vis = P.static_visible(i, j, self.table[ci:ci + 1], block)[0]
                kept[ci] += float((a * vis).sum())
        return kept


_ACTIVE: list[_Collector] = []


def _profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _ACTIVE and query.shape[0] == 1:
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        _ACTIVE[-1].layer(module.layer_idx, query[0], key[0], scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ATTN_NAME, _profile_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)


def versions() -> dict:
    import transformers

    return {"headplan": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def profile(lm, lengths: list[int], candidates: list[Candidate], data_spec: dict, texts: list[str] | None = None,
            samples: int | None = None, block: int = 64, reporter: Reporter | None = None) -> Profile:
    """Run the model on calibration samples at each length and measure every KV head."""
    from ..data import Haystack, load_texts, mixture_samples

    rep = reporter or Reporter()
    ident: ModelIdentity = lm.identity
    lengths = sorted(set(int(x) for x in lengths))
    if not lengths:
        raise HeadplanError("no lengths to profile")
    for n in lengths:
        if n > ident.max_positions:
            raise HeadplanError(f"length {n} exceeds the model's {ident.max_positions} positions")
        if n < 64:
            raise HeadplanError(f"length {n} is too short to profile (minimum 64)")
    if not candidates:
        raise HeadplanError("no candidate patterns")
    text, text_desc = load_texts(texts)
    hay = Haystack(lm.tokenizer, text)
    n_samp = int(samples if samples is not None else data_spec.get("samples_per_length", 4))
    if n_samp < 1:
        raise HeadplanError("--samples must be at least 1")
    sets = {n: mixture_samples(hay, data_spec, n, n_samp) for n in lengths}
    _register()
    model = lm.model
    prev = model.config._attn_implementation
    loss = torch.zeros(ident.num_layers, ident.num_kv_heads, len(candidates), len(lengths), dtype=torch.float64)
    dev = next(model.parameters()).device
    try:
        model.set_attn_implementation(_ATTN_NAME)
        with rep.task("profiling", sum(len(s) for s in sets.values())) as advance:
            for li, n in enumerate(lengths):
                col = _Collector(candidates, ident.num_layers, ident.num_kv_heads, block)
                _ACTIVE.append(col)
                try:
                    for smp in sets[n]:
                        with torch.no_grad():
                            model(torch.tensor([smp.input_ids], device=dev), use_cache=False)
                        advance()
                finally:
                    _ACTIVE.pop()
                loss[..., li] = col.loss / len(sets[n])
    finally:
        model.set_attn_implementation(prev)
    dens = torch.tensor([[density(c.pattern, n, block) for n in lengths] for c in candidates], dtype=torch.float64)
    kv = torch.tensor([[kv_share(c.pattern, n) for n in lengths] for c in candidates], dtype=torch.float64)
    data = {"spec": data_spec, "texts": text_desc, "samples_per_length": n_samp}
    return Profile(model=ident, model_spec=lm.spec, method="recall", lengths=tuple(lengths),
                   candidates=tuple(candidates), block_size=block, data=data, samples=n_samp,
                   loss=loss.float().clamp(min=0.0), density=dens, kv=kv, versions=versions())
