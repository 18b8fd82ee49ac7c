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


def test_every_tag_is_in_the_tag_table_of_docs_runs_md():
    """docs/runs.md's tag table names every ``rcnn_lab.*`` tag the runner writes (a tag missing from it was a
    user's finding once); a new constant here without a row there fails this test."""
    from tests.conftest import ROOT

    text = (ROOT / "docs" / "runs.md").read_text()
    table = text.split("**Tags** (all start with `rcnn_lab.`):", 1)[1].split("\n\n", 2)[1]
    documented = {name for row in table.splitlines()[2:] for name in row.split("|")[1].replace("`", "").replace(",", " ").split()}
    written = {v[len(tags.PREFIX):] for k, v in _names().items()
               if v.startswith(tags.PREFIX) and k not in ("PREFIX", "TAKEOVER_PREFIX")}  # the takeover is a param
    assert sorted(written - documented) == []
    assert f"`{tags.TAKEOVER_PREFIX}<digest>`" in text  # the one bookkeeping param
