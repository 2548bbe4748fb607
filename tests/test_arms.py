"""A sweep's arms from its config: what may vary, how arms are named, and the errors."""

from types import SimpleNamespace

import pytest

from rl.arms import expand, show
from rl.config import ConfigError, load_config
from rl.fleet import arms_text


def arms(*overrides):
    return expand(load_config(None, list(overrides)))


def test_no_arms_section_is_one_arm_with_the_run_config():
    ((name, cfg),) = arms("learner.lr=0.01")
    assert name == "" and cfg.learner.lr == 0.01


def test_a_grid_is_its_product_named_by_what_varies():
    got = arms("arms.grid={learner.lr: [3e-4, 1e-3], lora.rank: [1, 4]}", "run.steps=7")
    assert [n for n, _ in got] == ["lr=3e-4,rank=1", "lr=3e-4,rank=4", "lr=1e-3,rank=1", "lr=1e-3,rank=4"]
    assert [(c.learner.lr, c.lora.rank) for _, c in got] == [(3e-4, 1), (3e-4, 4), (1e-3, 1), (1e-3, 4)]
    assert all(c.run.steps == 7 and not c.arms.grid for _, c in got)  # the run's other keys; no arms of its own


def test_a_list_with_names_and_a_frozen_control_combined_with_a_grid():
    got = arms("arms.list=[{name: a, learner.lr: 0.01}, {name: z, learner.lr: 0.0}]", "arms.grid={run.seed: [0, 1]}")
    assert [n for n, _ in got] == ["a,seed=0", "a,seed=1", "z,seed=0", "z,seed=1"]
    assert [(c.learner.lr, c.run.seed) for _, c in got] == [(0.01, 0), (0.01, 1), (0.0, 0), (0.0, 1)]


def test_names_are_unique_and_folder_safe():
    assert [n for n, _ in arms("arms.list=[{learner.lr: 0.01}, {learner.lr: 0.01}]")] == ["arm", "arm-2"]
    assert [n for n, _ in arms("arms.grid={lora.target_modules: [[q_proj], [q_proj, v_proj]]}")] == [
        "targets=q_proj", "targets=q_proj+v_proj"]
    assert [n for n, _ in arms("arms.grid={reward.fn: ['a.py:f', 'b/c.py:g']}")] == ["fn=a.py_f", "fn=b_c.py_g"]
    assert (show(3e-4), show(0.01), show(1e-5), show(2.0), show(True)) == ("3e-4", "0.01", "1e-5", "2", "true")


@pytest.mark.parametrize("overrides, message", [
    (["arms.grid={model.path: [a, b]}"], "arms.grid: model.path cannot vary between arms"),
    (["arms.list=[{rollout.group_size: 4}]"], r"arms.list\[0\]: rollout.group_size cannot vary"),
    (["arms.list=[{learner.lr: fast}]"], r"arms.list\[0\]: learner.lr: expected float"),
    (["arms.list=[{learner.lrr: 1}]"], r"arms.list\[0\]: learner.lrr cannot vary"),
    (["arms.grid={learner.lr: 3}"], "arms.grid.learner.lr: expected a non-empty list"),
    (["arms.list=[{name: a/b}]"], "arm name 'a/b'"),
    (["arms.list=[{loss.clip_eps: 0.2, loss.dual_clip: 0.5}]"], r"arms.list\[0\]: loss.dual_clip must be > 1"),
    # A sweep's learner keeps no float32 master copy of a full fine-tuning arm (issue 29).
    (["arms.list=[{lora.rank: 0}, {lora.rank: 1}]", "model.dtype=bfloat16"],
     r"arms.list\[0\]: a full fine-tuning arm \(lora.rank 0\) in a sweep with model.dtype=bfloat16"),
    (["arms.grid={learner.lr: [1e-3]}", "learner.zero_stage=1"], "learner.world_size must be 1 and learner.zero_stage 0"),
])
def test_bad_arms_are_config_errors_that_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        arms(*overrides)


def test_the_arms_section_is_free_on_resume():
    """Each arm checks its own config against its own checkpoints (rl/checkpoint.py arm_runs)."""
    from rl.checkpoint import config_hash
    from rl.config import to_dict

    plain, sweep = load_config(None, []), load_config(None, ["arms.grid={learner.lr: [1e-3]}"])
    assert config_hash(to_dict(plain)) == config_hash(to_dict(sweep))


def test_the_start_line_counts_adapters_and_full_models():
    arms = [SimpleNamespace(lora=SimpleNamespace(rank=r)) for r in (1, 4, 0, 16, 0)]
    assert arms_text(arms) == ", 5 arms (3 adapters, 2 full models)"
