"""The prompt splits of a run: training rows in a seeded, resumable order, and the held-out sets.

Rows come from the generated arithmetic task (demo/arithmetic.py) or from files and datasets
folders (rl/data.py); prompts are rendered by data.template (and the chat template) and
tokenized once here.
"""

from __future__ import annotations

import logging
import random
from array import array
from dataclasses import dataclass, field

from demo import arithmetic
from rl.config import Config, ConfigError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Prompt rows ({"prompt", "answer", "prompt_ids", ...}; prompt_ids an array of int32, a
    list's tenth at a million rows: `list()` it where a list is needed) and a seeded,
    resumable epoch order.

    Each epoch's order depends only on the seed and the epoch, so `state()` (rows handed out
    so far) is the exact position, and `restore(state)` resumes it. Row draws are numbered by
    position; a state may also list positions handed out but never trained (run.mode=stream:
    groups in flight at a checkpoint), which a restored split hands out again first.
    """

    rows: list[dict]
    seed: int = 0
    position: int = 0  # rows handed out so far, across epochs
    skipped: int = 0  # bad source rows left out (data.on_bad_row=skip)
    redraw: list[int] = field(default_factory=list)  # positions to hand out again before new ones
    _order: tuple[int, list[int]] = (-1, [])  # (epoch, its order)

    def state(self, position: int | None = None, redraw: list[int] = ()) -> dict:
        """The order's state after `position` rows (default: all handed out so far), with the
        positions among them to hand out again on restore."""
        out = {"position": self.position if position is None else position, "seed": self.seed, "size": len(self.rows)}
        return {**out, "redraw": sorted(redraw)} if redraw else out

    def restore(self, state: dict):
        if (state["seed"], state["size"]) != (self.seed, len(self.rows)):
            raise ValueError(f"cannot resume a split of {state['size']} rows with seed {state['seed']} "
                             f"on {len(self.rows)} rows with seed {self.seed}: the data or the seed changed")
        self.position, self.redraw = state["position"], list(state.get("redraw", []))

    def row_at(self, position: int) -> dict:
        epoch, i = divmod(position, len(self.rows))
        if self._order[0] != epoch:
            order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order = (epoch, order)
        return self.rows[self._order[1][i]]

    def draw(self, n: int) -> list[tuple[int, dict]]:
        """The next n (position, row): the positions to hand out again first, then new ones."""
        out = []
        for _ in range(n):
            if self.redraw:
                position = self.redraw.pop(0)
            else:
                position, self.position = self.position, self.position + 1
            out.append((position, self.row_at(position)))
        return out

    def next_batch(self, n: int) -> list[dict]:
        return [row for _, row in self.draw(n)]


ARITHMETIC_TRAIN_SIZE = 5000  # distinct generated training problems


def _rows(source: str, role: str, key: str, count: int, cfg: Config, check) -> tuple[list[dict], int]:
    """The train or eval rows: generated, or of a file or datasets folder (count 0: all of
    it), passed to check in batches (which tokenizes them), and how many bad rows were skipped.
    key: the config key that named the source, for messages."""
    from rl.data import load_rows

    if source == "arithmetic":
        rows = [{"prompt": p["prompt"], "answer": p["answer"]} for p in arithmetic.problems(role, count, cfg.run.seed)]
        for i, problem in enumerate(check(rows)):
            if problem is not None:  # generated rows are the config's to fit, not the data's
                raise ConfigError(f"{key}=arithmetic, problem {i}: {problem}")
        return rows, 0
    split = cfg.data.train_split if role == "train" else cfg.data.eval_split
    rows, skipped = load_rows(source, cfg.data.prompt_key, cfg.data.answer_key, split, cfg.data.on_bad_row, check,
                              limit=count)  # data.eval_size bounds what is read for evaluation
    if skipped:
        log.warning("%s: skipped %d bad rows (data.on_bad_row=skip); first: %s", source, len(skipped), skipped[0])
    return (rows[:count] if count else rows), len(skipped)


def tokenize_prompt(tokenizer, cfg: Config, prompt: str) -> list[int]:
    """The template applied, then the tokenizer's chat template around it if data.chat_template."""
    return tokenize_prompts(tokenizer, cfg, [prompt])[0]


def tokenize_prompts(tokenizer, cfg: Config, prompts: list[str]) -> list[list[int]]:
    """`tokenize_prompt` of each, in one call of the tokenizer (its batch path: many times
    faster than one call per prompt)."""
    texts = [cfg.data.template.format(prompt=prompt) for prompt in prompts]
    if not cfg.data.chat_template:
        return tokenizer(texts)["input_ids"]
    if tokenizer.chat_template is None:
        raise ConfigError("data.chat_template is true but the model's tokenizer has no chat template")
    out = tokenizer.apply_chat_template([[{"role": "user", "content": text}] for text in texts],
                                        add_generation_prompt=True, tokenize=True)
    return [list(ids) for ids in (out["input_ids"] if hasattr(out, "keys") else out)]


