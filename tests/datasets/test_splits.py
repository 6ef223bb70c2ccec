"""Outer folds and inner validation: stratified, deterministic, group-respecting, audited."""
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import KFold, StratifiedShuffleSplit

from datasets import splits
from datasets.splits import (LeakageError, SplitPlan, StratifiedGroupShuffleSplit, audit_splits,
                             check_every_part_has_every_class, check_groups_per_class, fewest_groups, plan_splits)


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


# --- repeated groups: every fold part holds every class, or the plan is refused ------------------------------


def grouped_table(sizes: dict[str, list[int]]) -> pd.DataFrame:
    """Per class, one group (patient) per entry of ``sizes`` with that many subjects (scans)."""
    return pd.DataFrame([{"subject_id": f"{c}_g{g:02d}_s{i}", "label": c, "group": f"{c}_g{g:02d}"}
                         for c, groups in sizes.items() for g, size in enumerate(groups) for i in range(size)])


def part_counts(plan: SplitPlan, table: pd.DataFrame) -> list[dict[str, Counter]]:
    label = dict(zip(table["subject_id"], table["label"]))
    return [{part: Counter(label[s] for s in getattr(f, part)) for part in ("train", "val", "test")}
            for f in plan.folds]


def test_grouped_shuffle_split_never_holds_out_a_class_s_last_group():
    # "a" is one patient with 5 scans: round(0.3 * 5) = 2 test subjects wanted, and the old greedy rule took the
    # group whatever its size, leaving no "a" to train on. Its last group now stays; "b" gets round(0.3 * 10) = 3.
    y = np.array(["a"] * 5 + ["b"] * 10)
    groups = np.array(["A"] * 5 + [f"b{i}" for i in range(10)])
    for seed in range(10):
        for train, test in StratifiedGroupShuffleSplit(3, test_size=0.3, random_state=seed).split(y, y, groups):
            assert Counter(y[test]) == {"b": 3} and Counter(y[train]) == {"a": 5, "b": 7}


def test_grouped_shuffle_split_holds_out_a_group_of_a_class_whose_share_rounds_to_zero():
    # "a": two single-subject groups, round(0.2 * 2) = 0 -> at least one; the second is then its last: kept.
    # "b": ten groups of two, round(0.2 * 20) = 4 -> the first two groups drawn.
    y = np.array(["a"] * 2 + ["b"] * 20)
    groups = np.array(["a0", "a1"] + [f"b{i // 2}" for i in range(20)])
    for seed in range(10):
        train, test = next(StratifiedGroupShuffleSplit(1, test_size=0.2, random_state=seed).split(y, y, groups))
        assert Counter(y[test]) == {"a": 1, "b": 4} and Counter(y[train]) == {"a": 1, "b": 16}
        assert not set(groups[train]) & set(groups[test])


def test_grouped_shuffle_split_is_deterministic_and_ungrouped_input_is_scikit_learn_s():
    y = np.array(["a"] * 12 + ["b"] * 9)
    groups = np.array([f"a{i // 3}" for i in range(12)] + [f"b{i}" for i in range(9)])
    draw = lambda seed: [(list(tr), list(te)) for tr, te in  # noqa: E731
                         StratifiedGroupShuffleSplit(4, test_size=0.3, random_state=seed).split(y, y, groups)]
    assert draw(5) == draw(5) and draw(5) != draw(6)
    ours = StratifiedGroupShuffleSplit(3, test_size=0.3, random_state=2).split(y, y, np.arange(len(y)))
    stock = StratifiedShuffleSplit(3, test_size=0.3, random_state=2).split(y, y)
    assert [(list(a), list(b)) for a, b in ours] == [(list(a), list(b)) for a, b in stock]


def test_same_seed_same_grouped_plan_whatever_the_row_order():
    table = grouped_table({"HGG": [1, 2, 3, 1, 1, 2, 1, 4, 1, 1], "LGG": [2, 3, 1, 2, 2], "Healthy": [1] * 12})
    for scheme in ("kfold", "shuffle"):
        a = plan_splits(table, scheme, 3, seed=4).to_json()
        assert plan_splits(table.sample(frac=1.0, random_state=1), scheme, 3, seed=4).to_json() == a
        assert plan_splits(table, scheme, 3, seed=5).to_json() != a


