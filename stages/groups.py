"""Which of prepare's rows are the same picture, and which copy of each stays.

Equal content hashes are the same picture; a pHash candidate is only when its pixels confirm it
(duplicates.difference: a hash match alone joined different photos on plain backgrounds, TRAPS.md). Among the
copies, the one furthest from training stays (test, then val), and one picture under two labels is a conflict.
"""
from stages import duplicates


def find_groups(rows, p, thumbnail):
    """Groups (lists of row indices) of the same picture: equal content hash, or a pHash candidate that its
    pixels confirm (`thumbnail(i)`, duplicates.difference); and the candidates not confirmed, as
    (i, j, pHash distance, difference)."""
    ids = [i for i, r in enumerate(rows) if r["phash"]]
    parent = {i: i for i in ids}

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_sha = {}
    for i in ids:
        by_sha.setdefault(rows[i]["sha256"], []).append(i)
    for same in by_sha.values():
        for i in same[1:]:
            parent[root(i)] = root(same[0])
    thumbs, unconfirmed = {}, []
    for a, b, dist in duplicates.candidates([int(rows[i]["phash"], 16) for i in ids], p.near_distance):
        a, b = ids[a], ids[b]
        if root(a) == root(b):
            continue                            # exact copies, or joined already through another pair
        for i in (a, b):
            if i not in thumbs:
                thumbs[i] = thumbnail(i)
        diff = duplicates.difference(thumbs[a], thumbs[b])
        if diff <= p.near_max_difference:
            parent[root(a)] = root(b)
        else:
            unconfirmed.append((a, b, dist, diff))
    groups = {}
    for i in ids:
        groups.setdefault(root(i), []).append(i)
    return ([sorted(g) for g in groups.values() if len(g) > 1],
            [u for u in unconfirmed if root(u[0]) != root(u[1])])   # not joined through other pairs either


def judge_groups(rows, groups):
    """Conflict (two labels), leakage (into test or val) or duplicate: the rule for each extra copy, the copy
    it is shown beside (`pair`), and one `picture` id per group."""
    for g in groups:
        labels = sorted({rows[i]["label"] for i in g})
        names = ", ".join(rows[i]["path"] for i in g)
        if len(labels) > 1:
            for i in g:
                other = next(j for j in g if rows[j]["label"] != rows[i]["label"])
                rows[i].update(rule="conflict", pair=other, picture=rows[g[0]]["sha256"],
                               reason=f"same picture under labels {' and '.join(labels)}: {names}")
            continue
        # The copy in the split furthest from training stays: test, then val.
        held = [i for i in g if rows[i]["split"] == "test"] or [i for i in g if rows[i]["split"] == "val"]
        first = held[0] if held else g[0]
        for i in g:
            rows[i]["picture"] = rows[first]["sha256"]
            if i == first:
                continue
            same = rows[i]["sha256"] == rows[first]["sha256"]
            if held and rows[i]["split"] != rows[first]["split"]:
                rule = "leakage"
                what = f"same picture as {rows[first]['split']} file {rows[first]['path']}"
            else:
                rule = "duplicate" if same else "near_duplicate"
                what = f"{'exact' if same else 'near'} duplicate of {rows[first]['path']}"
            rows[i].update(rule=rule, pair=first, reason="; ".join(filter(None, [what, rows[i]["reason"]])))
