"""Outer folds and inner validation: stratified, deterministic, group-respecting, audited."""
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold

from datasets.splits import LeakageError, SplitPlan, StratifiedGroupShuffleSplit, audit_splits, plan_splits


def paper_like_table(groups_of_two: bool = False) -> pd.DataFrame:
    labels = ["HGG"] * 60 + ["LGG"] * 18 + ["Healthy"] * 60
    ids = [f"s{i:03d}" for i in range(len(labels))]
    groups = [f"p{i // 2:03d}" for i in range(len(labels))] if groups_of_two else ids
    return pd.DataFrame({"subject_id": ids, "label": labels, "group": groups})


def test_kfold_tests_every_subject_once_with_class_proportions():
    table = paper_like_table()
    plan = plan_splits(table, "kfold", 3, seed=1)
    tested = [s for f in plan.folds for s in f.test]
    assert sorted(tested) == sorted(table["subject_id"])
    label = dict(zip(table["subject_id"], table["label"]))
    for fold in plan.folds:
        counts = Counter(label[s] for s in fold.test)
        assert counts == {"HGG": 20, "LGG": 6, "Healthy": 20}
        val = Counter(label[s] for s in fold.val)
        # 20 % of the 92 training subjects, stratified: HGG 8, LGG 2 or 3, Healthy 8
        assert val["HGG"] == 8 and val["Healthy"] == 8 and val["LGG"] in (2, 3)
        assert len(fold.train) + len(fold.val) + len(fold.test) == len(table)


def test_shuffle_scheme_gives_70_30_splits_that_differ():
    plan = plan_splits(paper_like_table(), "shuffle", 3, test_size=0.3, seed=0)
    assert [len(f.test) for f in plan.folds] == [42, 42, 42]  # ceil(0.3 * 138), scikit-learn rounds the test part up
    assert plan.folds[0].test != plan.folds[1].test


def test_same_seed_same_plan_other_seed_other_plan_and_row_order_does_not_matter():
    table = paper_like_table()
    a = plan_splits(table, seed=7).to_json()
    shuffled = table.sample(frac=1.0, random_state=3)
    assert plan_splits(shuffled, seed=7).to_json() == a
    assert plan_splits(table, seed=8).to_json() != a


@pytest.mark.parametrize("scheme", ["kfold", "shuffle"])
def test_groups_never_straddle_any_part(scheme):
    table = paper_like_table(groups_of_two=True)
    plan = plan_splits(table, scheme, 3, seed=2)
    group = dict(zip(table["subject_id"], table["group"]))
    for fold in plan.folds:
        sets = [{group[s] for s in part} for part in (fold.train, fold.val, fold.test)]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_grouped_shuffle_split_keeps_classes_near_the_ratio():
    y = np.array(["a"] * 40 + ["b"] * 20)
    groups = np.repeat(np.arange(30), 2)
    train, test = next(StratifiedGroupShuffleSplit(1, test_size=0.3, random_state=0).split(y, y, groups))
    assert Counter(y[test]) == {"a": 12, "b": 6}
    assert not set(groups[train]) & set(groups[test])


def test_audit_catches_a_subject_and_a_group_leak():
    table = paper_like_table(groups_of_two=True)
    plan = plan_splits(table, seed=0)
    leaky = SplitPlan.from_json(plan.to_json())
    leaky.folds[1].val.append(leaky.folds[1].test[0])
    with pytest.raises(LeakageError, match="Fold 1: subjects in both test and val"):
        audit_splits(leaky, table)
    leaky = SplitPlan.from_json(plan.to_json())
    partner = next(s for s in table["subject_id"] if s != leaky.folds[0].test[0]
                   and table.set_index("subject_id").loc[s, "group"] == table.set_index("subject_id").loc[leaky.folds[0].test[0], "group"])
    leaky.folds[0].test.remove(partner)
    leaky.folds[0].train.append(partner)
    with pytest.raises(LeakageError, match="Fold 0: groups in both test and train"):
        audit_splits(leaky, table)


def test_plan_round_trips_through_json(tmp_path):
    plan = plan_splits(paper_like_table(), seed=5)
    plan.save(tmp_path / "splits.json")
    assert SplitPlan.load(tmp_path / "splits.json") == plan


def test_a_stock_splitter_plugs_in():
    plan = plan_splits(paper_like_table(), outer=KFold(4, shuffle=True, random_state=0), n_splits=4)
    assert len(plan.folds) == 4


def test_too_few_subjects_of_a_class_is_named():
    table = pd.DataFrame({"subject_id": list("abcde"), "label": ["x", "x", "x", "y", "y"], "group": list("abcde")})
    with pytest.raises(ValueError, match="y: 2"):
        plan_splits(table, n_splits=3)
