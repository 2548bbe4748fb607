"""Figures and a one-page report of a run, from its metrics.jsonl alone.

    python rl/report.py RUN_DIR          # any time, also while the run goes on

Writes RUN_DIR/plots/*.png and RUN_DIR/report.md (which links them, with the headline
numbers). The driver calls it at the end of a run and prints `summary` to the console. For a
sweep (RUN_DIR/arms/<name>/, rl/arms.py) each arm gets its own report, and RUN_DIR/report.md
compares them: a table of every arm, each arm's held-out accuracy against step, final
accuracy against learning rate with one line per LoRA rank (0: full fine-tuning; mean over
seeds, bars from the lowest to the highest seed), each rank's best learning rate with its
seeds' spread, held-out accuracy at each rank's best learning rate against step and against
the learner's cumulative FLOPs, and RUN_DIR/summary.json with the same numbers.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

PHASES = ("sample", "score", "learn", "sync", "eval")  # time/<phase>, seconds per step


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no metrics yet")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def eval_keys(rows: list[dict]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith("eval/") and k != "eval/best"})


def headline(rows: list[dict]) -> dict:
    """The numbers a reader wants first."""
    trained = [r for r in rows if r["step"] > 0]
    steps, acc = series(rows, "eval/accuracy")
    out = {"steps": max(r["step"] for r in rows)}
    if acc:
        best = max(range(len(acc)), key=lambda i: acc[i])
        out.update(eval_before=acc[0] if steps[0] == 0 else None, eval_final=acc[-1], eval_final_step=steps[-1],
                   eval_best=acc[best], eval_best_step=steps[best])
    if trained:
        k = out["reward_window"] = min(10, len(trained))
        out["reward_first"] = statistics.fmean(r["reward/mean"] for r in trained[:k])
        out["reward_last"] = statistics.fmean(r["reward/mean"] for r in trained[-k:])
        step_times = [r["time/step"] for r in trained if "time/step" in r]
        if step_times:
            total = sum(step_times)
            out["step_s_median"] = statistics.median(step_times)
            out["steps_per_min"] = 60 * len(step_times) / total
            out["phase_share"] = {p: sum(r.get(f"time/{p}", 0.0) for r in trained) / total for p in PHASES}
        sync = [r["sync/latency_ms"] for r in trained if "sync/latency_ms" in r]
        if sync:
            out["sync_ms_median"] = statistics.median(sync)
            out["sync_bytes"] = trained[-1].get("sync/bytes")
        for key in ("fault/skipped_steps", "fault/sampler_restarts", "fault/resampled_groups", "fault/resumes"):
            if key in trained[-1]:
                out[key] = trained[-1][key]
    return out


def summary(rows: list[dict], run_dir: Path) -> str:
    """One screen: eval before / best / final, time split by phase, sync, faults, where things are."""
    h = headline(rows)
    lines = [f"run {Path(run_dir).name}: {h['steps']} steps"]
    if "eval_final" in h:
        before = "n/a" if h.get("eval_before") is None else f"{h['eval_before']:.3f}"
        lines.append(f"  eval/accuracy  before {before}   best {h['eval_best']:.3f} (step {h['eval_best_step']})   "
                     f"final {h['eval_final']:.3f} (step {h['eval_final_step']})")
        last = [r for r in rows if "eval/accuracy" in r][-1]
        others = [f"{k} {last[k]:.3f}" for k in eval_keys(rows) if k != "eval/accuracy" and k in last]
        if others:
            lines.append("  final  " + "   ".join(others))
    if "reward_first" in h:
        k = h["reward_window"]
        lines.append(f"  reward/mean    first {k} steps {h['reward_first']:.3f} -> last {k} {h['reward_last']:.3f}")
    if "phase_share" in h:
        shares = "  ".join(f"{p} {100 * v:.0f}%" for p, v in h["phase_share"].items())
        lines.append(f"  time           {h['steps_per_min']:.1f} steps/min, median step {h['step_s_median']:.2f} s: "
                     + shares)
    if "sync_ms_median" in h:
        size = f", {h['sync_bytes'] / 1e6:.2f} MB per version" if h.get("sync_bytes") else ""
        lines.append(f"  adapter sync   median {h['sync_ms_median']:.1f} ms{size}")
    faults = {k.split("/")[1]: v for k, v in h.items() if k.startswith("fault/") and v}
    lines.append("  faults         " + (", ".join(f"{k} {v}" for k, v in faults.items()) or "none"))
    run_dir = Path(run_dir)
    chosen = best_choice(run_dir)
    if chosen:
        lines.append(f"  best adapter   step {chosen['step']}, chosen on {chosen['metric']} = {chosen['value']:.3f}"
                     + ("" if "/select/" in chosen["metric"] else " (the prompts that report it: optimistic)"))
    for name in ("adapter", "best_adapter", "report.md", "plots"):
        if (run_dir / name).exists():
            lines.append(f"  {name:<14} {run_dir / name}")
    return "\n".join(lines)


def best_choice(run_dir: Path) -> dict | None:
    """best_adapter/best.json ({"step", "metric", "value"}), if there is a readable one."""
    try:
        chosen = json.loads((Path(run_dir) / "best_adapter" / "best.json").read_text())
        return chosen if {"step", "metric", "value"} <= set(chosen) else None
    except (OSError, ValueError, TypeError):
        return None


def plot(rows: list[dict], out: Path) -> list[Path]:
    """The run's figures as PNG files in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    made = []

    def figure(name: str, title: str, panels: list[tuple[str, list[str]]]):
        panels = [(label, [k for k in keys if series(rows, k)[0]]) for label, keys in panels]
        panels = [(label, keys) for label, keys in panels if keys]
        if not panels:
            return
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
        for ax, (label, keys) in zip(axes[:, 0], panels):
            for key in keys:
                steps, values = series(rows, key)
                style = {"marker": "o"} if len(steps) < len(rows) / 2 else {}  # sparse series: evaluations
                ax.plot(steps, values, label=key, **style)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(out / f"{name}.png")

    figure("reward", "Reward and held-out accuracy",
           [("train reward", ["reward/mean", "reward/accuracy", "reward/unfiltered_mean", "reward/unfiltered_accuracy"]),
            ("held-out", eval_keys(rows))])
    figure("time", "Time per step, by phase", [("seconds", [f"time/{p}" for p in PHASES] + ["time/step"]),
                                               ("tokens / s", ["rollout/tokens_per_s", "learner/tokens_per_s"])])
    figure("sync", "Adapter sync", [("ms", ["sync/latency_ms", "sync/load_ms"])])
    figure("ratio", "Importance ratio (learner / sampler)",
           [("ratio", ["learner/ratio_mean", "learner/ratio_max"]), ("ESS fraction", ["learner/ratio_ess"]),
            ("KL(sampler||learner)", ["learner/mismatch_kl", "learner/mismatch_kl_current", "learner/mismatch_kl_stale"]),
            ("token fraction", [f"learner/{k}_frac" for k in ("capped", "clipped_low", "clipped_high", "dual_clipped",
                                                              "masked_low", "masked_high")])])
    figure("policy", "The policy and its advantages",
           [("entropy (nats/token)", ["learner/entropy"]), ("KL to base", ["learner/kl_base"]),
            ("advantage", ["advantage/mean", "advantage/std"]), ("fraction", ["advantage/zero_frac"])])
    figure("length", "Completions", [("tokens", ["rollout/response_len", "rollout/response_len_right",
                                                 "rollout/response_len_wrong"]),
                                     ("fraction", ["rollout/truncated_frac", "rollout/zero_signal_frac"])])
    return made


