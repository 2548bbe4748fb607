"""benchmarks/soak.py's arithmetic: the slope per 1,000 steps, its noise and the growth call."""

import importlib.util
import json
import random
from pathlib import Path

spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


def test_a_slope_is_found_with_its_standard_error_and_growth_is_told_from_noise():
    xs = list(range(200, 1001, 50))  # 17 samples after a 200-step warm-up, as the default soak takes
    exact = soak.fit(xs, [100 + 0.002 * x for x in xs])  # 2 MB per 1,000 steps, no noise
    assert exact["per_1k"] == 2.0 and exact["se_per_1k"] == 0.0 and exact["grows"] and exact["n"] == 17
    rng = random.Random(0)
    # Flat with +-5 MB of noise: the slope's standard error is sd / sqrt(sum (x - mean)^2) = 5 / 1010 per
    # step, about 5 per 1,000 steps, so a slope within 3 of them is called noise.
    flat = soak.fit(xs, [100 + rng.gauss(0, 5) for _ in xs])
    assert 3 < flat["se_per_1k"] < 8 and abs(flat["per_1k"]) < 3 * flat["se_per_1k"] and not flat["grows"]
    assert 3 < flat["resid_sd"] < 8
    # 50 MB per 1,000 steps under the same noise: 10 standard errors, growth.
    assert soak.fit(xs, [100 + 0.05 * x + rng.gauss(0, 5) for x in xs])["grows"]
    assert soak.fit(xs[:2], [1, 2]) is None  # two points give no noise estimate
    assert soak.fit(xs, [None] * len(xs)) is None  # a group with no process (vLLM's engine inside the sampler)


def test_the_jobs_step_is_the_last_whole_line_of_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert soak.last_step(metrics) is None
    metrics.write_text("".join(json.dumps({"step": s, "x": 1}) + "\n" for s in range(3)) + '{"step": 3, "x"')
    assert soak.last_step(metrics) == 2  # a line being written is not read


def test_a_sample_taken_while_the_job_shuts_down_is_left_out_of_the_fits():
    """The last sample of a 1,000-step soak was once taken as the job exited (no learner, no
    sampler, the driver at 0 MB): it turned the driver's fit into -208 MB per 1,000 steps."""
    rows = [{"step": s, "rss_mb": {g: 100.0 for g in soak.GROUPS}, "fds_total": 50, "shm_job_mb": 0.0,
             "shm_total_mb": 1.0, "shm_job_files": [], "adapters": {}, "processes": {"learner": 1, "sampler": 1}}
            for s in range(200, 1001, 50)]
    rows[-1] = {**rows[-1], "rss_mb": {g: 0.0 for g in soak.GROUPS}, "fds_total": 0,
                "processes": {"learner": 0, "sampler": 0}}
    out = soak.summarize(rows, warmup=200)
    assert out["rss_mb_per_1k_steps"]["driver"] == 0.0 and out["fds_per_1k_steps"] == 0.0
    assert out["fitted_samples"] == len(rows) - 1 and out["steps"] == 950
