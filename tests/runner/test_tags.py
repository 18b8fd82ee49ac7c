"""``runner.tags``: one name per thing rcnn-lab records; the runner and the reports agree through it."""

from __future__ import annotations

from rcnn_lab.runner import tags


def _names() -> dict[str, str]:
    return {k: v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)}


def test_tag_names_are_distinct_and_prefixed():
    names = _names()
    tag_keys = {k: v for k, v in names.items() if v.startswith(tags.PREFIX) and k != "PREFIX"}
    assert len(set(tag_keys.values())) == len(tag_keys)  # no two constants name the same tag
    own = set(names) - set(tag_keys) - {"PREFIX"}
    assert own == {"SWEEP", "VARIANT_RUN", "EVAL_RUN", "SEARCH", "PARENT", "FINAL_PREFIX",  # values and MLflow's own names
                   "EXPERIMENT_KIND", "MODEL_TRAINING", "UI_WORKFLOW", "DATASET_CONTEXT", "NOTE"}


def test_bookkeeping_params_and_filters():
    assert tags.is_bookkeeping_param(tags.TAKEOVER_PREFIX + "abc")
    assert not tags.is_bookkeeping_param("model.rpn.nms_thresh")
    assert tags.filter_equals(tags.KIND, tags.SWEEP) == f"tags.`{tags.KIND}` = '{tags.SWEEP}'"
