"""Block-wise per-head statistics: what each candidate pattern would cost one KV head.

Never materialises a layer's attention for all heads: one KV head (its G query heads) and one
block of query rows at a time, from Q, K (and V, dO for ``mse`` / ``gradient``).

Signals, per (layer, KV head, candidate), for one sequence:

- ``recall``:   share of attention probability mass the candidate drops, averaged over query rows
                and the G query heads of the group (``1 - recall``).
- ``gradient``: MoA attention influence. With dA = dL/dA = dO·Vᵀ (row block by row block) and
                r_i = Σ_j A_ij dA_ij, the first-order loss increase from dropping entry (i, j) with
                the row renormalised is E_ij = -A_ij (dA_ij - r_i) / (1 - A_ij) (1 - A clamped at
                1e-4). The candidate's cost is Σ E over the entries it drops, summed over the query
                heads of the group (nats of the calibration loss, first order).
- ``mse``:      Sparse-vDiT output error: Σ_rows,heads ||O_cand - O_dense||² / Σ ||O_dense||²,
                O_cand the renormalised attention restricted to the candidate's visible keys.

``full`` costs exactly 0 under every signal; ``skip`` drops everything (mse 1, recall 1).

A ``select`` head attends fully within a chunk and loses only what it evicts, so it is judged on the
queries that come after a selection, as decode steps do: its tokens are selected at ``N - E`` (``E =
select_rows(N)``) from the observation queries just before, and the queries of the last E rows see the
sink, their recent window and the selected tokens. Its cost is the mean over those E rows (the sum scaled
by N / E), so it is comparable with the other kinds' mean over every row.
"""

from __future__ import annotations

import math

import torch

from ..candidates import Candidate
from ..kernels import patterns as P
from ..plan import DYNAMIC_KINDS

SIGNALS = ("gradient", "mse", "recall")
EPS_1MA = 1e-4


