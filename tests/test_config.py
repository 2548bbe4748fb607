"""The config tree: recipes load, bad keys and types are named, light modules stay light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import Config, ConfigError, describe, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_starts_with_its_launch_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert "rl/run.py" in path.read_text().split("\n\n")[0]


def test_gpu_recipes_ask_for_gpus():
    for name in ("qwen2.5-math-1.5b-gsm8k.yaml", "qwen3-8b-math.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.rollout.num_gpus >= 1 and cfg.learner.num_gpus >= 1 and cfg.model.dtype == "bfloat16"


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/default.yaml", ["learner.lr=1e-2", "loss.ratio_cap=2", "run.name=x",
                                                       "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.learner.lr == 0.01 and cfg.loss.ratio_cap == 2.0 and cfg.run.name == "x"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert load_config(None, ["loss.ratio_cap=null"]).loss.ratio_cap is None


@pytest.mark.parametrize("override, message", [
    (["rollout.gruop_size=4"], "unknown config key rollout.gruop_size"),
    (["learner.lr=fast"], "learner.lr: expected float"),
    (["rollout.group_size=2.5"], "rollout.group_size: expected int"),
    (["run.progress=3"], "run.progress: expected bool"),
    (["nosuch.key=1"], "unknown config key nosuch"),
    (["rollout=3"], "rollout: expected a mapping"),
    (["loss.normalizer=mean"], "loss.normalizer must be one of sequences | tokens | sequence_mean | none, got 'mean'"),
    (["learner.zero_stage=3"], "learner.zero_stage must be one of 0 | 1 | 2, got 3"),
    (["learner.zero_stage='1'"], "learner.zero_stage must be one of 0 | 1 | 2, got '1'"),
    (["run.mode=Async"], "run.mode must be one of sync | async"),
    # Issue 29: each of these trained, silently wrong.
    (["rollout.top_p=0.9"], "rollout.top_p=0.9: vLLM's log-probs are then renormalised over the nucleus"),
    (["model.dtype=float16"], "model.dtype=float16 would train without loss scaling"),
    (["learner.kl_base_every=5", "lora.rank=0"], "learner.kl_base_every needs LoRA"),
    (["data.select_size=8", "eval.extra={select: a.jsonl}"], "eval.extra.select: the name is taken"),
    (["loss.dual_clip=1"], "loss.dual_clip must be > 1, got 1.0"),
    (["loss.ratio_mask=0.5"], "loss.ratio_mask must be > 1, got 0.5"),
    (["loss.clip_eps=1.5"], "loss.clip_eps must be > 0 and <= 1, got 1.5"),
    (["rollout.filter_on=length"], "rollout.filter_on must be one of correctness | reward"),
    (["rollout.group_size=1"], "rollout.group_size must be >= 2"),
    (["learner.lr"], "expected dotted.key=value"),
    (["lora.rank=-1"], "lora.rank must be >= 0 and <= 512, got -1 (LoRA rank r"),
    (["lora.rank=0", "sync.max_message_mb=16"], "chunks of sync.chunk_mb: it must be > 0 and <= sync.max_message_mb"),
    (["run.mode=stream", "lora.rank=0"], "run.mode=stream needs LoRA (lora.rank >= 1)"),
    (["run.mode=stream", "arms.grid={learner.lr: [1e-3, 1e-4]}"], "run.mode=stream runs one experiment"),
    (["run.mode=async", "rollout.filter_zero_signal=true"], "rollout.filter_zero_signal needs run.mode sync or stream"),
    (["rollout.max_draws_per_step=4"], "rollout.max_draws_per_step must be 0 or >= rollout.prompts_per_step"),
    (["rollout.oversample=-2"], "rollout.oversample must be >= -1, got -2"),
    (["rollout.length_profile=short"], "rollout.length_profile must be one of  | longtail"),
    # Issue 30: conflicting keys, each accepted before.
    (["run.mode=sync", "rollout.max_staleness=3"], "rollout.max_staleness=3 with run.mode=sync"),
    (["data.template='{prompt:>3000000}'"], "data.template: {prompt:>3000000} formats the prompt"),
    (["data.template='Q: {prompt!r}'"], "data.template: {prompt!r} formats the prompt"),
    (["eval.samples=0", "eval.k=9"], "eval.k=9 with eval.samples=0: pass@k needs sampled completions"),
    (["run.mode=async", "rollout.max_staleness=1", "learner.cpu_cores=0-1", "rollout.cpu_cores=1,3"],
     "learner.cpu_cores ('0-1') and rollout.cpu_cores ('1,3') share CPUs [1]"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, override)


@pytest.mark.parametrize("override, message", [
    # Each of these was accepted, then failed only inside an actor, or without naming the key.
    ("learner.lr=-1", "learner.lr must be >= 0, got -1.0"),
    ("learner.lr=.nan", "learner.lr must be a finite number, got nan"),
    ("learner.lr=.inf", "learner.lr must be a finite number, got inf"),
    ("learner.lr=nan", "learner.lr must be a finite number, got nan"),  # YAML's string "nan", coerced
    ("learner.weight_decay=-0.1", "learner.weight_decay must be >= 0, got -0.1"),
    ("rollout.prompts_per_step=0", "rollout.prompts_per_step must be >= 1, got 0"),
    ("learner.micro_batch_size=0", "learner.micro_batch_size must be >= 1, got 0"),
    ("model.max_model_len=0", "model.max_model_len must be >= 1, got 0"),
    ("reward.num_workers=0", "reward.num_workers must be >= 1, got 0"),
    ("reward.timeout_s=0", "reward.timeout_s must be > 0, got 0.0"),
    ("reward.timeout_s=-5", "reward.timeout_s must be > 0, got -5.0"),
    ("sync.max_message_mb=0", "sync.max_message_mb must be > 0, got 0.0"),
    ("sync.ack_timeout_s=0", "sync.ack_timeout_s must be > 0, got 0.0"),
    ("lora.rank=513", "lora.rank must be >= 0 and <= 512, got 513"),
    ("lora.alpha=0", "lora.alpha must be > 0, got 0.0"),
    ("lora.alpha=-32", "lora.alpha must be > 0, got -32.0"),
    ("rollout.kv_cache_gb=-1", "rollout.kv_cache_gb must be >= 0, got -1.0"),
    ("run.eval_every=-1", "run.eval_every must be >= 0, got -1"),
    ("logging.samples_every=-1", "logging.samples_every must be >= 0, got -1"),
    ("data.eval_size=-1", "data.eval_size must be >= 0, got -1"),
    ("rollout.max_tokens=0", "rollout.max_tokens must be >= 1, got 0"),
    ("rollout.max_tokens=256", "rollout.max_tokens (256) must be < model.max_model_len (256)"),
    ("rollout.gpu_memory_utilization=1.5", "rollout.gpu_memory_utilization must be > 0 and <= 1, got 1.5"),
    ("rollout.resources={sampler_node: -1}", "rollout.resources.sampler_node must be >= 0, got -1.0"),
    ("loss.ratio_cap=.inf", "loss.ratio_cap must be a finite number, got inf"),
    ("run.seed=-1", "run.seed must be >= 0, got -1"),
    ("eval.k=0", "eval.k must be >= 1, got 0"),
    ("data.template='Q: {question}'", "data.template 'Q: {question}' may use only {prompt}"),
    ("data.template='Q: {prompt} {0}'", "may use only {prompt}, the problem text (read from the data.prompt_key "
                                        "field of a file row), not {0}"),
    ("data.template='Q: { {prompt}'", "data.template 'Q: { {prompt}': unexpected '{' in field name (write {{ and }}"),
    ("data.template='Q: {prompt} }'", "data.template 'Q: {prompt} }': Single '}' encountered"),
    ("data.template='Question:'", "data.template 'Question:' must contain {prompt}"),
    ("arms.list=[{learner.lr: -1}]", "arms.list[0]: learner.lr must be >= 0, got -1.0"),
])
def test_bad_values_fail_when_the_config_loads_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("override", [
    # 0 (or -1) where the field's doc gives it a meaning, and the edges of each range.
    "lora.rank=0", "lora.rank=512", "learner.lr=0", "learner.weight_decay=0", "learner.grad_clip=0",
    "learner.max_tokens_per_micro=0", "learner.logprob_chunk=0", "rollout.kv_cache_gb=0", "rollout.top_p=1",
    "rollout.gpu_memory_utilization=1", "rollout.max_staleness=0", "rollout.max_restarts=0",
    "rollout.oversample=-1", "rollout.oversample=0", "rollout.max_draws_per_step=0", "rollout.num_cpus=0.1",
    "rollout.max_tokens=255", "run.eval_every=0", "run.checkpoint_every=0", "run.steps=0", "run.seed=0",
    "logging.samples_every=0", "eval.samples=0", "sync.probe_every=-1", "sync.probe_every=0",
    "reward.format_weight=0", "reward.overlong_buffer=0", "reward.overlong_penalty=0", "model.max_model_len=2",
    "data.template='{{x}} {prompt} {prompt}'", "data.template='{prompt}'",
])
def test_values_with_a_meaning_at_the_edges_still_load(override):
    load_config(None, [override, "rollout.max_tokens=1"] if override == "model.max_model_len=2" else [override])


def test_eval_size_zero_means_all_of_a_file():
    assert load_config(None, ["data.eval_size=0", "data.eval=held_out.jsonl"]).data.eval_size == 0
    with pytest.raises(ConfigError, match="data.eval_size must be > 0 for the generated arithmetic eval split"):
        load_config(None, ["data.eval_size=0"])


def test_every_number_declares_its_bounds():
    """Each int or float key (a dict of floats too) says which values it takes, in its doc(...)
    field: a new key without bounds fails here rather than in an actor."""
    import dataclasses
    import typing

    unbounded, numbers = [], 0
    sections = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        types = typing.get_type_hints(sections[section.name])
        for f in dataclasses.fields(sections[section.name]):
            tp = types[f.name]
            args = typing.get_args(tp)
            inner = args[1:] if typing.get_origin(tp) is dict else [a for a in args if a is not type(None)] or [tp]
            if typing.get_origin(tp) is not typing.Literal and {int, float} & set(inner):
                numbers += 1
                unbounded += [] if f.metadata["bounds"] else [f"{section.name}.{f.name}"]
    assert numbers >= 50  # the check sees the numbers (ints, floats, optional floats, resource maps)
    assert not unbounded, unbounded


def test_a_bad_value_in_a_file_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner:\n  lr: -0.001\n")
    with pytest.raises(ConfigError, match=r"learner\.lr must be >= 0, got -0\.001 .*\(config .*bad\.yaml\)"):
        load_config(bad)


def test_with_values_checks_bounds_too():
    from rl.config import with_values

    with pytest.raises(ConfigError, match=re.escape("arm x: reward.timeout_s must be > 0, got 0.0")):
        with_values(load_config(), {"reward.timeout_s": 0.0}, "arm x: ")


def test_duplicate_yaml_keys_are_refused_naming_file_and_key(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("learner:\n  lr: 0.01\nrun:\n  steps: 3\nlearner:\n  weight_decay: 0.1\n")
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml: not valid YAML: .*found duplicate key 'learner'.*line 5"):
        load_config(twice)
    inner = tmp_path / "inner.yaml"
    inner.write_text("run:\n  steps: 3\n  eval_every: 1\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"(?s)inner\.yaml: .*found duplicate key 'steps'.*line 4"):
        load_config(inner)
    with pytest.raises(ConfigError, match=r"(?s)override 'arms.grid=.*found duplicate key 'learner.lr'"):
        load_config(None, ["arms.grid={learner.lr: [1e-3], learner.lr: [1e-4]}"])
    merged = tmp_path / "merged.yaml"  # a key over a YAML merge (<<) overrides it: not a duplicate
    merged.write_text("run: {<<: {steps: 3, seed: 1}, steps: 4}\n")
    assert (load_config(merged).run.steps, load_config(merged).run.seed) == (4, 1)


def test_a_non_utf8_config_names_the_file_and_line(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run:\n  steps: 3\n  name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml: line 3: not UTF-8 text \(byte 0xe9"):
        load_config(latin)
    out = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), str(latin)], capture_output=True, text=True)
    assert out.returncode != 0 and "latin.yaml: line 3: not UTF-8 text" in out.stderr


def test_resume_freedom_is_recorded_on_the_fields():
    from rl.checkpoint import run_keys
    from rl.config import free_keys

    free = free_keys()
    assert {"run.steps", "learner.micro_batch_size", "eval.samples", "logging.wandb"} <= free  # eval, logging: whole
    assert not {"learner.lr", "rollout.temperature", "loss.normalizer", "lora.rank", "run.seed"} & free
    keys = run_keys(to_dict(load_config()))
    assert "learner.lr" in keys and not set(keys) & free
    assert all(("Free on resume." in line) == (line.split(" ")[0] in free) for line in describe())


def test_bad_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"rollout\.temprature.*bad\.yaml"):
        load_config(bad)


def test_help_lists_every_field():
    out = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), "--help"], capture_output=True, text=True, check=True)
    keys = [line.split(" ")[0] for line in describe()]
    assert len(keys) > 30
    for key in keys:
        assert f"  {key} (" in out.stdout


def test_print_config_and_config_errors_exit_cleanly():
    out = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), "configs/default.yaml", "run.steps=7",
                          "--print-config"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "steps: 7" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), "run.stpes=7"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "unknown config key run.stpes" in bad.stderr


def test_light_modules_import_without_heavy_dependencies():
    code = ("import sys; import rl.config, demo.arithmetic, rl.data, rewards.math, rewards.pool, rollout.channel, "
            "common.records, common.specs, common.cpus, rl.faults; "
            "heavy = [m for m in ('torch', 'vllm', 'deepspeed', 'ray', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_actor_packages_never_import_the_driver():
    """learner/, rollout/, rewards/ and common/ sit below rl/: none of their modules imports rl."""
    import ast

    upward = []
    for package in ("learner", "rollout", "rewards", "common"):
        for path in (ROOT / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                upward += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "rl" or n.startswith("rl.")]
    assert not upward, upward


def test_the_probe_tolerance_follows_from_the_dtypes():
    """Issue 29, item 2: the GPU recipes kept the float32 tolerance (1e-3) in bfloat16, where the
    first probe measures more (2.3e-3 in the rehearsal of configs/qwen3-8b-math.yaml). Unset, it
    is the coarsest dtype's (rl/probe.py argues both); set, it is the user's."""
    from rl.probe import tolerance

    assert tolerance(load_config(None, [])) == 1e-3
    assert tolerance(load_config(None, ["model.dtype=bfloat16"])) == 5e-2
    assert tolerance(load_config(None, ["sync.wire_dtype=bfloat16"])) == 5e-2
    assert tolerance(load_config(None, ["model.dtype=bfloat16", "sync.probe_tolerance=0.2"])) == 0.2
    for recipe in ("qwen2.5-math-1.5b-gsm8k.yaml", "qwen3-8b-math.yaml"):
        assert tolerance(load_config(ROOT / "configs" / recipe)) == 5e-2