def write(run_dir: Path) -> Path:
    """plots/*.png and report.md in run_dir; returns the report's path."""
    run_dir = Path(run_dir)
    rows = read(run_dir)
    figures = plot(rows, run_dir / "plots")
    h = headline(rows)
    text = ["# Run report: " + run_dir.name, "", "```", summary(rows, run_dir), "```", ""]
    captions = {"reward": "Training reward and held-out metrics against step.",
                "time": "Seconds per step in each phase (sample, score, learn, sync, eval) and throughput.",
                "sync": "Time from the learner's new weights to every sampler serving them.",
                "ratio": "Importance-ratio statistics: mean and max, effective sample size, sampler/learner KL (all "
                         "groups; groups of the learner's own version: numerics alone; stale groups: numerics and "
                         "lag), and the share of tokens each objective option capped, clipped or masked.",
                "policy": "The policy's entropy per token, its KL to the base model (learner.kl_base_every), and "
                          "the advantages: mean, std and the share of tokens with none.",
                "length": "Completion length (all, right, wrong), share cut at max_tokens, share of groups with no "
                          "signal."}
    for path in figures:
        text += [f"## {path.stem}", "", captions[path.stem], "", f"![{path.stem}](plots/{path.name})", ""]
    text += ["Headline numbers as JSON:", "", "```json", json.dumps(h, indent=1), "```", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(text))
    return report