def select_rows(n: int) -> int:
    """The decode-like query rows a ``select`` candidate is judged on at length n (the last ones)."""
    return max(1, min(64, n // 4))


def row_block(device: torch.device, G: int, N: int) -> int:
    if device.type == "cuda":  # fewer, larger launches: ~32M fp32 elements per (G, rows, keys) block
        r = (1 << 25) // max(1, G * N)
        return int(max(64, min(N, (r // 64) * 64)))
    return 256


class Stats:
    """Accumulates the per-(layer, KV head, candidate) cost of one or more signals."""

    def __init__(self, candidates: list[Candidate], n_layers: int, n_kv: int, block: int,
                 signals: tuple[str, ...] = ("recall",)):
        for s in signals:
            if s not in SIGNALS:
                raise ValueError(f"unknown signal {s!r}")
        self.cands = list(candidates)
        self.block = block
        self.signals = tuple(signals)
        C = len(candidates)
        self.acc = {s: torch.zeros(n_layers, n_kv, C, dtype=torch.float64) for s in self.signals}
        self.table = P.make_table([c.pattern.row() for c in candidates])
        kinds = [c.pattern.kind for c in candidates]
        self.stream_idx = [i for i, k in enumerate(kinds) if k == "streaming"]
        self.full_idx = [i for i, k in enumerate(kinds) if k == "full"]
        self.skip_idx = [i for i, k in enumerate(kinds) if k == "skip"]
        self.sel_idx = [i for i, k in enumerate(kinds) if k == "select"]
        self.mask_idx = [i for i, k in enumerate(kinds) if k in ("strided", "select") or k in DYNAMIC_KINDS]

    def reset(self) -> None:
        for t in self.acc.values():
            t.zero_()

    # -------------------------------------------------------------------------------------------
    def _dyn(self, qh, kh, scale, lwin: int = 0):
        dyn = {}
        for ci in self.mask_idx:
            row = self.table[ci]
            kind = int(row[P.C_KIND])
            if kind == P.BLOCKSPARSE:
                dyn[ci] = P.build_block_index(qh, kh, int(row[P.C_TOPK]), self.block)
            elif kind == P.VSLASH:
                dyn[ci] = P.build_vslash_index(qh, kh, int(row[P.C_VERT]), int(row[P.C_SLASH]), scale)
            elif kind == P.SELECT:
                dyn[ci] = self._selected(row, qh, kh, scale, lwin)
        return dyn

    def _selected(self, row, qh, kh, scale, lwin):
        """(n_s, kept (N,) bool): the keys a select candidate holds after selecting at n_s = N - E."""
        N = kh.shape[0]
        ns = N - select_rows(N)
        sink, alpha = int(row[P.C_SINK]), int(row[P.C_ALPHA])
        o0 = max(0, ns - P.OBS)
        pos = torch.arange(ns, device=kh.device)
        sc = P.select_scores(qh[None, :, o0:ns], kh[None, :ns], pos[None], pos[None, o0:ns], scale, lwin)[0]
        cand = (pos >= sink) & (pos < ns - alpha)
        k = min(int(P.select_keep(ns, int(row[P.C_KEEP]), int(row[P.C_KEEPB]))), int(cand.sum()))
        kept = torch.zeros(N, dtype=torch.bool, device=kh.device)
        if k > 0:
            kept[sc.masked_fill(~cand, -math.inf).topk(k).indices] = True
        return ns, kept

    def _visible(self, ci, i, j, dyn):
        """(r, r1) bool visibility of candidate ci for query rows i (r, 1) and keys j (1, r1)."""
        row = self.table[ci]
        kind = int(row[P.C_KIND])
        if kind in (P.BLOCKSPARSE, P.VSLASH):
            return P.dynamic_visible(i, j, kind, dyn[ci], self.block)
        if kind == P.SELECT:  # before n_s: the chunk's own full attention; after: what the cache holds
            ns, kept = dyn[ci]
            held = (j < int(row[P.C_SINK])) | ((i - j) < int(row[P.C_ALPHA])) | kept[j.clamp(max=kept.shape[0] - 1)]
            return (j <= i) & ((i < ns) | held)
        return P.static_visible(i, j, self.table[ci:ci + 1].to(i.device), self.block)[0]

    def dropped(self, x: torch.Tensor, r0: int, r1: int, dyn: dict) -> torch.Tensor:
        """Σ of x over the entries each candidate drops, for query rows r0..r1-1.

        x: (r, r1) per-entry quantity (already summed over the query heads of the group; zero above
        the diagonal). Returns (C,) float64 on x's device.
        """
        dev = x.device
        C = len(self.cands)
        r = r1 - r0
        out = torch.zeros(C, dtype=torch.float64, device=dev)
        total = x.sum(dtype=torch.float64)
        rows = torch.arange(r0, r1, device=dev)
        if self.stream_idx:
            st = self.table[self.stream_idx].to(device=dev, dtype=torch.int64)
            cs = torch.nn.functional.pad(x.cumsum(-1, dtype=torch.float64), (1, 0))  # (r, r1 + 1)
            sink = st[:, P.C_SINK][:, None]  # (Cs, 1)
            w = P.window(st[:, P.C_ALPHA][:, None], st[:, P.C_BETA][:, None], rows[None] + 1)
            lo = torch.minimum((rows[None] - w + 1).clamp(min=0), rows[None] + 1)  # (Cs, r)
            lo_c = torch.maximum(lo, sink.expand_as(lo).clamp(max=r1))
            sink_c = torch.minimum(sink.expand_as(lo), lo_c)
            csx = cs.unsqueeze(0).expand(len(self.stream_idx), r, r1 + 1)
            g = lambda idx: csx.gather(-1, idx.unsqueeze(-1)).squeeze(-1)  # noqa: E731
            out[self.stream_idx] = (g(lo_c) - g(sink_c)).sum(-1)
        for ci in self.skip_idx:
            out[ci] = total
        if self.mask_idx:
            i = rows[:, None]
            j = torch.arange(r1, device=dev)[None, :]
            xb = None
            for ci in self.mask_idx:
                kind = int(self.table[ci, P.C_KIND])
                if kind == P.BLOCKSPARSE:
                    if xb is None:  # x summed per key block (r, nbk)
                        nbk = -(-r1 // self.block)
                        xb = torch.nn.functional.pad(x, (0, nbk * self.block - r1)).view(r, nbk, self.block).sum(-1)
                    idx = dyn[ci][rows // self.block].long()  # (r, K), -1 padded
                    valid = (idx >= 0) & (idx < xb.shape[-1])
                    kept = (xb.gather(-1, idx.clamp(min=0, max=xb.shape[-1] - 1)) * valid).sum(dtype=torch.float64)
                elif kind == P.VSLASH:
                    cols, offs = dyn[ci]
                    cols = cols[(cols >= 0) & (cols < r1)].long()
                    offs = offs[offs >= 0].long()
                    colmass = x[:, cols].sum(dtype=torch.float64) if cols.numel() else total.new_zeros(())
                    jj = rows[:, None] - offs[None, :]  # (r, ns)
                    ok = jj >= 0
                    dg = x.gather(-1, jj.clamp(min=0)) * ok
                    colset = torch.zeros(r1, dtype=torch.bool, device=dev)
                    colset[cols] = True
                    overlap = (dg * colset[jj.clamp(min=0)]).sum(dtype=torch.float64)
                    kept = colmass + dg.sum(dtype=torch.float64) - overlap
                else:
                    kept = (x * self._visible(ci, i, j, dyn)).sum(dtype=torch.float64)
                out[ci] = total - kept
        for ci in self.full_idx:
            out[ci] = 0.0
        return out

    # -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def layer(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float,
              dout: torch.Tensor | None = None, lwin: int = 0) -> None:
        """One sequence of one layer: q (Hq, N, D), k and v (Hkv, N, D), dout (Hq, N, D) = dL/dO.

        ``lwin``: the layer's own sliding window (0 = none). The dense attention is the layer's own, so
        every per-entry quantity is zero outside the window and a candidate only pays for what it
        drops inside it (a candidate as wide as the window costs what ``full`` costs: nothing)."""
        Hq, N, _ = q.shape
        Hkv = k.shape[0]
        G = Hq // Hkv
        dev = q.device
        C = len(self.cands)
        want_g = "gradient" in self.signals
        want_m = "mse" in self.signals
        want_r = "recall" in self.signals
        if want_g and dout is None:
            raise ValueError("the gradient signal needs dL/dO")
        RB = row_block(dev, G, N)
        res = {s: torch.zeros(Hkv, C, dtype=torch.float64, device=dev) for s in self.signals}
        for h in range(Hkv):
            qh = q[h * G:(h + 1) * G].float()
            kh = k[h].float()
            vh = v[h].float() if v is not None else None
            doh = dout[h * G:(h + 1) * G].float() if want_g else None
            dyn = self._dyn(qh, kh, scale, int(lwin))
            mse_num = torch.zeros(C, dtype=torch.float64, device=dev)
            mse_den = torch.zeros((), dtype=torch.float64, device=dev)
            for r0 in range(0, N, RB):
                r1 = min(N, r0 + RB)
                i = torch.arange(r0, r1, device=dev)[:, None]
                j = torch.arange(r1, device=dev)[None, :]
                causal = (j <= i) & P.in_layer_window(i, j, int(lwin))
                s = torch.matmul(qh[:, r0:r1], kh[:r1].T) * scale  # (G, r, r1)
                a = torch.softmax(s.masked_fill(~causal, -math.inf), dim=-1)
                del s
                if want_r:
                    res["recall"][h] += self.dropped(a.sum(0), r0, r1, dyn)
                if want_g:
                    da = torch.matmul(doh[:, r0:r1], vh[:r1].T)  # dL/dA (G, r, r1)
                    rs = (a * da).sum(-1, keepdim=True)
                    e = -(a * (da - rs)) / (1.0 - a).clamp(min=EPS_1MA)
                    del da
                    res["gradient"][h] += self.dropped(e.sum(0), r0, r1, dyn)
                    del e
                if want_m:
                    o = torch.matmul(a, vh[:r1])  # (G, r, D)
                    mse_den += o.double().pow(2).sum()
                    for ci in range(C):
                        if ci in self.full_idx:
                            continue
                        if ci in self.skip_idx:
                            mse_num[ci] += o.double().pow(2).sum()
                            continue
                        vis = self._visible(ci, i, j, dyn)
                        av = a * vis
                        m = av.sum(-1, keepdim=True).clamp(min=1e-30)
                        oc = torch.matmul(av, vh[:r1]) / m
                        mse_num[ci] += (oc - o).double().pow(2).sum()
                del a
            if want_m:
                res["mse"][h] = mse_num / mse_den.clamp(min=1e-30)
            if want_r:
                res["recall"][h] /= G * N
            if self.sel_idx:  # a select candidate's cost: the mean over the rows after its selection
                for s_ in self.signals:
                    res[s_][h, self.sel_idx] *= N / select_rows(N)
        for s_ in self.signals:
            self.acc[s_][layer_idx] += res[s_].cpu()
