"""``python -m datasets check|synthetic|synthetic-rsna|prepare``: look at data before spending GPU hours on it."""
from __future__ import annotations

import argparse
import logging
import sys

from datasets.cohort import parse_max_per_class
from datasets.prepare import DataSpec, PreprocessConfig, SplitSpec, check_data, prepare_data, require_class_counts
from datasets.splits import check_classes_present
from datasets.stripping import check_stripping
from datasets.validation import ValidationReport
from datasets.workers import Interrupted


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-root", help="folder holding BraTS 2019 ({HGG,LGG}/<subject>/) and IXI "
                                            "(IXI*-T1.nii.gz), or the RSNA-MICCAI 2021 train/ and train_labels.csv "
                                            "(or train/ itself)")
    source.add_argument("--manifest", help="CSV with subject_id, label, path or path_<contrast> columns, optional group")
    parser.add_argument("--contrasts", default="t1ce",
                        help="comma list of BraTS contrasts used as channels (default t1ce); for RSNA-MICCAI: flair, "
                             "t1w, t1wce, t2w (t1, t1ce, t2 are aliases)")
    parser.add_argument("--classes", default=None, help="comma list of labels, in output order; naming only some "
                                                        "selects them (default: every label in the data)")
    parser.add_argument("--skip-invalid", action="store_true", help="leave invalid files out instead of failing")
    parser.add_argument("--allow-unstripped", action="store_true",
                        help="accept a mix of skull-stripped and unstripped volumes (a confound; see README)")


