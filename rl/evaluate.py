"""Held-out evaluation on the samplers, with the adapter they serve.

For each held-out set: accuracy of one greedy completion (temperature 0), and, when
eval.samples = n > 0, n completions at rollout.temperature per prompt, from which
pass@k (the chance that at least one of k completions is right) is estimated without bias
as 1 - C(n-c, k) / C(n, k) per prompt with c right (Chen et al., 2021, "Evaluating Large
Language Models Trained on Code"), and mean@n, the mean accuracy of a sampled completion.
All sets go to the samplers as one greedy and one sampled request, scored together; in a sweep
(rl/arms.py) every arm's requests share those two batches.

Metric names: eval/accuracy, eval/pass@k, eval/mean@n for data.eval; eval/<name>/... for
each set in eval.extra, and eval/select/... for the selection set (data.select_size), on which
the best adapter is chosen (`selection_metric`) so that data.eval reports it without the bias
of choosing on the reported prompts.
"""

from __future__ import annotations

import time

from common.records import Sampling


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n completions of which c are right (k <= n)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0  # C(n-c, k) / C(n, k) as a product, which stays exact-ish for large n
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def selection_metric(cfg) -> str:
    """The metric the best adapter is chosen on: eval.best_metric, or by default the selection
    set's accuracy (data.select_size > 0), else data.eval's own (chosen and reported on one set)."""
    return cfg.eval.best_metric or ("eval/select/accuracy" if cfg.data.select_size else "eval/accuracy")


def prefix(name: str) -> str:
    return "eval/" if name == "eval" else f"eval/{name}/"


def evaluate(cfg, samplers, rewards, sets: dict) -> dict:
    """Metrics of every held-out set (name -> Split; "eval" is data.eval)."""
    return evaluate_arms({"": cfg}, samplers, rewards, sets)[""]


def evaluate_arms(arms: dict, samplers, rewards, sets: dict) -> dict[str, dict]:
    """evaluate for each arm (name -> its config), every arm's requests in one greedy and one
    sampled batch on the shared samplers, graded by one reward (the run's) so that arms
    compare; arm -> metrics."""
    from rl.rollouts import fields

    start = time.perf_counter()
    rows = [(name, row) for name, split in sets.items() for row in split.rows]
    prompts = [list(row["prompt_ids"]) for _, row in rows]
    greedy = samplers.generate_many([(prompts, Sampling(1, 0.0, cfg.rollout.max_tokens, seed=0, arm=arm))
                                     for arm, cfg in arms.items()])
    sampled = samplers.generate_many([(prompts, Sampling(cfg.eval.samples, cfg.rollout.temperature,
                                                         cfg.rollout.max_tokens, cfg.rollout.top_p, 1, arm))
                                      for arm, cfg in arms.items() if cfg.eval.samples])
    items = [(g.completions[0].text, fields(row)) for groups in greedy for (_, row), g in zip(rows, groups)]
    items += [(c.text, fields(row)) for groups in sampled for (_, row), g in zip(rows, groups) for c in g.completions]
    right = iter([s == 1.0 for s in rewards.score(items)[0]])
    greedy_right = {arm: [next(right) for _ in rows] for arm in arms}
    elapsed = time.perf_counter() - start
    out = {}
    for arm, cfg in arms.items():
        n, k = cfg.eval.samples, cfg.eval.k
        sampled_right = [next(right) for _ in range(len(rows) * n)]
        metrics = {}
        for name in sets:
            mine = [i for i, (set_name, _) in enumerate(rows) if set_name == name]
            p = prefix(name)
            metrics[p + "accuracy"] = sum(greedy_right[arm][i] for i in mine) / len(mine)
            if n:
                counts = [sum(sampled_right[i * n: (i + 1) * n]) for i in mine]
                metrics[f"{p}pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
                metrics[f"{p}mean@{n}"] = sum(counts) / (n * len(counts))
        metrics["time/eval"] = elapsed  # the one batch of every arm
        out[arm] = metrics
    return out
