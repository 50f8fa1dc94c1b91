"""Pattern bookkeeping: the analytic pair counts equal brute-force masks."""
import pytest
import torch

from headplan.kernels import patterns as P


@pytest.mark.parametrize("row", [
    {"kind": "streaming", "sink": 5, "alpha": 17, "beta": 0.25},
    {"kind": "streaming", "sink": 0, "alpha": 1},
    {"kind": "streaming", "sink": 64, "alpha": 300},
    {"kind": "strided", "sink": 7, "alpha": 20, "stride": 3, "offset": 1},
    {"kind": "strided", "sink": 70, "alpha": 5, "beta": 0.125, "stride": 2, "offset": 0},
    {"kind": "full"},
    {"kind": "skip"},
])
@pytest.mark.parametrize("n", [1, 50, 333])
@pytest.mark.parametrize("block", [16, 64])
def test_visible_count_equals_brute_force(row, n, block):
    vis = P.static_visible(torch.arange(n)[:, None], torch.arange(n)[None, :], P.make_table([row]), block)[0]
    assert int(vis.sum()) == P.visible_count(row, n, block)


def test_kv_count_is_what_the_last_query_needs():
    row = {"kind": "streaming", "sink": 4, "alpha": 10, "beta": 0.25}
    n = 200
    vis = P.static_visible(torch.tensor([[n - 1]]), torch.arange(n)[None, :], P.make_table([row]))[0]
    assert int(vis.sum()) == P.kv_count(row, n)
