"""--max-per-class: a seeded draw before splitting, saved with the run and reused on resume."""
import json

import pytest

from datasets.cohort import check_max_per_class, draw_cohort, parse_max_per_class, save_cohort
from datasets.records import SubjectRecord

CLASSES = ("LGG", "HGG", "Healthy")


def records(n_healthy=20, n_hgg=6):
    return ([SubjectRecord(f"IXI{i:03d}-HH-{i:04d}", "Healthy", (f"h{i}.nii.gz",), f"IXI{i:03d}") for i in range(n_healthy)]
            + [SubjectRecord(f"BraTS19_X_{i}_1", "HGG", (f"b{i}.nii.gz",), f"b{i}") for i in range(n_hgg)])


def test_draw_is_seeded_capped_and_leaves_other_classes_alone():
    kept, info = draw_cohort(records(), {"Healthy": 7}, seed=0, classes=CLASSES)
    again, _ = draw_cohort(list(reversed(records())), {"Healthy": 7}, seed=0, classes=CLASSES)
    other, _ = draw_cohort(records(), {"Healthy": 7}, seed=1, classes=CLASSES)
    healthy = sorted(r.subject_id for r in kept if r.label == "Healthy")
    assert len(healthy) == 7 and healthy == sorted(r.subject_id for r in again if r.label == "Healthy")
    assert healthy != sorted(r.subject_id for r in other if r.label == "Healthy")
    assert sum(r.label == "HGG" for r in kept) == 6
    assert info["available"] == {"LGG": 0, "HGG": 6, "Healthy": 20}
    assert info["drawn"] == {"LGG": 0, "HGG": 6, "Healthy": 7}


def test_a_cap_added_on_another_class_never_changes_a_class_draw():
    lgg = [SubjectRecord(f"BraTS19_L_{i}_1", "LGG", (f"l{i}.nii.gz",), f"l{i}") for i in range(12)]
    def healthy(caps):
        kept, _ = draw_cohort(records(n_hgg=12) + lgg, caps, seed=0, classes=CLASSES)
        return sorted(r.subject_id for r in kept if r.label == "Healthy")
    alone = healthy({"Healthy": 7})
    # HGG sorts before Healthy, LGG after it: neither cap may move the Healthy draw.
    assert healthy({"Healthy": 7, "HGG": 5}) == alone and healthy({"Healthy": 7, "LGG": 5}) == alone


def test_a_saved_draw_of_another_seed_is_refused(tmp_path):
    saved = tmp_path / "cohort.json"
    _, info = draw_cohort(records(), {"Healthy": 7}, seed=0, classes=CLASSES, saved=saved)
    save_cohort(saved, info)
    with pytest.raises(ValueError, match="cohort.json was drawn with --seed 0, not 3; use another --output"):
        draw_cohort(records(), {"Healthy": 7}, seed=3, classes=CLASSES, saved=saved)


def test_a_cap_above_the_count_keeps_everyone():
    kept, info = draw_cohort(records(n_healthy=5), {"Healthy": 259}, seed=0, classes=CLASSES)
    assert len(kept) == 11 and info["drawn"]["Healthy"] == 5


def test_the_saved_draw_is_reused_even_when_the_data_grows(tmp_path):
    saved = tmp_path / "cohort.json"
    kept, info = draw_cohort(records(), {"Healthy": 7}, seed=0, classes=CLASSES, saved=saved)
    save_cohort(saved, info)
    first = sorted(r.subject_id for r in kept)
    assert json.loads(saved.read_text())["subjects"]["Healthy"] == [s for s in first if s.startswith("IXI")]
    resumed, info2 = draw_cohort(records(n_healthy=40), {"Healthy": 7}, seed=0, classes=CLASSES, saved=saved)
    assert sorted(r.subject_id for r in resumed) == first and info2["reused"]
    fresh, _ = draw_cohort(records(n_healthy=40), {"Healthy": 7}, seed=0, classes=CLASSES)
    assert sorted(r.subject_id for r in fresh) != first  # without the saved list, more files would change the draw


def test_a_saved_draw_that_names_a_vanished_subject_is_refused(tmp_path):
    saved = tmp_path / "cohort.json"
    _, info = draw_cohort(records(), {"Healthy": 7}, seed=0, classes=CLASSES, saved=saved)
    save_cohort(saved, info)
    with pytest.raises(ValueError, match="no longer valid in the data.*delete cohort.json"):
        draw_cohort(records(n_healthy=2), {"Healthy": 7}, seed=0, classes=CLASSES, saved=saved)
    with pytest.raises(ValueError, match="was drawn with --max-per-class"):
        draw_cohort(records(), {"Healthy": 8}, seed=0, classes=CLASSES, saved=saved)


@pytest.mark.parametrize("items, message", [
    (["Healthy"], "expects CLASS=N"), (["Healthy=many"], "whole number"), (["Healthy=0"], "at least 1"),
    (["=3"], "expects CLASS=N")])
def test_bad_options_are_named(items, message):
    with pytest.raises(ValueError, match=message):
        parse_max_per_class(items)


def test_options_parse_and_an_unknown_class_is_refused():
    assert parse_max_per_class(["Healthy=259", "HGG=100"]) == {"Healthy": 259, "HGG": 100}
    assert check_max_per_class({"Healthy": 259.0}) == {"Healthy": 259}
    with pytest.raises(ValueError, match="whole number"):
        check_max_per_class({"Healthy": 2.5})
    with pytest.raises(ValueError, match="class\\(es\\) Normal that the data does not have"):
        draw_cohort(records(), {"Normal": 3}, seed=0, classes=CLASSES)
