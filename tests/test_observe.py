"""What a researcher watches: evaluation metrics, the loggers, the report and its plots.

The samplers here are the small stand-in actors of test_window.py; the default job's run
directory (report.md, plots) is checked on the real stack in test_run.py.
"""

import json
import subprocess
import sys
from math import comb
from pathlib import Path

import pytest
import ray

from rl.config import load_config
from rl.evaluate import evaluate, pass_at_k
from rl.loggers import Loggers
from rl.samplers import Samplers
from rl.splits import Split
from tests.fakes import FakeSampler

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_pass_at_k_matches_a_hand_computation():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction right
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0  # n - c < k: some right one is always drawn
    for n, c, k in [(20, 5, 7), (64, 1, 16), (16, 15, 16)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


class ScriptedRewards:
    """Scores items in the order given (greedy completions first, then the sampled ones)."""

    def __init__(self, scores):
        self.scores = scores

    def score(self, items):
        assert len(items) == len(self.scores)
        return list(self.scores), {}


def test_evaluate_reports_accuracy_pass_at_k_and_mean_at_n_per_set(local_ray):
    cfg = load_config(None, ["eval.samples=4", "eval.k=2"])
    sets = {"eval": Split([{"prompt_ids": [1], "prompt": "a", "answer": "1"},
                           {"prompt_ids": [2], "prompt": "b", "answer": "1"}]),
            "hard": Split([{"prompt_ids": [3], "prompt": "c", "answer": "1"}])}
    greedy = [1, 0, 1]
    sampled = [1, 0, 0, 0] + [0, 0, 0, 0] + [1, 1, 1, 0]  # right: 1 of 4, 0 of 4, 3 of 4
    samplers = Samplers([ray.remote(FakeSampler).remote(0)])
    m = evaluate(cfg, samplers, ScriptedRewards(greedy + sampled), sets)
    assert m["eval/accuracy"] == 0.5 and m["eval/hard/accuracy"] == 1.0
    assert m["eval/pass@2"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["eval/mean@4"] == pytest.approx(1 / 8) and m["eval/hard/mean@4"] == pytest.approx(0.75)
    assert m["eval/hard/pass@2"] == 1.0 and m["time/eval"] >= 0


def tensorboard_scalars(folder: Path) -> tuple[dict, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["tensors"]


def wandb_history(path: Path) -> dict[int, dict]:
    """The history records of an offline W&B run file: LevelDB-log framing (32 KiB blocks,
    7-byte record headers) around protobuf Records."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    # run.finish() can return before W&B's service process has written the run's file when
    # other runs share that service (1 read in 4 found an empty file with two runs open);
    # teardown waits for the service to exit, and with it for every file it holds.
    wandb.teardown()
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
    history = {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
    return history


def test_tensorboard_and_wandb_offline_hold_the_logged_scalars(tmp_path):
    cfg = load_config(None, ["logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline",
                             "logging.wandb_project=test"])
    rows = [{"prompt": "1+1?", "completion": "\\boxed{2}", "reward": 1.0, "advantage": 0.5}]
    with Loggers(cfg, tmp_path) as log:
        for step in range(3):
            log.log(step, {"reward/mean": 0.25 * step, "learner/loss": 1.0 - step, "rollout/staleness_hist": [3, 1]})
        log.table(2, rows)

    scalars, tensors = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["reward/mean"] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert [v for _, v in scalars["learner/loss"]] == [1.0, 0.0, -1.0]
    assert "rollout/staleness_hist" not in scalars  # lists stay in metrics.jsonl
    assert {"config/text_summary", "samples/text_summary"} <= set(tensors)

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [history[s]["reward/mean"] for s in range(3)] == [0.0, 0.25, 0.5]
    assert history[2]["samples/_type"] == "table-file" and history[2]["samples/nrows"] == 1

    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 2] and logged[2]["rollout/staleness_hist"] == [3, 1]
    assert json.loads((tmp_path / "samples.jsonl").read_text())["rows"] == rows


def test_an_attempt_after_a_set_aside_one_is_a_new_wandb_run(tmp_path):
    """W&B drops steps a run already has: an attempt that starts again at step 0 (the earlier
    one moved to previous-attempt-1) logs to a run of its own; resuming it keeps that run."""
    from rl.checkpoint import set_aside
    from rl.loggers import wandb_run

    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    assert wandb_run(run_dir) == ("my run", None, "my-run")
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    set_aside(run_dir)
    assert wandb_run(run_dir) == ("my run", None, "my-run-attempt2") == wandb_run(run_dir)  # the same on resume
    arm = tmp_path / "sweep" / "arms" / "lr=0.1"
    arm.mkdir(parents=True)
    assert wandb_run(arm) == ("sweep/lr=0.1", "sweep", "sweep-lr-0-1")


def test_the_report_builds_from_metrics_jsonl_alone(tmp_path):
    steps = 30
    rows = [{"step": 0, "eval/accuracy": 0.5, "eval/pass@4": 0.7, "eval/mean@4": 0.45}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward/mean": 0.3 + 0.01 * s, "reward/accuracy": 0.3 + 0.01 * s,
               "time/sample": 0.5, "time/score": 0.05, "time/learn": 0.35, "time/sync": 0.02, "time/step": 1.0,
               "sync/latency_ms": 20.0 + s % 3, "sync/load_ms": 5.0, "sync/bytes": 2_250_000,
               "learner/ratio_mean": 1.0, "learner/ratio_max": 1.2, "learner/ratio_ess": 0.99,
               "learner/mismatch_kl": 1e-3, "rollout/response_len": 30 - s / 3, "rollout/truncated_frac": 0.1,
               "rollout/tokens_per_s": 400.0, "learner/tokens_per_s": 900.0, "fault/sampler_restarts": 0}
        if s % 10 == 0:
            row.update({"eval/accuracy": [0.6, 0.8, 0.75][s // 10 - 1], "eval/pass@4": 0.9, "eval/mean@4": 0.6,
                        "time/eval": 2.0, "time/step": 3.0})
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = subprocess.run([sys.executable, str(ROOT / "rl/report.py"), str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    report = (tmp_path / "report.md").read_text()
    for name in ("reward", "time", "sync", "ratio", "length"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(plots/{name}.png)" in report
    assert "before 0.500   best 0.800 (step 20)   final 0.750 (step 30)" in report
    assert "adapter sync   median 21.0 ms, 2.25 MB per version" in report


def test_wandb_holds_each_arm_of_a_sweep_as_a_run_of_its_own(tmp_path):
    """A sweep's arms log at once from one process: one offline W&B run per arm, each with
    only its own scalars, grouped under the sweep's name."""
    cfg = load_config(None, ["logging.wandb=true", "logging.wandb_mode=offline", "logging.wandb_project=test"])
    folders = [tmp_path / "sweep" / "arms" / name for name in ("lr=1e-3", "lr=3e-3")]
    for folder in folders:
        folder.mkdir(parents=True)
    with Loggers(cfg, folders[0]) as one, Loggers(cfg, folders[1]) as two:
        for step in range(2):
            one.log(step, {"reward/mean": 0.1 + step})
            two.log(step, {"reward/mean": 0.5 + step})
        assert one.all[1].run.group == "sweep" and one.all[1].run.name == "sweep/lr=1e-3"
    for folder, first in zip(folders, (0.1, 0.5)):
        (run_file,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
        history = wandb_history(run_file)
        assert [history[s]["reward/mean"] for s in range(2)] == [first, first + 1]


def test_the_sweep_report_ranks_the_arms_from_their_folders(tmp_path):
    """rl/report.py on a sweep folder: a row per arm, best final accuracy first, a failed arm
    says why, and the two figures."""
    import yaml

    from rl.report import sweep_summary, write_sweep

    for name, lr, rank, final in (("a", 1e-3, 1, 0.6), ("b", 3e-3, 1, 0.7), ("c", 1e-3, 4, 0.65)):
        folder = tmp_path / "arms" / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"learner": {"lr": lr}, "lora": {"rank": rank},
                                                            "run": {"seed": 0}}))
        rows = [{"step": 0, "eval/accuracy": 0.5}] + [
            {"step": s, "reward/mean": 0.1 * s, "time/step": 1.0, **({"eval/accuracy": final} if s == 3 else {})}
            for s in (1, 2, 3)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "arms" / "c" / "failed.json").write_text(json.dumps({"step": 3, "error": "3 steps in a row"}))
    report = write_sweep(tmp_path).read_text()
    table = [line for line in report.splitlines() if line.split(" | ")[0] in ("| a", "| b", "| c")]
    assert [line.split(" | ")[0] for line in table] == ["| b", "| c", "| a"]
    assert "failed: 3 steps in a row" in table[1] and "| 0.700 | 0.700 (3) |" in table[0]
    for figure in ("arms_accuracy", "arms_lr"):
        assert (tmp_path / "plots" / f"{figure}.png").stat().st_size > 10_000 and f"plots/{figure}.png" in report
    lines = sweep_summary(tmp_path).splitlines()
    assert lines[1].split()[:2] == ["1.", "b"] and "FAILED" in lines[2]


def test_the_sweep_summary_finds_each_ranks_best_learning_rate_over_seeds(tmp_path):
    """summary.json of a sweep with seeds and a full fine-tuning arm type (rank 0): per rank
    the learning rate with the best mean final accuracy over seeds, the seeds' spread there,
    and LoRA against full fine-tuning (learning rates 10x apart, FLOPs 2 : 3 per step here)."""
    import yaml

    from rl.report import write_sweep

    arms = [(1, 1e-3, 0, 0.6), (1, 1e-3, 1, 0.7), (1, 3e-3, 0, 0.5), (1, 3e-3, 1, 0.5),
            (0, 1e-4, 0, 0.62), (0, 1e-4, 1, 0.58), (0, 3e-5, 0, 0.4), (0, 3e-5, 1, 0.4), (0, 0.0, 0, 0.9)]
    for rank, lr, seed, final in arms:
        folder = tmp_path / "arms" / f"rank={rank},lr={lr:g},seed={seed}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"learner": {"lr": lr}, "lora": {"rank": rank},
                                                            "run": {"seed": seed}}))
        rows = [{"step": 0, "eval/accuracy": 0.4}] + [
            {"step": s, "reward/mean": 0.1, "time/step": 1.0, "learner/flops": 3.0 if rank == 0 else 2.0,
             "learner/peak_mem_gb": 1.5 if rank == 0 else 1.0, **({"eval/accuracy": final} if s == 2 else {})}
            for s in (1, 2)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_sweep(tmp_path).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["arms"]) == 9 and summary["arms"][0]["final_accuracy"] == 0.9  # the lr-0 control ranks first
    assert {"name", "rank", "lr", "seed", "final_accuracy", "best_accuracy", "flops_total", "peak_mem_gb"} <= set(
        summary["arms"][0])
    full, lora = summary["ranks"]  # rank 0 first; the lr-0 control is no candidate for a best learning rate
    assert (full["rank"], full["best_lr"], full["seeds"]) == (0, 1e-4, 2)
    assert full["final_accuracy_mean"] == pytest.approx(0.6) and full["final_accuracy_spread"] == pytest.approx(0.04)
    assert (lora["rank"], lora["best_lr"], lora["final_accuracy_mean"]) == (1, 1e-3, pytest.approx(0.65))
    assert lora["flops_total_mean"] == 4.0 and full["peak_mem_gb"] == 1.5
    versus = summary["lora_vs_full"]
    assert versus["lr_ratio"] == pytest.approx(10) and versus["flops_ratio"] == pytest.approx(2 / 3)
    assert versus["accuracy_difference"] == pytest.approx(0.05) and versus["spread"] == pytest.approx(0.1)
    assert "| full FT | 0.0001 | 0.600 | 0.040 | 2 |" in report and "best learning rate 10x" in report
    for figure in ("arms_lr", "arms_best", "arms_flops"):
        assert (tmp_path / "plots" / f"{figure}.png").stat().st_size > 10_000 and f"plots/{figure}.png" in report