def cumulative_flops(rows: list[dict]) -> dict[int, float]:
    """Step -> the learner's FLOPs summed up to and including it."""
    total, out = 0.0, {}
    for r in rows:
        total += r.get("learner/flops", 0.0)
        out[r["step"]] = total
    return out


def arms_table(run_dir: Path) -> list[dict]:
    """One row per arm of a sweep, best final accuracy first: its settings (learning rate,
    rank), headline numbers and status (an arm that failed says why)."""
    import yaml

    out = []
    for folder in sorted((Path(run_dir) / "arms").iterdir()):
        if not (folder / "metrics.jsonl").exists():
            continue
        rows, cfg = read(folder), yaml.safe_load((folder / "config.yaml").read_text())
        h = headline(rows)
        last = ([r for r in rows if "eval/accuracy" in r] or [{}])[-1]
        select = series(rows, "eval/select/accuracy")[1]
        failed = folder / "failed.json"
        out.append({"arm": folder.name, "lr": cfg["learner"]["lr"], "rank": cfg["lora"]["rank"],
                    "seed": cfg["run"]["seed"], "flops_total": sum(r.get("learner/flops", 0.0) for r in rows),
                    "peak_mem_gb": max((r["learner/peak_mem_gb"] for r in rows if "learner/peak_mem_gb" in r),
                                       default=None),
                    "final": h.get("eval_final"), "best": h.get("eval_best"), "best_step": h.get("eval_best_step"),
                    "select_final": select[-1] if select else None,
                    "pass_at_k": next((v for k, v in last.items() if k.startswith("eval/pass@")), None),
                    "reward_last": h.get("reward_last"), "steps_per_min": h.get("steps_per_min"), "steps": h["steps"],
                    "status": "failed: " + json.loads(failed.read_text())["error"] if failed.exists() else "ok",
                    "rows": rows})
    return sorted(out, key=lambda a: -(a["final"] if a["final"] is not None else float("-inf")))


def rank_name(rank: int) -> str:
    return "full FT" if rank == 0 else f"rank {rank}"


def chosen_on(arms: list[dict]) -> str:
    """The metric a sweep's best learning rates are chosen on: the selection set's final
    accuracy when every arm has one (data.select_size), else the reported set's own."""
    return "eval/select/accuracy" if arms and all(a["select_final"] is not None for a in arms) else "eval/accuracy"


def by_rank(arms: list[dict]) -> dict[int, dict]:
    """Per rank (0: full fine-tuning), over the arms that finished: the mean final accuracy
    over seeds at each learning rate, the best learning rate (chosen on `chosen_on`), and at
    that rate the spread (highest minus lowest seed), the seeds, the mean FLOPs and peak
    memory, and the arms."""
    out = {}
    key = "select_final" if chosen_on(arms) == "eval/select/accuracy" else "final"
    for rank in sorted({a["rank"] for a in arms}):
        groups: dict[float, list[dict]] = {}
        for a in arms:
            if a["rank"] == rank and a["lr"] > 0 and a["final"] is not None and a["status"] == "ok":
                groups.setdefault(a["lr"], []).append(a)
        if not groups:
            continue
        means = {lr: statistics.mean(a["final"] for a in group) for lr, group in groups.items()}
        choice = {lr: statistics.mean(a[key] for a in group) for lr, group in groups.items()}
        best = max(choice, key=choice.get)
        finals = [a["final"] for a in groups[best]]
        out[rank] = {"rank": rank, "best_lr": best, "final_accuracy_mean": means[best],
                     "final_accuracy_spread": max(finals) - min(finals), "seeds": len(finals),
                     "flops_total_mean": statistics.mean(a["flops_total"] for a in groups[best]),
                     "peak_mem_gb": max((a["peak_mem_gb"] for a in groups[best] if a["peak_mem_gb"] is not None),
                                        default=None),
                     "final_accuracy_by_lr": {str(lr): means[lr] for lr in sorted(means)},
                     "arms": [a["arm"] for a in groups[best]]}
    return out


