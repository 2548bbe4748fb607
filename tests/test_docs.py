"""The docs stay true: generated pages current, every link and anchor resolving, every metric
named in them known to the registry, every document the code cites present, the README a
front door."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from rl import metrics
from rl.config import Config, load_config
from rl.loggers import Loggers
from scripts import docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation but - and _ dropped,
    spaces to -, a repeated one suffixed -1, -2, ..."""
    seen, out = {}, set()
    for line in re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, or whose #anchor in that file, does not exist."""
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (where.suffix != ".md" or anchor not in anchors(where)):
            broken.append(f"{target}: no heading #{anchor} in {where.name}")
    return broken


def undocumented(cls, prefix: str = "") -> list[str]:
    """The dotted keys of a config tree whose field has no doc line."""
    missing, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            missing += undocumented(hints[f.name], prefix + f.name + ".")
        if not f.metadata.get("doc", "").strip():
            missing.append(prefix + f.name)
    return missing


def test_the_slug_rule_matches_githubs(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Top\n\n## Full fine-tuning (`lora.rank: 0`)\n\n```\n# not a heading\n```\n\n## Top\n\n"
                    "### What's `learner/*`?\n")
    assert anchors(page) == {"top", "full-fine-tuning-lorarank-0", "top-1", "whats-learner"}


def test_generated_pages_are_current():
    stale = docs.stale()
    assert not stale, f"stale: {sorted(stale)}; run python scripts/docs.py"


def test_every_config_field_has_a_doc_line():
    assert not undocumented(Config), f"config fields without a doc line (rl/config.py doc(...)): {undocumented(Config)}"
    page = (ROOT / "docs" / "configuration.md").read_text()
    keys = [f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default)]
    assert all(f"`{key}`" in page for key in keys)


def test_a_field_without_a_doc_line_is_caught():
    @dataclasses.dataclass(frozen=True)
    class Section:
        documented: int = dataclasses.field(default=1, metadata={"doc": "A key."})
        bare: int = 2

    @dataclasses.dataclass(frozen=True)
    class Tree:
        section: Section = dataclasses.field(default=Section(), metadata={"doc": "A section."})

    assert undocumented(Tree) == ["section.bare"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_anchors_resolve(page):
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [bad](#nowhere) [gone](b.md) `[code](c.md)`\n")
    assert broken_links(tmp_path / "a.md") == ["#nowhere: no heading #nowhere in a.md", "b.md: no such file"]


METRIC = re.compile(r"`((?:reward|eval|learner|advantage|rollout|async|sync|time|fault|data)/[A-Za-z0-9_@<>/*-]+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_metrics_named_in_the_docs_exist(page):
    """A backticked metric name in the docs is one the registry knows (a * stands for any end:
    `rollout/staleness_*`); file paths such as `learner/loss.py` are not metric names."""
    unknown = []
    for name in METRIC.findall(page.read_text()):
        if name.endswith("/"):
            continue
        if "*" in name:
            ok = any(m.startswith(name.split("*")[0]) for m in metrics.METRICS)
        else:
            ok = metrics.known(name)
        if not ok:
            unknown.append(name)
    assert not unknown, f"{page.relative_to(ROOT)} names metrics that rl/metrics.py does not: {unknown}"


def test_the_registry_names_each_metric_once_and_means_something():
    names = [name for _, _, rows in metrics.SECTIONS for name, _ in rows]
    assert len(names) == len(set(names))
    assert all(meaning.strip() for _, _, rows in metrics.SECTIONS for _, meaning in rows)
    assert metrics.known("eval/gsm8k/pass@4") and metrics.known("rollout/busy_frac/sampler-3")
    assert not metrics.known("learner/ratio_esss") and not metrics.known("eval/pass@")


def test_a_metric_outside_the_registry_fails_under_the_tests(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_STRICT_METRICS", "1")
    with Loggers(load_config(None), tmp_path) as log:
        log.log(1, {"reward/mean": 0.5, "learner/ratio_ess": 1.0})
        with pytest.raises(ValueError, match=r"learner/new_thing.*rl/metrics.py"):
            log.log(2, {"learner/new_thing": 1.0})


def test_a_metric_outside_the_registry_warns_in_a_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RL_STRICT_METRICS", "0")
    with Loggers(load_config(None), tmp_path) as log, pytest.warns(UserWarning, match="learner/other_thing"):
        log.log(1, {"learner/other_thing": 1.0})
    assert '"learner/other_thing": 1.0' in (tmp_path / "metrics.jsonl").read_text()  # logged all the same


def test_documents_the_code_cites_exist():
    """A docstring or comment that points to a document points to one in the repository."""
    cited = re.compile(r"(?<![\w/.-])((?:docs|docker)/[\w.-]+\.md|[A-Z][A-Z_]+\.md)")
    missing = []
    folders = ("benchmarks", "common", "configs", "demo", "docker", "learner", "rewards", "rl", "rollout", "scripts", "tests")
    files = [ROOT / "Makefile", ROOT / "pyproject.toml", *(p for d in folders for p in (ROOT / d).rglob("*"))]
    for path in files:
        if path.suffix not in (".py", ".yaml", ".toml") and path.name not in ("Makefile", "Dockerfile"):
            continue
        for name in cited.findall(path.read_text()):
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300, len(lines)
    head = "\n".join(lines[:40])
    assert re.search(r"^make run\b", head, re.M) and re.search(r"^make test\b", head, re.M)
    for page in ("getting-started", "configuration", "operations", "metrics", "measurements"):
        assert f"(docs/{page}.md" in "\n".join(lines), page