def _spec(args: argparse.Namespace) -> DataSpec:
    return DataSpec(
        data_root=args.data_root, manifest=args.manifest,
        contrasts=_names(args.contrasts),
        classes=tuple(c.strip() for c in args.classes.split(",")) if args.classes else None,
        skip_invalid=args.skip_invalid, allow_unstripped=args.allow_unstripped,
        max_per_class=parse_max_per_class(getattr(args, "max_per_class", [])),
    )


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _report_class_counts(report: ValidationReport, folds: int | None, split: str | None) -> bool:
    """Print what the class counts of the valid subjects would stop; True when ``check`` should fail.

    Without --folds/--split the fold checks use prepare's defaults and only print a note: the run's
    own options decide, and ``check`` does not know them.
    """
    try:
        check_classes_present(report.counts)
    except ValueError as error:
        print(f"Class counts: {error}")
        return True
    chosen = folds is not None or split is not None
    spec = SplitSpec(split or "kfold", folds if folds is not None else 3)
    try:  # prepare's own check: the class counts, and with repeated groups (patients) the groups per class
        require_class_counts(report.valid, report.classes, spec)
    except ValueError as error:
        print(f"Class counts: {error}" if chosen else
              f"Note, for the default --folds 3 --split kfold (pass --folds to check your run's): {error}")
        return chosen
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check", help="open every volume; list counts per class and every invalid file")
    _add_source_arguments(check)
    check.add_argument("--cache-dir", default=None, help="remember per-file results here (optional)")
    check.add_argument("--folds", type=int, default=None,
                       help="check the class counts against this many folds (default: 3, reported as a note only)")
    check.add_argument("--split", default=None, choices=["kfold", "shuffle"], help="as for prepare (default kfold)")

    synthetic = commands.add_parser("synthetic", help="write BraTS+IXI shaped phantoms built on the MNI152 template")
    synthetic.add_argument("out")
    synthetic.add_argument("--hgg", type=int, default=20)
    synthetic.add_argument("--lgg", type=int, default=20)
    synthetic.add_argument("--healthy", type=int, default=20)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--downsample", type=float, default=1.0, help="divide image sizes by this (tests use 4)")
    synthetic.add_argument("--contrasts", default="t1ce", help="BraTS contrasts to write, comma list (t1ce,t1,flair)")
    synthetic.add_argument("--ixi", default="stripped", choices=["stripped", "raw", "raw+brain"],
                           help="IXI phantoms: skull-stripped (default), raw heads with skull and noisy background, "
                                "or both (raw -T1 and BET-like -T1_brain)")

    rsna = commands.add_parser("synthetic-rsna", help="write an RSNA-MICCAI 2021 shaped tree of DICOM phantoms "
                                                      "(train/<BraTS21ID>/<sequence>/*.dcm, train_labels.csv)")
    rsna.add_argument("out")
    rsna.add_argument("--methylated", type=int, default=10)
    rsna.add_argument("--unmethylated", type=int, default=10)
    rsna.add_argument("--seed", type=int, default=0)
    rsna.add_argument("--downsample", type=float, default=1.0, help="divide image sizes by this (tests use 4)")
    rsna.add_argument("--sequences", default="flair,t1w,t1wce,t2w", help="sequences to write, comma list")
    rsna.add_argument("--sagittal", default="flair",
                      help="sequences stored as sagittal stacks for every second subject, comma list ('' for none)")

    prepare = commands.add_parser("prepare", help="validate, preprocess into the cache and draw the splits")
    _add_source_arguments(prepare)
    prepare.add_argument("--cache-dir", required=True,
                         help="where preprocessed volumes are cached (one entry per data and options; tune_main's "
                              "--cache-dir, OUT/cache by default, reuses it)")
    prepare.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel size in mm (2, as the paper)")
    prepare.add_argument("--register", default="none", choices=["none", "mni"],
                         help="mni: N4 bias correction + affine registration to MNI152 with ANTsPy, cached")
    prepare.add_argument("--max-per-class", action="append", default=[], metavar="CLASS=N",
                         help="draw at most N subjects of CLASS (seeded); repeat per class")
    prepare.add_argument("--folds", type=int, default=3, help="outer folds (3)")
    prepare.add_argument("--split", default="kfold", choices=["kfold", "shuffle"],
                         help="kfold: k-fold cross-validation; shuffle: k random 70:30 splits")
    prepare.add_argument("--seed", type=int, default=0, help="seed of the splits and of --max-per-class")
    prepare.add_argument("--splits-file", default=None,
                         help="JSON to save the splits in (and read them back from on a rerun); without it they "
                              "are only printed")
    prepare.add_argument("--workers", type=int, default=None,
                         help="processes that preprocess (and register) volumes (default: the CPUs, at most 8)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "check":
            report = check_data(_spec(args), args.cache_dir)
            print(report.format())
            stripping = check_stripping(report.valid, report.profiles, report.classes)
            print(stripping.format())
            refused = stripping.mixed and not args.allow_unstripped
            if refused:
                print("Stripped and unstripped volumes are mixed: a run stops on this (skull and background would tell "
                      "the classes apart); strip the volumes listed, or pass --allow-unstripped.")
            if report.problems and args.skip_invalid:
                print(f"--skip-invalid: {len(report.problems)} subject(s) will be left out")
            counts_refused = _report_class_counts(report, args.folds, args.split)
            return 1 if refused or counts_refused or (report.problems and not args.skip_invalid) else 0
        if args.command == "synthetic":
            from datasets.synthetic import write_synthetic_dataset

            root = write_synthetic_dataset(args.out, args.hgg, args.lgg, args.healthy, seed=args.seed,
                                           downsample=args.downsample, contrasts=tuple(args.contrasts.split(",")),
                                           ixi=args.ixi)
            print(f"Synthetic BraTS/IXI tree written to {root} (HGG {args.hgg}, LGG {args.lgg}, Healthy {args.healthy}; "
                  f"IXI {args.ixi})")
            return 0
        if args.command == "synthetic-rsna":
            from datasets.synthetic_rsna import write_synthetic_rsna

            root = write_synthetic_rsna(args.out, args.methylated, args.unmethylated, seed=args.seed,
                                        downsample=args.downsample, sequences=_names(args.sequences),
                                        sagittal=_names(args.sagittal))
            print(f"Synthetic RSNA-MICCAI tree written to {root} (methylated {args.methylated}, unmethylated "
                  f"{args.unmethylated}; sequences {args.sequences}; sagittal {args.sagittal or 'none'})")
            return 0
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers} (leave it out for one per CPU, at "
                             "most 8)")
        prepared = prepare_data(_spec(args), PreprocessConfig(spacing=args.spacing, register=args.register),
                                SplitSpec(args.split, args.folds, seed=args.seed), args.cache_dir, args.splits_file,
                                num_workers=args.workers)
        cached = prepared.cached
        print(f"Cache: {cached.directory} shape {cached.meta['shape']} ({len(cached.table)} subjects)")
        for fold in prepared.plan.folds:
            print(f"fold {fold.fold}: train {len(fold.train)}, val {len(fold.val)}, test {len(fold.test)}")
        return 0
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted:  # Ctrl-C in preprocessing or registration: what is kept is logged already
        return 130
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