def test_two_patients_of_a_class_are_refused_under_shuffle_before_any_split_is_drawn(monkeypatch):
    # The review's case: LGG = 2 patients x 5 scans. The old plan put a whole patient in every test part and the
    # other in validation: no fold trained on LGG, and nothing said so.
    table = grouped_table({"LGG": [5, 5], "HGG": [1] * 30, "Healthy": [1] * 30})
    monkeypatch.setattr(splits, "outer_splitter", lambda *a, **k: pytest.fail("a split was drawn"))
    for seed in range(20):
        with pytest.raises(ValueError, match=r"Too few groups \(the manifest's group column: .*\) for --split shuffle, "
                                             r"--folds 3: LGG has 2; each class needs subjects in at least 3 groups "
                                             r"\(one held out for testing, and two kept for inner training and inner "
                                             r"validation, whatever --folds\)\. Fix: add subjects of other patients "
                                             r"\(groups\) of LGG, leave the class out \(--classes without it\)"):
            plan_splits(table, "shuffle", 3, seed=seed)


def test_three_patients_of_a_class_give_every_shuffle_part_one_patient():
    # LGG 3 x 5 scans: the test part takes one patient (round(0.3 * 15) = 4 wanted, the first group whatever its
    # size, the others would overshoot); of the two left the inner split holds out one and keeps the last. (The
    # old rule did this too: a guard that the new rules refuse no table they need not.)
    table = grouped_table({"LGG": [5, 5, 5], "HGG": [1] * 30, "Healthy": [1] * 30})
    for seed in range(20):
        for counts in part_counts(plan_splits(table, "shuffle", 3, seed=seed), table):
            assert [counts[part]["LGG"] for part in ("train", "val", "test")] == [5, 5, 5]
            assert all(counts[part]["HGG"] and counts[part]["Healthy"] for part in counts)


def test_the_review_s_kfold_case_holds_every_class_in_every_part():
    # Seed 41 used to leave C2 (groups of 6, 1, 1) out of fold 2's validation part: round(0.2 * 2) = 0.
    table = grouped_table({"C0": [6, 6, 1], "C1": [1, 3, 1, 1, 1, 6, 1, 2, 1], "C2": [6, 1, 1]})
    for counts in part_counts(plan_splits(table, "kfold", 3, 0.3, 0.2, seed=41), table):
        assert all(set(counts[part]) == {"C0", "C1", "C2"} for part in counts)


def test_random_grouped_tables_give_every_class_to_every_part_or_are_refused_with_the_reason():
    rng = np.random.default_rng(3)
    outcomes = Counter()
    for it in range(40):
        scheme = ("kfold", "shuffle")[it % 2]
        table = grouped_table({f"C{c}": [int(rng.choice([1, 1, 1, 2, 3, 6])) for _ in range(int(rng.integers(2, 12)))]
                               for c in range(3)})
        try:
            plan = plan_splits(table, scheme, 3, 0.3, 0.2, seed=int(rng.integers(100)))
        except ValueError as error:
            assert str(error).startswith(("Too few", "The splits drawn", "Every class needs")), error
            outcomes["refused"] += 1
            continue
        outcomes["accepted"] += 1
        for counts in part_counts(plan, table):
            assert all(set(counts[part]) == {"C0", "C1", "C2"} for part in counts)
    assert outcomes["accepted"] >= 10 and outcomes["refused"] >= 10  # both paths are exercised


def test_groups_per_class_needed_for_every_part():
    # kfold: g groups over k test folds, t >= 1 in each and g - t >= 2 left to train: g >= k and g (k - 1) >= 2 k.
    assert [fewest_groups("kfold", k) for k in (2, 3, 4, 5)] == [4, 3, 4, 5]
    assert {fewest_groups("shuffle", k) for k in (1, 2, 3, 10)} == {3}
    with pytest.raises(ValueError, match=r"for --split kfold, --folds 2: HGG has 3; each class needs subjects in at "
                                         r"least 4 groups \(one in every test fold, and two in every fold's training "
                                         r"part, for inner training and inner validation\)\. Fix: use --folds 3, add"):
        check_groups_per_class({"HGG": 3, "LGG": 9}, "kfold", 2)
    with pytest.raises(ValueError, match=r"--folds 5: HGG has 4; .* at least 5 groups .*Fix: use --folds 4, add"):
        check_groups_per_class({"HGG": 4, "LGG": 9}, "kfold", 5)
    with pytest.raises(ValueError, match=r"--folds 3: HGG has 2; .*\. Fix: add subjects of other patients"):
        check_groups_per_class({"HGG": 2, "LGG": 9}, "kfold", 3)  # no --folds gives 2 groups every part
    check_groups_per_class({"HGG": 3, "LGG": 3}, "kfold", 3)
    check_groups_per_class({"HGG": 3, "LGG": 3, "Healthy": 0}, "shuffle", 5)  # an empty class is refused elsewhere


