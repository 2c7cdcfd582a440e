"""Is attention an explanation? The figures of docs/results.md's section of that name.

    python benchmarks/attention_as_explanation.py [--part translator|minilm|lm|all] [--steps N] [--lm-steps N] [--json out.json]

- ``translator``: the demo's GRU + Bahdanau translator and its Transformer (``qkv demo``'s models, data and
  training, ``--steps`` steps each). For held-out examples, each output token of the model's own greedy
  translation is explained over the source tokens by attention (Bahdanau weights; the Transformer's last
  cross-attention layer, mean over heads, and the mean over all its cross-attention layers), gradient x input,
  integrated gradients and leave-one-out (the source token's embedding set to zero), all of the log-probability
  of that output token; Kendall tau (by magnitude) and top-1 overlap per (example, output token), averaged.
  Then exact match on the held-out set with every attention row permuted (Jain and Wallace 2019) or uniform
  (Wiegreffe and Pinter 2019), and the total variation between the teacher-forced output distributions.
- ``minilm``: all-MiniLM-L6-v2 on the sentences of benchmarks/minilm_heads.py: leave-one-out (the cosine change
  of the sentence embedding when a word token is dropped) against attention, rollout, flow, value norms and
  gradients (``qkv.apps.inspect_faithfulness.sentence_token_importance``), tau and top-3 overlap over the word tokens.
- ``lm``: the ``qkv train lm`` GPT (byte level, 4 layers x 4 heads, d 128, RoPE, the task's data and optimiser)
  trained ``--lm-steps`` steps; every ``--every`` steps, each head's induction and previous-token scores on
  repeated random bytes, and the loss on the repeated half against the first half (in-context copying).
- ``induction``: a 2-layer GPT (d 64, 4 heads, RoPE) trained on random tokens in which a segment of random length
  and offset comes twice (only a content-based look-back predicts the copy): the same scores every
  ``--every-copy`` steps, to see when its induction heads appear.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.analysis import (
    agreement,
    capture,
    cosine_change,
    grad_x_input,
    integrated_gradients,
    kendall_tau,
    leave_one_out,
    permuted_attention,
    topk_overlap,
    total_variation,
    uniform_attention,
)
from qkv.analysis.heads_detect import head_scores, repeated_tokens

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------- translator


def _explain_translation(
    model: nn.Module, kind: str, src: Tensor, lengths: Tensor, pred: list[int], steps: int
) -> dict[str, Tensor]:
    """Importance ``(T, Ls)`` of each source token for each output token ``t`` of ``pred + [EOS]``, per method."""
    from qkv.apps.demo.data import BOS, EOS

    tgt = pred + [EOS]
    T = len(tgt)
    tin = torch.tensor([[BOS] + pred])
    src_r, len_r, tin_r = src.repeat(T, 1), lengths.repeat(T), tin.repeat(T, 1)
    rows, cols, y = torch.arange(T), torch.arange(T), torch.tensor(tgt)

    def run() -> Tensor:  # row t: log p(y_t | y_<t, x)
        out = model(src_r, len_r, tin_r)
        logits = out[0] if isinstance(out, tuple) else out
        return torch.log_softmax(logits.double(), -1)[rows, cols, y]

    out: dict[str, Tensor] = {}
    with torch.no_grad():
        if kind == "rnn+attention":
            _, align = model(src, lengths, tin)
            out["attention"] = align[0].double()
        else:
            maps = capture(model, src, lengths, tin)
            cross = [w for n, w in zip(maps.names, maps.weights) if n.endswith("cross_attn")]
            out["attention"] = cross[-1][0].mean(0).double()
            out["attention_all_layers"] = torch.stack([w[0].mean(0) for w in cross]).mean(0).double()
    emb = model.src_emb
    out["grad_x_input"] = grad_x_input(run, emb).abs()
    out["integrated_gradients"] = integrated_gradients(run, emb, steps=steps).abs()
    out["leave_one_out"] = leave_one_out(run, emb)
    return out


def translator(args: argparse.Namespace) -> dict[str, Any]:
    from qkv.apps.demo.data import batchify
    from qkv.apps.demo.run import DemoConfig, evaluate, train_models

    if args.quick:  # the demo's --quick data and sizes (a smoke run, not the README's figures)
        q = DemoConfig.quick()
        cfg = DemoConfig(
            n_train=q.n_train, n_test=args.n_test or q.n_test, hidden=q.hidden, lr_transformer=q.lr_transformer, eval_every=q.eval_every,
            steps={"rnn": 1, "rnn+attention": args.steps, "transformer": args.steps},
        )  # fmt: skip
    else:
        cfg = DemoConfig(
            n_test=args.n_test or DemoConfig.n_test,
            steps={"rnn": 1, "rnn+attention": args.steps, "transformer": args.steps},
        )
    t0 = time.perf_counter()
    trained, test, sv, tv = train_models(cfg, args.seed)
    train_s = time.perf_counter() - t0
    res: dict[str, Any] = {"steps": args.steps, "n_test": len(test), "train_seconds": round(train_s, 1), "models": {}}
    for kind, patterns in (("rnn+attention", ["bahdanau"]), ("transformer", ["dec.*.cross_attn", "*"])):
        model, result = trained[kind]
        model.eval()
        r: dict[str, Any] = {"exact_match": result.accuracy, "params": result.params}
        # agreement per (example, output token)
        taus: dict[str, list[float]] = {}
        top1: dict[str, list[float]] = {}
        t1 = time.perf_counter()
        for ex in test[: args.examples]:
            src, lengths, _, tout = batchify([ex], sv, tv)
            if src.shape[1] < 2:
                continue
            pred_ids = model.greedy(src, lengths, tout.shape[1] + 2)  # type: ignore[operator]
            pred_ids = pred_ids[0] if isinstance(pred_ids, tuple) else pred_ids
            pred = tv.encode(tv.decode(pred_ids[0].tolist()))
            imp = _explain_translation(model, kind, src, lengths, pred, args.ig_steps)
            names = list(imp)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    key = f"{a} vs {b}"
                    for t in range(imp[a].shape[0]):
                        tau = kendall_tau(imp[a][t], imp[b][t])
                        if not math.isnan(tau):
                            taus.setdefault(key, []).append(tau)
                        top1.setdefault(key, []).append(topk_overlap(imp[a][t], imp[b][t], 1))
        r["agreement"] = {
            k: {
                "kendall_tau": statistics.fmean(v),
                "kendall_tau_std": statistics.pstdev(v),
                "top1_overlap": statistics.fmean(top1[k]),
                "rows": len(v),
            }
            for k, v in taus.items()
        }
        r["explain_seconds"] = round(time.perf_counter() - t1, 1)
        # permutation and uniform attention: exact match, and total variation of teacher-forced outputs
        sub = test[: args.tvd_examples]
        src, lengths, tin, tout = batchify(sub, sv, tv)
        real = tout != 0

        def logits(model: nn.Module = model, src: Tensor = src, lengths: Tensor = lengths, tin: Tensor = tin) -> Tensor:
            with torch.no_grad():
                out = model(src, lengths, tin)
            return out[0] if isinstance(out, tuple) else out

        base = logits()
        r["interventions"] = {}
        for pat in patterns:
            for name in ("permuted", "uniform"):
                gen = torch.Generator().manual_seed(args.seed)
                ctx = permuted_attention(model, pat, gen) if name == "permuted" else uniform_attention(model, pat)
                with ctx:
                    acc, _, _ = evaluate(model, test, sv, tv, cfg.buckets)
                    model.eval()
                    tvd = total_variation(base, logits())[real]
                r["interventions"][f"{name} {pat}"] = {
                    "exact_match": acc,
                    "tvd_mean": float(tvd.mean()),
                    "tvd_median": float(tvd.median()),
                }
        res["models"][kind] = r
        print(json.dumps({kind: r}, indent=1), flush=True)
    return res


# ---------------------------------------------------------------------------------------------- MiniLM


def minilm_part(args: argparse.Namespace) -> dict[str, Any]:
    from minilm_heads import SENTENCES
    from qkv.analysis.measures import special_positions
    from qkv.apps.inspect_faithfulness import sentence_token_importance
    from qkv.models import minilm
    from qkv.models.bert import mean_pool

    model = minilm()
    per_pair: dict[str, dict[str, list[float]]] = {}
    change: dict[str, list[float]] = {"permuted": [], "uniform": [], "leave_one_out_max": []}
    t0 = time.perf_counter()
    for text in SENTENCES[: args.sentences]:
        batch = model.encode(text)
        maps = capture(model, **batch)

        def embed(ids: Tensor, am: Tensor) -> Tensor:
            return mean_pool(model(ids, am), am)

        with torch.no_grad():
            e0 = embed(batch["input_ids"], batch["attention_mask"])
            with permuted_attention(model, "*", torch.Generator().manual_seed(args.seed)):
                ep = embed(batch["input_ids"], batch["attention_mask"])
            with uniform_attention(model):
                eu = embed(batch["input_ids"], batch["attention_mask"])
        change["permuted"].append(float(cosine_change(e0, ep)))
        change["uniform"].append(float(cosine_change(e0, eu)))

        qargs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        imp = sentence_token_importance(
            maps,
            embed,
            model.embeddings.word_embeddings,
            batch["input_ids"],
            batch["attention_mask"],
            qkv_model=model,
            qkv_args=qargs,
            steps=args.ig_steps,
            flow_max_len=64,
        )
        words = ~special_positions(batch.tokens[0])
        change["leave_one_out_max"].append(float(imp["leave_one_out"][words].max()))
        for row in agreement({n: v.unsqueeze(0) for n, v in imp.items()}, valid=words.unsqueeze(0), k=3):
            if "leave_one_out" not in (row["method_a"], row["method_b"]) and "attention" not in (
                row["method_a"],
                row["method_b"],
            ):
                continue
            d = per_pair.setdefault(f"{row['method_a']} vs {row['method_b']}", {"tau": [], "top3": []})
            d["tau"].append(row["kendall_tau"])
            d["top3"].append(row["topk_overlap"])
    out = {
        k: {
            "kendall_tau": statistics.fmean(v["tau"]),
            "kendall_tau_std": statistics.pstdev(v["tau"]),
            "top3_overlap": statistics.fmean(v["top3"]),
            "sentences": len(v["tau"]),
        }
        for k, v in per_pair.items()
    }
    res = {
        "sentences": min(args.sentences, len(SENTENCES)),
        "seconds": round(time.perf_counter() - t0, 1),
        "pairs": out,
        "cosine_change": {k: {"mean": statistics.fmean(v), "median": statistics.median(v)} for k, v in change.items()},
    }
    print(json.dumps({"minilm": res}, indent=1), flush=True)
    return res


# ---------------------------------------------------------------------------------------------- lm GPT


def lm_part(args: argparse.Namespace) -> dict[str, Any]:
    from qkv.apps.tasks.common import fit
    from qkv.apps.tasks.lm import _batches, _loss, bits_per_byte, load_stdlib_text
    from qkv.models.gpt import GPT

    torch.manual_seed(args.seed)
    tr_b, va_b = load_stdlib_text(3_000_000, args.seed)
    tr = torch.tensor(list(tr_b), dtype=torch.long)
    va = torch.tensor(list(va_b), dtype=torch.long)
    ctx = 128
    model = GPT(256, 128, 4, 4, max_len=ctx + 512, pos="rope")
    # repeated random tokens, TransformerLens's probe: 8 rows of 50 random bytes, then the same 50 again; "ascii":
    # from the printable bytes 33-126 the model saw in training, "bytes": from all 256 (most never seen)
    gen = torch.Generator().manual_seed(123)
    probes = {
        "ascii": repeated_tokens(127, 50, 8, generator=gen, low=33),
        "bytes": repeated_tokens(256, 50, 8, generator=gen),
    }
    history: list[dict[str, Any]] = []

    def measure(step: int) -> None:
        was = model.training
        model.eval()
        row: dict[str, Any] = {"step": step, "val_bpb": bits_per_byte(model, va, ctx, max_windows=16)}
        for name, probe in probes.items():
            maps = capture(model, probe)
            ind = head_scores(maps, probe, "induction")
            prev = head_scores(maps, probe, "previous")
            with torch.no_grad():
                logits = model(probe[:, :-1])
                ce = F.cross_entropy(logits.transpose(1, 2), probe[:, 1:], reduction="none").mean(0)
            half = probe.shape[1] // 2
            row[name] = {
                "induction": [[round(float(x), 4) for x in r] for r in ind],
                "previous": [[round(float(x), 4) for x in r] for r in prev],
                "loss_first_half": float(ce[: half - 1].mean()),
                "loss_repeat_half": float(ce[half:].mean()),
            }
            print(
                f"step {step:5d} {name:>5}: max induction {float(ind.max()):.2f} at "
                f"L{int(ind.argmax()) // ind.shape[1]}H{int(ind.argmax()) % ind.shape[1]}, heads > 0.4: "
                f"{[(l, h) for l, h in (ind > 0.4).nonzero().tolist()]}; max previous {float(prev.max()):.2f}; "
                f"loss first/repeat half {row[name]['loss_first_half']:.2f}/{row[name]['loss_repeat_half']:.2f}",
                flush=True,
            )
        print(f"step {step:5d}: val {row['val_bpb']:.2f} bits/byte", flush=True)
        history.append(row)
        if args.json:
            with open(args.json + ".partial", "w") as fh:
                json.dump(history, fh)
        model.train(was)

    def batches() -> Iterator[Tensor]:
        step = 0
        for b in _batches(tr, ctx, 32, args.seed):
            if step % args.every == 0:
                measure(step)
            step += 1
            yield b

    t0 = time.perf_counter()
    fit(model, batches(), _loss, args.lm_steps, 2e-3)
    measure(args.lm_steps)
    if args.save:
        from safetensors.torch import save_model

        save_model(model, args.save)  # tied embedding and head saved once
    return {
        "steps": args.lm_steps,
        "every": args.every,
        "seconds": round(time.perf_counter() - t0, 1),
        "history": history,
    }


def _copy_batches(batch: int, length: int, vocab: int, seed: int) -> Iterator[Tensor]:
    """Random tokens in which a random segment (8-40 tokens, after a random 0-16-token prefix) comes twice:
    predicting the second copy needs a head that finds the earlier occurrence by content (an induction head):
    lengths and offsets vary, so no fixed positional offset does it."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (batch, length + 1), generator=g)
        for r in range(batch):
            p = int(torch.randint(0, 17, (1,), generator=g))
            n = int(torch.randint(8, 41, (1,), generator=g))
            x[r, p + n : p + 2 * n] = x[r, p : p + n]
        yield x


