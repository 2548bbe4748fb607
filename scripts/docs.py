"""The generated parts of the docs, from the one place each fact lives in the code.

    python scripts/docs.py            # rewrite them
    python scripts/docs.py --check    # exit 1 naming each stale page (tests/test_docs.py runs this check)

A page holds hand-written prose and generated blocks between `<!-- BEGIN GENERATED: NAME -->`
and `<!-- END GENERATED: NAME -->`; only the blocks are rewritten:

    docs/configuration.md  config     every key of rl/config.py: type, default, bounds, resume freedom, doc
    docs/metrics.md        metrics    every metric of rl/metrics.py's registry, with its meaning
    docs/recipes.md        recipes    each GPU recipe's header from configs/*.yaml (launch, hardware, memory)
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.config import FREE_ON_RESUME, Config, load_config  # noqa: E402
from rl.metrics import SECTIONS  # noqa: E402


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " \\| ".join(map(str, typing.get_args(tp)))
    name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
    name = re.sub(r"tuple\[(.*), \.\.\.\]", r"list[\1]", name)  # YAML lists
    return cell(name.replace("None", "null"))


def default_text(value) -> str:
    """A default as YAML reads it (JSON is YAML): null, true, "text", [..], {..}."""
    return "`" + cell(json.dumps(list(value) if isinstance(value, tuple) else value)) + "`"


def config_block() -> str:
    lines = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines += ["", f"### {section.name}", "", section.metadata["doc"], "",
                  "| key | type | default | bounds | on resume | meaning |", "|---|---|---|---|---|---|"]
        sub = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = ", ".join(f"{op} {b}" for op, b in f.metadata.get("bounds", ()))
            free = "free" if key in FREE_ON_RESUME else "fixed"
            lines.append(f"| `{key}` | {type_name(sub[f.name])} | {default_text(default)} | {bounds} | {free} | "
                         f"{cell(f.metadata['doc'])} |")
    return "\n".join(lines[1:])


def metrics_block() -> str:
    lines = []
    for section, about, rows in SECTIONS:
        lines += ["", f"## {section}", "", about, "", "| metric | meaning |", "|---|---|"]
        lines += [f"| `{name}` | {cell(meaning)} |" for name, meaning in rows]
    return "\n".join(lines[1:])


def recipes_block() -> str:
    lines = []
    configs = ((path, load_config(path)) for path in sorted((ROOT / "configs").glob("*.yaml")))
    for path, cfg in configs:
        if not (cfg.rollout.num_gpus or cfg.learner.num_gpus):  # a GPU recipe names GPUs
            continue
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            header.append(line[2:] if line.startswith("# ") else line[1:])
        r, learner = cfg.rollout, cfg.learner
        gpus = r.num_samplers * r.num_gpus + learner.world_size * learner.num_gpus
        lines += ["", f"### {path.relative_to(ROOT)}", "",
                  f"{cfg.model.path}, rank {cfg.lora.rank}, {cfg.model.dtype}; {gpus:g} GPUs (samplers: {r.num_samplers} "
                  f"x {r.num_gpus:g} GPU, learner ranks: {learner.world_size} x {learner.num_gpus:g} GPU); "
                  f"`run.mode: {cfg.run.mode}`, `rollout.max_staleness: {r.max_staleness}`; "
                  f"{r.prompts_per_step} prompts x {r.group_size} completions of at most {r.max_tokens} tokens "
                  "per step. Its header:", "", "```text", *header, "```"]
    return "\n".join(lines[1:])


BLOCKS = {"config": ("docs/configuration.md", config_block), "metrics": ("docs/metrics.md", metrics_block),
          "recipes": ("docs/recipes.md", recipes_block)}


def rendered(text: str, name: str, block: str, page: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN GENERATED: {name} [^\n]*-->\n).*?(<!-- END GENERATED: {name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: no <!-- BEGIN GENERATED: {name} ... --> / <!-- END GENERATED: {name} --> markers")
    return pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)


def stale() -> dict[str, str]:
    """Page -> its text as it should be, for each page whose generated blocks are out of date."""
    pages = {}
    for name, (page, render) in BLOCKS.items():
        text = pages.get(page) or (ROOT / page).read_text()
        pages[page] = rendered(text, name, render(), page)
    return {page: text for page, text in pages.items() if (ROOT / page).read_text() != text}


def main(argv: list[str]) -> int:
    out = stale()
    if "--check" in argv:
        for page in out:
            print(f"{page} is stale: run python scripts/docs.py")
        return 1 if out else 0
    for page, text in out.items():
        (ROOT / page).write_text(text)
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