class FixedSplits:
    """A stock-like splitter whose fold 0 tests only class "a" (rows 0-2 of the table sorted by subject id)."""

    def split(self, X, y, groups=None):
        yield np.arange(3, 12), np.arange(0, 3)
        yield np.r_[0:4, 6:10], np.r_[4:6, 10:12]


def test_a_stock_splitter_whose_test_part_lacks_a_class_is_refused():
    table = pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(12)], "label": ["a"] * 6 + ["b"] * 6})
    table["group"] = table["subject_id"]
    with pytest.raises(ValueError, match=r"The splits drawn \(--split kfold, --folds 2, --seed 0\) leave a class out "
                                         r"of a fold part: fold 0's test part \(test\) has no subject of b \(b has 6 "
                                         r"subject\(s\) in 6 group\(s\)\)\. .*Fix: add subjects or groups of b, use "
                                         r"fewer --folds, try another --seed, or leave the class out with --classes "
                                         r"without it$"):
        plan_splits(table, n_splits=2, val_fraction=0.25, outer=FixedSplits())


def test_a_saved_plan_with_a_part_lacking_a_class_is_named_with_the_file_to_delete(tmp_path):
    table = paper_like_table(groups_of_two=True)
    plan = plan_splits(table, seed=0)
    check_every_part_has_every_class(plan, table, saved=tmp_path / "splits.json")  # a good plan passes
    label = dict(zip(table["subject_id"], table["label"]))
    lgg = [s for s in plan.folds[1].val if label[s] == "LGG"]
    plan.folds[1].val = [s for s in plan.folds[1].val if s not in lgg]
    plan.folds[1].train += lgg
    with pytest.raises(ValueError, match=r"splits.json holds splits \(--split kfold, --folds 3, --seed 0\) in which "
                                         r"fold 1's val part \(inner validation\) has no subject of LGG \(LGG has 18 "
                                         r"subject\(s\) in 9 group\(s\)\)\. .*Delete .*splits.json to draw the "
                                         r"splits again"):
        check_every_part_has_every_class(plan, table, saved=tmp_path / "splits.json")


def test_prepare_refuses_a_saved_splits_file_whose_part_lacks_a_class(tmp_path):
    from datasets import DataSpec, PreprocessConfig, SplitSpec, prepare_data
    from tests.conftest import write_ellipsoid

    root = tmp_path / "data"
    for grade, first_seed in (("HGG", 0), ("LGG", 10)):  # distinct voxels: one scan under two ids is refused
        for i in range(4):
            write_ellipsoid(root / f"{grade}/{grade}{i}/{grade}{i}_t1ce.nii.gz", seed=first_seed + i)
    options = (DataSpec(data_root=str(root)), PreprocessConfig(spacing=8.0), SplitSpec(n_splits=2, val_fraction=0.5),
               tmp_path / "cache")
    splits_file = tmp_path / "splits.json"
    data = prepare_data(*options, splits_file=splits_file, num_workers=1)
    assert sorted(s[:3] for s in data.plan.folds[0].val) == ["HGG", "LGG"]  # 2 + 2 training subjects, half held out
    saved = SplitPlan.load(splits_file)
    lgg = [s for s in saved.folds[0].val if s.startswith("LGG")]
    saved.folds[0].val = [s for s in saved.folds[0].val if s not in lgg]
    saved.folds[0].train += lgg
    saved.save(splits_file)
    with pytest.raises(ValueError, match=r"splits.json holds splits .* fold 0's val part \(inner validation\) has no "
                                         r"subject of LGG .*Delete .*splits.json to draw the splits again"):
        prepare_data(*options, splits_file=splits_file, num_workers=1)
