"""The comparison task's held-out split: 400 problems, none of them a training problem, and the
problems of the runs archived with 100 held out kept in place."""

from __future__ import annotations

from common.tasks import build_task
from scripts.build import build_task_from
from tests.conftest import compose_train


def test_the_comparison_task_holds_out_400_problems_disjoint_from_training():
    task = build_task_from(compose_train("task=addition_5_40"))
    train, test = {e.prompt for e in task.train}, {e.prompt for e in task.test}
    assert len(task.train) == len(train) == 300 and len(task.test) == len(test) == 400
    assert not train & test


def test_more_held_out_problems_keep_the_training_split_and_the_first_100():
    # the archived runs used num_test 100: the same 300 training problems, evaluated on test[:100]
    cfg = compose_train("task=addition_5_40").task
    kwargs = {k: v for k, v in cfg.items() if k not in ("name", "num_test")}
    before = build_task("addition", **kwargs, num_test=100)
    now = build_task_from(compose_train("task=addition_5_40"))
    assert now.train == before.train and now.test[:100] == before.test


def test_the_comparison_presets_evaluate_on_all_400():
    for preset in ("compare", "compare_tokens"):
        cfg = compose_train(f"experiment={preset}")
        assert cfg.trainer.eval_num_prompts == cfg.task.num_test == 400, preset
