"""Print the README's results table (Markdown) from one or more `headplan eval` outputs.

    python examples/results_table.py DIR/eval.json [DIR2/eval.json ...]

One row per method (dense first), per eval file: density / KV kept at each length, perplexity change
vs dense at each length, retrieval accuracy (correct/total) and answer NLL per task and length.
"""
import json
import sys


def rows(res: dict, label: str) -> list[str]:
    names = ["dense"] + [m["name"] for m in res["methods"]]
    info = {m["name"]: m for m in res["methods"]}
    ppl = {r["length"]: r for r in res["perplexity"]}
    ret = [(r["task"], r["length"], r) for r in res["retrieval"]]
    lens = sorted({b["length"] for m in res["methods"] for b in m["budget"]})
    head = (["budget", "method"] + [f"density/KV @{n}" for n in lens] + [f"ppl @{n}" for n in sorted(ppl)]
            + [f"{t} @{n}: acc, NLL" for t, n, _ in ret])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in names:
        cells = [label, f"**{m}**" if m == res.get("primary") else m]
        for n in lens:
            if m == "dense":
                cells.append("1 / 1")
            else:
                b = next(x for x in info[m]["budget"] if x["length"] == n)
                cells.append(f"{b['density']:.2f} / {b['kv_share']:.2f}")
        for n in sorted(ppl):
            r = ppl[n]
            if m == "dense":
                cells.append(f"{r['ppl_dense']:.2f}")
            else:
                v = r["methods"][m]["ppl"]
                cells.append(f"{v:.2f} ({100 * (v / r['ppl_dense'] - 1):+.1f}%)")
        for t, n, r in ret:
            k = round(r["acc"][m] * r["samples"])
            nll = r.get("answer_nll", {}).get(m)
            cells.append(f"{k}/{r['samples']}" + (f", {nll:.2f}" if nll is not None else ""))
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(paths: list[str]) -> None:
    for p in paths:
        res = json.load(open(p))
        label = p.rsplit("/", 2)[-2] if "/" in p else p
        print("\n".join(rows(res, label)))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
