"""`python -m analysis OUT [--bootstrap N] [--seed S]`: write OUT/report/ and print the main table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def summary(report_dir: Path) -> str:
    """One screen: macro F1 per arm, ours beside the published value, the baselines, and the shortcut check."""
    import pandas as pd

    from analysis.names import arm_label
    from analysis.tables import fmt, fmt_diff, fmt_pm

    tables = report_dir / "tables"
    comp = pd.read_csv(tables / "paper_comparison.csv")
    if "baseline" not in comp.columns:
        comp["baseline"] = False
    arms = pd.read_csv(tables / "arms.csv")[["model", "pretrained", "folds_planned"]]
    planned = int(arms["folds_planned"].max()) if len(arms) else None
    sel = comp[comp["metric"] == "macro_f1"].merge(arms, on=["model", "pretrained"], how="left")
    rows = []
    for r in sel.itertuples(index=False):
        if r.baseline:
            arm = f"{r.display_name} [baseline]"
            folds = f"{r.folds}/{planned if planned is not None else '?'}"
        else:
            arm = arm_label(r.model, bool(r.pretrained))
            folds = f"{r.folds}/{int(r.folds_planned)}"
        rows.append((arm, folds, r))
    width = max([42, *(len(arm) for arm, _, _ in rows)])  # the 2-D baseline's label is longer than the paper arms'
    lines = ["Macro F1 per arm, paper protocol (* = best fold mean; [baseline] rows do not compete):",
             f"{'arm':<{width}} {'folds':>5}  {'macro F1 (mean ± std)':<22} {'pooled':>7} {'paper':>7} {'diff':>8}"]
    for arm, folds, r in rows:
        star = " *" if r.winner else ""
        lines.append(f"{arm:<{width}} {folds:>5}  {fmt_pm(r.mean, r.std):<22} {fmt(r.pooled):>7} "
                     f"{fmt(r.paper_mean):>7} {fmt_diff(r.difference):>8}{star}")
    lines.append(_shortcut_line(tables, bool(comp["baseline"].any())))
    lines += _training_check_lines(tables)
    lines += _search_lines(tables)
    tests = pd.read_csv(tables / "pairwise_tests.csv")
    if len(tests):
        significant = int((tests["p_holm"] < 0.05).sum())
        lines.append(f"corrected t-tests on macro F1: {significant} of {len(tests)} pair(s) differ at Holm p < 0.05 "
                     f"(with {int(tests['folds'].max())} folds the test has little power)")
    failed = pd.read_csv(tables / "failed_trials.csv")
    missing = pd.read_csv(tables / "missing_trials.csv")
    if len(failed) or len(missing):
        lines.append(f"partial results: {len(failed)} failed, {len(missing)} missing trial(s); see report.md")
    return "\n".join(lines)


def _training_check_lines(tables: Path) -> list[str]:
    """Folds that did not learn and arms not above chance (analysis/training_check.py); absent in older reports."""
    import pandas as pd

    folds_path, arms_path = tables / "training_check.csv", tables / "training_check_arms.csv"
    if not (folds_path.is_file() and arms_path.is_file()):
        return []
    folds, arms = pd.read_csv(folds_path), pd.read_csv(arms_path)
    flagged = int((~folds["learned"].astype(bool)).sum())
    below = int((arms["above_chance"].astype(str) == "False").sum())
    return [f"training check: {flagged} of {len(folds)} fold(s) did not learn; {below} of {len(arms)} arm(s) not "
            "clearly above chance (pooled macro F1 interval reaches 1/K); see report"]


def _search_lines(tables: Path) -> list[str]:
    """One line per searched arm with its nested estimate; for a search run before nested CV, why there is none."""
    import pandas as pd

    from analysis.names import arm_label
    from analysis.tables import fmt, fmt_pm

    path = tables / "nested_estimate.csv"
    if not path.is_file():
        if (tables / "best_configs.csv").is_file():
            return ["search: run made before nested cross-validation, so no nested estimate (its chosen configuration's "
                    "test scores are optimistically biased); rerun the search; see report"]
        return []
    estimate = pd.read_csv(path)
    lines = ["Nested CV estimate of each searched arm, test macro F1 (mean ± std over folds; pooled), beside the "
             "grid's configuration on the same folds:"]
    for (model, pretrained), grp in estimate.groupby(["model", "pretrained"], sort=False):
        rows = {r["estimate"]: r for r in grp.to_dict("records")}
        nested, default = rows.get("nested"), rows.get("paper_default")
        if nested is None:
            continue
        text = (f"{arm_label(model, bool(pretrained)):<42} {int(nested['n_folds']):>2} folds  "
                f"{fmt_pm(nested['test_macro_f1_mean'], nested['test_macro_f1_std']):<22} pooled "
                f"{fmt(nested['test_macro_f1_pooled']) or 'n/a'}")
        if default is not None and int(default["n_folds"]) > 0:
            text += (f"  (defaults {fmt_pm(default['test_macro_f1_mean'], default['test_macro_f1_std'])}, pooled "
                     f"{fmt(default['test_macro_f1_pooled'])})")
        lines.append(text)
    return lines


def _shortcut_line(tables: Path, have_baselines: bool) -> str:
    """'shortcut check: 2 of 6 deep-arm x class results are not clearly better than the acquisition-only baseline ...'."""
    import pandas as pd

    from analysis.names import display_name
    from analysis.shortcut import clearly_worse, not_clearly_better

    path = tables / "shortcut_check.csv"
    check = pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.is_file() else pd.DataFrame()
    if check.empty:
        return ("shortcut check: no deep-arm predictions to compare with the baselines" if have_baselines
                else "shortcut check: not available (no baseline_predictions.csv); see report")
    for flag in ("clearly_better", "clearly_worse"):
        if flag in check:
            check[flag] = check[flag].astype(str).str.casefold() == "true"
    parts = []
    for baseline in dict.fromkeys(check["baseline"]):
        weak, total = not_clearly_better(check, baseline)
        worse = clearly_worse(check, baseline)
        parts.append(f"{weak} of {total}" + (" deep-arm x class results are not clearly better than" if not parts
                                             else " against") + f" the {display_name(baseline)}"
                     + (f" ({worse} clearly worse)" if worse else ""))
    return "shortcut check: " + "; ".join(parts) + "; see report"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument("out", type=Path, help="experiment directory (holds experiment.json and predictions.csv)")
    parser.add_argument("--bootstrap", type=int, default=2000, metavar="N", help="bootstrap resamples (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the bootstrap and importances (default 0)")
    args = parser.parse_args(argv)
    if args.bootstrap < 1:
        parser.error("--bootstrap must be at least 1")

    # Fail fast, before the heavy imports (pandas, sklearn, torch for display names), on the common mistake.
    for required in ("experiment.json", "predictions.csv"):
        if not (args.out / required).is_file():
            print(f"error: {args.out / required} not found: is {args.out} an experiment directory written by "
                  "tune_main.py?", file=sys.stderr)
            return 2

    from analysis import build_report

    try:
        report_dir = build_report(args.out, bootstrap_samples=args.bootstrap, seed=args.seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report written to {report_dir / 'report.md'} and {report_dir / 'report.html'}")
    print(summary(report_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