def induction_part(args: argparse.Namespace) -> dict[str, Any]:
    """A 2-layer GPT trained on sequences with repeated segments: when do its induction heads appear?"""
    from qkv.apps.tasks.common import fit
    from qkv.models.gpt import GPT

    torch.manual_seed(args.seed)
    V, L = 64, 96
    model = GPT(V, 64, 2, 4, max_len=2 * L, pos="rope")
    probe = repeated_tokens(V, 30, 8, generator=torch.Generator().manual_seed(123))
    history: list[dict[str, Any]] = []

    def loss_fn(m: nn.Module, xy: Tensor) -> Tensor:
        logits = m(xy[:, :-1])
        return F.cross_entropy(logits.reshape(-1, V), xy[:, 1:].reshape(-1))

    def measure(step: int) -> None:
        was = model.training
        model.eval()
        maps = capture(model, probe)
        ind = head_scores(maps, probe, "induction")
        prev = head_scores(maps, probe, "previous")
        with torch.no_grad():
            ce = F.cross_entropy(model(probe[:, :-1]).transpose(1, 2), probe[:, 1:], reduction="none").mean(0)
        row = {
            "step": step,
            "induction": [[round(float(x), 4) for x in r] for r in ind],
            "previous": [[round(float(x), 4) for x in r] for r in prev],
            "loss_first_half": float(ce[:29].mean()),
            "loss_repeat_half": float(ce[30:].mean()),
        }
        history.append(row)
        print(
            f"copy step {step:5d}: induction {[[round(float(x), 2) for x in r] for r in ind]}, previous max "
            f"{float(prev.max()):.2f} at L{int(prev.argmax()) // 4}H{int(prev.argmax()) % 4}; loss first/repeat half "
            f"{row['loss_first_half']:.2f}/{row['loss_repeat_half']:.2f} (log V = {math.log(V):.2f})",
            flush=True,
        )
        model.train(was)

    def batches() -> Iterator[Tensor]:
        for step, b in enumerate(_copy_batches(32, L, V, args.seed)):
            if step % args.every_copy == 0:
                measure(step)
            yield b

    t0 = time.perf_counter()
    fit(model, batches(), loss_fn, args.copy_steps, 3e-3)
    measure(args.copy_steps)
    return {"steps": args.copy_steps, "seconds": round(time.perf_counter() - t0, 1), "history": history}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="all", choices=["translator", "minilm", "lm", "induction", "all"])
    p.add_argument(
        "--steps", type=int, default=1000, help="training steps of each translator (the demo's full run: 1000)"
    )
    p.add_argument("--quick", action="store_true", help="translator: the demo's small --quick data set and sizes")
    p.add_argument("--n-test", type=int, default=None, help="translator: held-out translations (default: the demo's)")
    p.add_argument("--examples", type=int, default=200, help="held-out translations explained")
    p.add_argument("--tvd-examples", type=int, default=300, help="held-out examples for the output-change measure")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--sentences", type=int, default=100)
    p.add_argument("--lm-steps", type=int, default=1000, help="GPT training steps (the lm task's full run: 1000)")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--copy-steps", type=int, default=1500, help="steps of the repeated-segment GPT (part induction)")
    p.add_argument("--every-copy", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--save", default=None, help="write the trained GPT here (safetensors)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"cpu": _cpu(), "threads": args.threads, "torch": torch.__version__, "args": vars(args)}
    if args.part in ("translator", "all"):
        res["translator"] = translator(args)
    if args.part in ("minilm", "all"):
        res["minilm"] = minilm_part(args)
    if args.part in ("lm", "all"):
        res["lm"] = lm_part(args)
    if args.part in ("induction", "all"):
        res["induction"] = induction_part(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
