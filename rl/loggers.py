"""Where a run's numbers go: metrics.jsonl always; TensorBoard and Weights & Biases when the
config enables them (logging.tensorboard, logging.wandb), imported only then.

    loggers = Loggers(cfg, run_dir)     # logs the resolved config once
    loggers.log(step, metrics)          # one flat dict per step
    loggers.table(step, rows)           # sample completions: prompt, completion, reward, advantage
    loggers.close()

metrics.jsonl holds every value as logged (lists too); TensorBoard and W&B get the numbers.
Sample tables go to samples.jsonl, a TensorBoard text panel and a W&B table.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from rl.metrics import check

COLUMNS = ("prompt", "completion", "reward", "advantage")


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLogger:
    def __init__(self, run_dir: Path):
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.samples = open(run_dir / "samples.jsonl", "a")

    def config(self, config: dict):
        pass  # config.yaml is written with the run directory

    def log(self, step: int, metrics: dict):
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()

    def table(self, step: int, rows: list[dict]):
        self.samples.write(json.dumps({"step": step, "rows": rows}) + "\n")
        self.samples.flush()

    def close(self):
        self.metrics.close()
        self.samples.close()


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides the events of the steps it logs again.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_at)

    def config(self, config: dict):
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, step: int, metrics: dict):
        for key, value in scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def table(self, step: int, rows: list[dict]):
        def cell(x):
            return (f"{x:.3f}" if isinstance(x, float) else str(x)).replace("|", "\\|").replace("\n", " ")

        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(cell(row[c]) for c in COLUMNS) + " |" for row in rows]
        self.writer.add_text("samples", "\n".join(lines), step)

    def close(self):
        self.writer.close()


def wandb_run(run_dir: Path) -> tuple[str, str | None, str]:
    """The W&B run of a run directory: (name, group, id).

    One W&B run per attempt at a run directory: a resumed run continues it (W&B ignores the
    steps it already has, which the resumed run logs again); an attempt that starts again at
    step 0 after an earlier one was set aside (previous-attempt-<N>, rl/checkpoint.py) is a new
    run, <name>-attempt<N+1>, since W&B would drop the steps it logs again. A sweep's arms
    (RUN/arms/<name>) are runs of their own in one group named for the sweep."""
    sweep = run_dir.parent.parent.name if run_dir.parent.name == "arms" else None
    name = f"{sweep}/{run_dir.name}" if sweep else run_dir.name
    earlier = len(list(run_dir.glob("previous-attempt-*")))
    return name, sweep, re.sub(r"[^A-Za-z0-9_-]", "-", name + (f"-attempt{earlier + 1}" if earlier else ""))[-64:]


class WandbLogger:
    def __init__(self, cfg, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        name, group, run_id = wandb_run(run_dir)  # a sweep's arms: all open at once in this process
        self.run = wandb.init(project=cfg.logging.wandb_project, name=name, id=run_id, resume="allow", group=group,
                              dir=str(run_dir), mode=cfg.logging.wandb_mode, config=config, reinit="create_new")

    def config(self, config: dict):
        pass  # given to wandb.init

    def log(self, step: int, metrics: dict):
        self.run.log({k: v for k, v in scalars(metrics).items() if math.isfinite(v)}, step=step)

    def table(self, step: int, rows: list[dict]):
        table = self.wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
        self.run.log({"samples": table}, step=step)

    def close(self):
        self.run.finish()


class Loggers:
    """Every enabled logger behind one interface."""

    def __init__(self, cfg, run_dir: Path, resumed_at: int | None = None):
        """resumed_at: the step a resumed run logs first."""
        from rl.config import to_dict

        config = to_dict(cfg)
        self.all = [JsonlLogger(run_dir)]
        if cfg.logging.tensorboard:
            self.all.append(TensorBoardLogger(run_dir, resumed_at))
        if cfg.logging.wandb:
            self.all.append(WandbLogger(cfg, run_dir, config))
        for logger in self.all:
            logger.config(config)

    def log(self, step: int, metrics: dict):
        check(metrics)  # every name in rl/metrics.py's registry, with its meaning
        for logger in self.all:
            logger.log(step, metrics)

    def table(self, step: int, rows: list[dict]):
        for logger in self.all:
            logger.table(step, rows)

    def close(self):
        for logger in self.all:
            logger.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