SELECT_SEED = 0  # the selection set is the same sample of data.eval's rows in every run and arm


def carve_selection(rows: list[dict], select_size: int, eval_size: int) -> tuple[list[dict], list[dict]]:
    """(selection rows, eval rows): a fixed random sample of select_size of the rows, and the
    rest in their order (the first eval_size of them; 0: all)."""
    if select_size >= len(rows):
        raise ConfigError(f"data.select_size={select_size} leaves none of data.eval's {len(rows)} prompts to report on")
    chosen = set(random.Random(SELECT_SEED).sample(range(len(rows)), select_size))
    rest = [row for i, row in enumerate(rows) if i not in chosen]
    return [rows[i] for i in sorted(chosen)], rest[:eval_size] if eval_size else rest


def load_splits(cfg: Config, model_path: str) -> tuple[Split, dict[str, Split]]:
    """The train split and the held-out sets ("eval": data.eval, "select": data.select_size of
    data.eval's rows set aside to choose on, then eval.extra by name), with prompts rendered by
    the template and tokenized once.

    A prompt too long for model.max_model_len - rollout.max_tokens is a bad row of its file
    (named, or skipped and counted with data.on_bad_row=skip). A held-out set that shares
    prompts with the training set is warned about, not refused: a small overlap is common in
    public datasets, and training on the eval set on purpose (does it learn at all?) has its
    uses; the warning says how many of its prompts are training prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    room = cfg.model.max_model_len - cfg.rollout.max_tokens  # the most prompt tokens (config.py: >= 1)

    # The tokenizer's control tokens, longest first. In a row's text they would be tokenized as
    # the tokens themselves: a row could close the user's turn and forge the assistant's.
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
                      | set(tokenizer.all_special_tokens), key=len, reverse=True)

    def tokenized(rows: list[dict]) -> list[str | None]:
        """Each row's prompt_ids (an int32 array: 4 bytes a token), or what is wrong with it."""
        problems = []
        for row, ids in zip(rows, tokenize_prompts(tokenizer, cfg, [row["prompt"] for row in rows])):
            forged = next((token for token in specials if token in row["prompt"]), None)
            row["prompt_ids"] = array("i", ids)
            if forged:
                problems.append(f"the prompt holds {forged!r}, a control token of the model's tokenizer, which would "
                                f"be read as the token itself (a row could forge a turn of the chat template): "
                                f"{row['prompt'][:80]!r}")
            elif len(ids) > room:
                problems.append(f"the prompt is {len(ids)} tokens with data.template, more than "
                                f"model.max_model_len - rollout.max_tokens ({cfg.model.max_model_len} - "
                                f"{cfg.rollout.max_tokens}) leaves: {row['prompt'][:80]!r}")
            else:
                problems.append(None)
        return problems

    train_size = ARITHMETIC_TRAIN_SIZE if cfg.data.train == "arithmetic" else 0
    train, train_skipped = _rows(cfg.data.train, "train", "data.train", train_size, cfg, tokenized)
    sources = {"eval": ("data.eval", cfg.data.eval), **{name: (f"eval.extra.{name}", path)
                                                        for name, path in cfg.eval.extra.items()}}
    select, size = cfg.data.select_size, cfg.data.eval_size
    held_out = {name: _rows(path, "eval", key, size + select if name == "eval" and size else size, cfg, tokenized)
                for name, (key, path) in sources.items()}
    if select:
        chosen, rest = carve_selection(held_out["eval"][0], select, size)
        held_out = {"eval": (rest, held_out["eval"][1]), "select": (chosen, 0),
                    **{name: rows for name, rows in held_out.items() if name != "eval"}}
        sources["select"] = ("data.select_size", cfg.data.eval)
    trained = {row["prompt"] for row in train}
    for name, (rows, _) in held_out.items():
        shared = sum(row["prompt"] in trained for row in rows)
        if shared:
            key, path = sources[name]
            log.warning("%s=%s: %d of its %d held-out prompts are training prompts too (data.train=%s): its "
                        "accuracy is not held-out accuracy", key, path, shared, len(rows), cfg.data.train)
    return (Split(train, seed=cfg.run.seed, skipped=train_skipped),
            {name: Split(rows, skipped=skipped) for name, (rows, skipped) in held_out.items()})