def test_a_sweep_chooses_its_best_learning_rate_on_the_selection_set(tmp_path):
    """With a selection set (data.select_size) the best learning rate is the one best on
    eval/select/accuracy, and eval/accuracy reports it; without one the report says the choice
    was made on the reported prompts (issue 29, item 5)."""
    import yaml

    from rl.report import write_sweep

    def sweep(folder, select):
        for lr, final, chosen in ((1e-3, 0.7, 0.5), (3e-3, 0.6, 0.8)):  # 1e-3 wins on eval, 3e-3 on select
            arm = folder / "arms" / f"lr={lr:g}"
            arm.mkdir(parents=True)
            (arm / "config.yaml").write_text(yaml.safe_dump({"learner": {"lr": lr}, "lora": {"rank": 1},
                                                             "run": {"seed": 0}}))
            rows = [{"step": 0, "eval/accuracy": 0.4}, {"step": 1, "reward/mean": 0.1, "time/step": 1.0,
                                                         "eval/accuracy": final,
                                                         **({"eval/select/accuracy": chosen} if select else {})}]
            (arm / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        report = write_sweep(folder).read_text()
        return json.loads((folder / "summary.json").read_text()), report

    summary, report = sweep(tmp_path / "with", select=True)
    (rank,) = summary["ranks"]
    assert summary["chosen_on"] == "eval/select/accuracy" and rank["best_lr"] == 3e-3
    assert rank["final_accuracy_mean"] == pytest.approx(0.6)  # reported on data.eval's own prompts
    assert "chosen on eval/select/accuracy" in report
    summary, report = sweep(tmp_path / "without", select=False)
    assert summary["chosen_on"] == "eval/accuracy" and summary["ranks"][0]["best_lr"] == 1e-3
    assert "an optimistic estimate" in report
