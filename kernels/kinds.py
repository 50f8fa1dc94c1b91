"""The vocabulary of head patterns, torch-free: what ``headplan.plan`` validates and ``patterns`` encodes.

The one list of pattern kinds (a head table's ``C_KIND`` is the index into ``KIND_NAMES``), the dynamic ones
(chosen from the prefill's own queries, so they apply to a prefill from an empty cache only), and the ways a
select head may spend its keep budget (``C_SHARE``; see ``patterns`` SELECT).
"""

BETA_SCALE = 4096  # an elastic window's beta lives on this grid: beta_q = beta * BETA_SCALE, an integer


def window(alpha, beta_q, n):
    """The window rule: W(n) = alpha + floor(beta_q * n / BETA_SCALE), ints or int tensors alike (integer
    arithmetic, so every implementation agrees token for token; the Triton copy is tested equal)."""
    return alpha + (beta_q * n) // BETA_SCALE


KIND_NAMES = ("full", "streaming", "strided", "blocksparse", "vslash", "skip", "select")
DYNAMIC_KINDS = ("blocksparse", "vslash")
# SELECT: how a head's keep budget K(n) is spent. "head": on its own top-K tokens. "layer" (AdaKV): the
# layer's "layer" heads pool their budgets and their tokens compete across heads, each head still getting at
# least SHARE_FLOOR of its own K(n). "heads" (DuoAttention scored on the fly): the pooled budget buys whole
# heads; those whose observation queries put the most attention outside their sink and ring keep every token,
# the others only sink and ring.
SHARES = ("head", "layer", "heads")
SHARE_FLOOR = 0.2