def lora_against_full(ranks: dict[int, dict]) -> dict | None:
    """The best LoRA rank (by mean final accuracy at its best learning rate) against full
    fine-tuning at its own: the ratio of their best learning rates and of their FLOPs."""
    lora = [r for rank, r in ranks.items() if rank > 0]
    if 0 not in ranks or not lora:
        return None
    best, full = max(lora, key=lambda r: r["final_accuracy_mean"]), ranks[0]
    return {"best_lora_rank": best["rank"], "lora_accuracy": best["final_accuracy_mean"],
            "full_accuracy": full["final_accuracy_mean"],
            "accuracy_difference": best["final_accuracy_mean"] - full["final_accuracy_mean"],
            "spread": max(best["final_accuracy_spread"], full["final_accuracy_spread"]),
            "lr_ratio": best["best_lr"] / full["best_lr"],
            "flops_ratio": best["flops_total_mean"] / full["flops_total_mean"] if full["flops_total_mean"] else None}


def summary_json(arms: list[dict]) -> dict:
    """RUN_DIR/summary.json: per arm its settings and results, per rank the best learning
    rate and its mean final accuracy over seeds, and LoRA against full fine-tuning."""
    ranks = by_rank(arms)
    return {"arms": [{"name": a["arm"], "rank": a["rank"], "lr": a["lr"], "seed": a["seed"],
                      "final_accuracy": a["final"], "best_accuracy": a["best"], "flops_total": a["flops_total"],
                      "peak_mem_gb": a["peak_mem_gb"], "status": a["status"]} for a in arms],
            "ranks": list(ranks.values()), "lora_vs_full": lora_against_full(ranks), "chosen_on": chosen_on(arms)}


def num(x, fmt: str = ".3f", missing: str = "n/a") -> str:
    """A number as the sweep's table and summary show it."""
    return missing if x is None else format(x, fmt)


def sweep_summary(run_dir: Path) -> str:
    """The arms ranked by final held-out accuracy, one line each."""
    arms = arms_table(run_dir)
    lines = [f"sweep {Path(run_dir).name}: {len(arms)} arms, ranked by final eval/accuracy"]
    for i, a in enumerate(arms, 1):
        lines.append(f"  {i:>2}. {a['arm']:<28} final {num(a['final'])}  best {num(a['best'])} (step {a['best_step']})  "
                     f"reward {num(a['reward_last'])}" + ("" if a["status"] == "ok" else "  FAILED"))
    lines.append(f"  report         {Path(run_dir) / 'report.md'}")
    return "\n".join(lines)


def write_sweep(run_dir: Path) -> Path:
    """RUN_DIR/report.md and plots/ comparing a sweep's arms; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    arms = arms_table(run_dir)
    (run_dir / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for a in arms:
        steps, acc = series(a["rows"], "eval/accuracy")
        ax.plot(steps, acc, marker="o", markersize=3, label=a["arm"])
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "arms_accuracy.png", dpi=110)
    plt.close(fig)
    ranks = by_rank(arms)
    fig, ax = plt.subplots(figsize=(6, 4))
    for rank, r in ranks.items():
        points = []
        for lr in sorted(float(x) for x in r["final_accuracy_by_lr"]):
            finals = [a["final"] for a in arms if a["rank"] == rank and a["lr"] == lr and a["final"] is not None
                      and a["status"] == "ok"]
            if lr > 0:
                points.append((lr, statistics.mean(finals), min(finals), max(finals)))
        if points:
            lrs, means, lows, highs = zip(*points)
            ax.errorbar(lrs, means, yerr=[[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]],
                        marker="o", capsize=3, label=rank_name(rank))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "arms_lr.png", dpi=110)
    plt.close(fig)
    for name, x_of, label in (("arms_best", lambda steps, flops: steps, "step"),
                              ("arms_flops", lambda steps, flops: flops, "learner FLOPs (cumulative)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for rank, r in ranks.items():
            runs = [next(a for a in arms if a["arm"] == name_) for name_ in r["arms"]]
            curves = [(series(a["rows"], "eval/accuracy"), cumulative_flops(a["rows"])) for a in runs]
            steps = curves[0][0][0]
            if any(c[0][0] != steps for c in curves):
                continue  # seeds evaluated at other steps (a stopped arm)
            accs = list(zip(*[c[0][1] for c in curves]))
            xs = x_of(steps, [statistics.mean(c[1].get(s, 0.0) for c in curves) for s in steps])
            ax.plot(xs, [statistics.mean(v) for v in accs], marker="o", markersize=3,
                    label=f"{rank_name(rank)}, lr {r['best_lr']:g}")
            ax.fill_between(xs, [min(v) for v in accs], [max(v) for v in accs], alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("held-out accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "plots" / f"{name}.png", dpi=110)
        plt.close(fig)
    (run_dir / "summary.json").write_text(json.dumps(summary_json(arms), indent=1))

    text = [f"# Sweep report: {run_dir.name}", "", f"{len(arms)} arms on one fleet (an adapter or, rank 0, a full model each), "
            "ranked by final held-out accuracy (each arm's own report is in arms/<name>/report.md).", "",
            "| arm | lr | rank | final acc | best acc (step) | pass@k | reward (last 10) | steps/min | status |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        text.append(f"| {a['arm']} | {a['lr']:g} | {a['rank']} | {num(a['final'], missing='')} | "
                    f"{num(a['best'], missing='')} ({a['best_step']}) | {num(a['pass_at_k'], missing='')} | "
                    f"{num(a['reward_last'], missing='')} | {num(a['steps_per_min'], '.1f', '')} | "
                    f"{a['status']} |")
    text += ["", "## Held-out accuracy against step", "", "![arms_accuracy](plots/arms_accuracy.png)", "",
             "## Final accuracy against learning rate, one line per rank", "",
             "Mean over seeds; the bars run from the lowest seed to the highest.", "", "![arms_lr](plots/arms_lr.png)", "",
             "## Each rank at its best learning rate", "",
             (f"Best learning rates chosen on {chosen_on(arms)} (a selection set apart from the reported prompts)."
              if chosen_on(arms) != "eval/accuracy" else "Best learning rates chosen on eval/accuracy, the prompts "
              "that report them: an optimistic estimate (data.select_size sets a selection set apart)."), "",
             "| rank | best lr | final acc (mean over seeds) | spread over seeds | seeds | learner FLOPs (run) | peak memory (GB) |",
             "|---|---|---|---|---|---|---|"]
    for rank, r in ranks.items():
        text.append(f"| {rank_name(rank)} | {r['best_lr']:g} | {num(r['final_accuracy_mean'])} | "
                    f"{num(r['final_accuracy_spread'])} | {r['seeds']} | {r['flops_total_mean']:.3g} | "
                    f"{num(r['peak_mem_gb'], '.2f', '')} |")
    versus = lora_against_full(ranks)
    if versus:
        text += ["", f"Best LoRA ({rank_name(versus['best_lora_rank'])}) against full fine-tuning: final accuracy "
                 f"{num(versus['lora_accuracy'])} against {num(versus['full_accuracy'])} (difference "
                 f"{versus['accuracy_difference']:+.3f}; the larger seed spread of the two is "
                 f"{num(versus['spread'])}), best learning rate {versus['lr_ratio']:.3g}x full fine-tuning's, "
                 f"FLOPs {num(versus['flops_ratio'], '.2f')}x."]
    text += ["", "Held-out accuracy at each rank's best learning rate (mean over seeds, band from the lowest to "
             "the highest seed), against step and against the learner's cumulative FLOPs (learner/flops.py):", "",
             "![arms_best](plots/arms_best.png)", "", "![arms_flops](plots/arms_flops.png)", "",
             "The same numbers as JSON: [summary.json](summary.json).", ""]
    report = run_dir / "report.md"
    report.write_text("\n".join(text))
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python rl/report.py RUN_DIR")
    target = Path(sys.argv[1])
    if (target / "arms").is_dir():
        for arm in sorted((target / "arms").iterdir()):
            write(arm)
        print(write_sweep(target))
    else:
        print(write(target))
