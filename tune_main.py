"""Ray Tune orchestration of the paper's protocol, an Optuna search around it, and a CPU demo.

    python tune_main.py --experiment demo                      # synthetic data, CPU, ~4 minutes on 2 cores
    python tune_main.py --experiment paper --data-root DIR --output OUT
    python tune_main.py --experiment search --data-root DIR --output OUT --num-samples 20

Rerunning the same command with the same --output resumes an interrupted experiment, as does
    python tune_main.py --resume --output OUT                  # the options saved in OUT/experiment.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the compact CLIReporter table instead of per-trial logs
# Every epoch checkpoints (that is what makes trials resumable); Tune's warning about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from datasets import DataSpec, InvalidDataError, prepare_data
from datasets.atomic import write_csv_atomic, write_text_atomic
from datasets.disk_space import DiskFullError
from datasets.workers import Interrupted
from datasets.cohort import parse_max_per_class
from models import KineticsWeightsNotFound, build_model, resolve_weights_path
from search_spaces import deviations_from_paper, space_table
from trainables.experiment import (PATH_OPTIONS, ExperimentConfig, field_names, new_run_id, parse_overrides,
                                   path_in_output)
from trainables.ray_trainable import trial_name

log = logging.getLogger("tune_main")

# The demo: small phantoms, coarse voxels, a few epochs — shortened so it ends on 2 CPU cores. 64 optimiser
# steps are few: a larger step than the default (batch 4 and BN recalibration are defaults already).
# One checkpoint per trial, at its end: a demo trial takes ~20-45 s, and writing the model + Adam state every
# epoch (138-398 MB, then copied by Tune) cost ~35 s of a ~215 s grid (measured: 9 trials, 2 cores).
DEMO_EPOCHS = 8
DEMO_DATA = {"n_hgg": 20, "n_lgg": 20, "n_healthy": 20, "seed": 0, "downsample": 4.0}
# --demo-task mgmt: the same training budget on synthetic RSNA-MICCAI 2021 DICOM (two classes, two series as
# channels; FLAIR stored sagittally for every second subject, so the DICOM orientation handling is exercised).
DEMO_RSNA_DATA = {"n_methylated": 30, "n_unmethylated": 30, "seed": 0, "downsample": 4.0,
                  "sequences": ("FLAIR", "T1wCE"), "sagittal": ("FLAIR",)}
DEMO_RSNA_CONTRASTS = ("flair", "t1wce")
DEMO_OPTIONS = {"spacing": 10.0, "epochs": DEMO_EPOCHS, "num_samples": 2, "search_models": ("mc3_18",),
                "overrides": {"lr": 3e-4, "checkpoint_every": DEMO_EPOCHS}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", choices=["paper", "search", "demo"], help="default demo")
    p.add_argument("--demo-task", choices=["tumour", "mgmt"],
                   help="demo data: tumour (synthetic BraTS/IXI, LGG/HGG/Healthy; default) or mgmt (synthetic "
                        "RSNA-MICCAI 2021 DICOM, unmethylated/methylated, FLAIR + T1wCE)")
    p.add_argument("--output", help="experiment folder (default runs/<experiment>); reuse it to resume")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment in --output with the options saved there (no need to repeat them)")
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data-root", help="folder with BraTS 2019 {HGG,LGG}/<subject>/ and IXI IXI*-T1.nii.gz")
    source.add_argument("--manifest", help="CSV: subject_id, label, path or path_<contrast>..., optional group")
    data.add_argument("--contrasts", help="comma list of input channels: BraTS contrasts (t1, t1ce, t2, flair; "
                                          "default t1ce) or RSNA-MICCAI series (flair, t1w, t1wce, t2w)")
    data.add_argument("--classes", help="comma list of labels in output order; naming only some selects them, "
                                        "e.g. LGG,HGG (default: every label in the data)")
    data.add_argument("--skip-invalid", action="store_true", help="leave invalid volumes out instead of stopping")
    data.add_argument("--allow-unstripped", action="store_true",
                      help="go on although skull-stripped and unstripped volumes are mixed (a confound; the report says so)")
    data.add_argument("--register", choices=["none", "mni"],
                      help="mni: N4 bias correction + affine registration to MNI152 with ANTsPy, cached (default none)")
    data.add_argument("--max-per-class", action="append", default=[], metavar="CLASS=N",
                      help="draw N subjects of CLASS at random with the seed, before splitting (repeatable; "
                           "e.g. Healthy=259, the paper's cohort)")
    data.add_argument("--cache-dir", help="preprocessing cache (default OUT/cache)")
    data.add_argument("--spacing", type=float, help="voxel size in mm after resampling (default 2.0)")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--models", help="comma list of r2plus1d_18, mc3_18, r3d_18 (default: these, the paper's) "
                                        "and resnet18_2d (the 2-D slice baseline, opt-in)")
    proto.add_argument("--pretrained", choices=["none", "kinetics", "both"],
                       help="kinetics: each model's standard pre-training (Kinetics-400; ImageNet for resnet18_2d); "
                            "default both")
    proto.add_argument("--weights-dir", help="folder with torchvision's Kinetics-400 .pth files "
                                             "(and resnet18-f37072fd.pth, ImageNet, for resnet18_2d)")
    proto.add_argument("--folds", type=int, help="number of outer folds / random splits (default 3)")
    proto.add_argument("--split", choices=["kfold", "shuffle"], help="k-fold CV (2:1) or random 70:30 splits")
    proto.add_argument("--epochs", type=int)
    proto.add_argument("--patience", type=int, help="early stopping: epochs without a better validation F1")
    proto.add_argument("--seed", type=int)
    proto.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override a training option, e.g. --set lr=1e-4 batch_size=2 augmentation=heavy")
    proto.add_argument("--num-samples", type=int, help="search: trials per (arm, outer fold) study, the grid's configuration included (default 20)")
    run = p.add_argument_group("execution")
    run.add_argument("--gpus-per-trial", type=float, help="GPU share per trial (default 0.25: four trials per GPU)")
    run.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    run.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    run.add_argument("--address", help="join a running Ray cluster (ray start --head), e.g. auto or HOST:6379")
    run.add_argument("--storage", help="Ray Tune storage path, shared by all nodes of a cluster")
    run.add_argument("--max-failures", type=int, help="retries of a failed trial from its checkpoint (default 2)")
    run.add_argument("--no-report", action="store_true", help="skip the analysis report at the end")
    return p


def read_experiment_record(path: Path) -> dict:
    """OUT/experiment.json, or a message that names it and the way out when it is damaged."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged (not valid JSON: {error}); it holds this experiment's options. Restore "
                         "it (e.g. from a backup), or run the experiment with another --output") from None


def check_writable(folder: Path, option: str) -> None:
    """Refuse a folder that is a file or cannot be written, before any data is read (and without creating it)."""
    existing = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {folder}: {existing} is a file, not a folder; give a folder (created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder} cannot be written ({existing} is read-only for this user); choose a "
                         "folder you can write to")


def check_local_cpus(config: ExperimentConfig) -> None:
    """Without --address Ray runs on this machine's CPUs: a trial asking for more would wait forever, silently."""
    cpus = os.cpu_count() or 1
    if not config.address and config.cpus_per_trial > cpus:
        raise ValueError(f"--cpus-per-trial {config.cpus_per_trial:g}: this machine has {cpus} CPU(s), so no trial could "
                         f"start (Ray would wait for the CPUs forever); give at most {cpus}, or run on a cluster with "
                         "--address")


def cpu_shortfall(config: ExperimentConfig) -> str | None:
    """Why no trial could start on the Ray cluster just joined or started, else None.

    ``check_local_cpus`` counts ``os.cpu_count()`` before any work; Ray counts a container's CPU quota (cgroups)
    and a cluster's nodes, which only the running Ray knows. A trial asking for more CPUs than any node has would
    wait forever without a word.
    """
    import ray

    nodes = [node.get("Resources", {}).get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    largest = max(nodes, default=0.0)
    if config.cpus_per_trial <= largest:
        return None
    where = "on this machine (its CPU quota)" if not config.address else f"on any node of {config.address}"
    return (f"--cpus-per-trial {config.cpus_per_trial:g}: Ray sees at most {largest:g} CPU(s) {where}, so no "
            f"trial could start (it would wait for the CPUs forever); give at most {largest:g}")


def saved_options(output: Path) -> dict:
    """The options an experiment folder was started with, for ``--resume``."""
    record = output / "experiment.json"
    if not record.is_file():
        raise ValueError(f"--resume: {output} holds no experiment ({record} is missing); "
                         "start it without --resume, or give the --output of an existing run")
    saved = read_experiment_record(record).get("options", {})
    names = set(field_names())
    options = {k: v for k, v in saved.items() if k in names}
    # A renamed or copied folder: paths that were inside it (the demo's data, a cache under OUT) move with it.
    first = Path(saved.get("output") or output)
    for key in PATH_OPTIONS:
        inside = path_in_output(options.get(key), first)
        if inside is not None:
            options[key] = str(output / inside)
    return options


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    experiment = args.experiment or "demo"
    default_name = f"{experiment}-mgmt" if experiment == "demo" and args.demo_task == "mgmt" else experiment
    output = Path(args.output or f"runs/{default_name}").resolve()
    if args.resume:
        options = saved_options(output)  # options given on the command line below must agree with these
        if args.experiment:
            options["experiment"] = args.experiment
    else:
        options = {"experiment": experiment}
        if experiment == "demo":
            options.update(DEMO_OPTIONS)
            if args.demo_task == "mgmt":
                options.update({"demo_task": "mgmt", "contrasts": DEMO_RSNA_CONTRASTS})
        elif args.demo_task:
            raise ValueError(f"--demo-task is for --experiment demo; --experiment {experiment} reads --data-root "
                             "or --manifest (the RSNA-MICCAI layout is recognised under --data-root)")
        elif not (args.data_root or args.manifest):
            raise ValueError(f"--experiment {experiment} needs --data-root DIR or --manifest CSV "
                             "(or run --experiment demo on the built-in synthetic data)")
    def split_list(text: str | None, option: str, example: str) -> tuple[str, ...] | None:
        if text is None:
            return None
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        if not items:  # "" or ",": the default would run instead of what was meant
            raise ValueError(f"{option} {text!r} names nothing; give a comma list, e.g. {option} {example}")
        return items

    given = {
        "data_root": args.data_root and str(Path(args.data_root).resolve()),
        "manifest": args.manifest and str(Path(args.manifest).resolve()),
        "contrasts": split_list(args.contrasts, "--contrasts", "t1ce"),
        "classes": split_list(args.classes, "--classes", "LGG,HGG"),
        "skip_invalid": args.skip_invalid or None, "allow_unstripped": args.allow_unstripped or None,
        "register": args.register, "max_per_class": parse_max_per_class(args.max_per_class) or None,
        "cache_dir": args.cache_dir and str(Path(args.cache_dir).resolve()),
        "spacing": args.spacing, "models": split_list(args.models, "--models", "mc3_18"),
        "pretrained": args.pretrained, "weights_dir": args.weights_dir and str(Path(args.weights_dir).resolve()),
        "folds": args.folds, "split": args.split, "epochs": args.epochs, "patience": args.patience,
        "seed": args.seed, "num_samples": args.num_samples, "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial, "max_concurrent": args.max_concurrent, "address": args.address,
        "storage": args.storage and (args.storage if "://" in args.storage else str(Path(args.storage).resolve())),
        "max_failures": args.max_failures,
        "demo_task": args.demo_task,  # with --resume: compared with the saved one, not ignored
    }
    options.update({k: v for k, v in given.items() if v is not None})
    if (not args.resume and experiment == "demo" and given["models"]
            and not set(options["search_models"]) & set(given["models"])):
        options["search_models"] = given["models"][:1]  # the demo searches one arm: the first one asked for
    if args.set:
        options["overrides"] = {**options.get("overrides", {}), **parse_overrides(args.set)}
    options["output"] = str(output)
    options["report"] = not args.no_report
    return ExperimentConfig(**options)


def ensure_demo_data(config: ExperimentConfig) -> None:
    """Generate the synthetic phantoms once; later demos reuse them."""
    if config.demo_task == "mgmt":
        from datasets.synthetic_rsna import write_synthetic_rsna as write
        root, parameters, what = config.cache_path / "demo-rsna-data", DEMO_RSNA_DATA, "RSNA-MICCAI 2021 DICOM"
    else:
        from datasets.synthetic import write_synthetic_dataset as write
        root, parameters, what = config.cache_path / "demo-data", DEMO_DATA, "BraTS/IXI"
    if not (root / ".complete").is_file():
        print(f"Generating synthetic {what} phantoms in {root} ...", flush=True)
        write(root, **parameters)
        (root / ".complete").write_text(json.dumps(parameters))
    config.data_root = str(root)


def check_kinetics_weights(config: ExperimentConfig) -> None:
    """Stop before any work if a pre-trained arm lacks weights or its file is not the model's weights.

    Each file found is loaded into its model as a trial would (PretrainedWeightsInvalid: a ValueError that names
    the file and the fix), so a damaged download is not met inside every trial after the preprocessing and the
    other arms' training. The demo drops arms without weights instead of stopping; a file that is there but wrong
    stops it too.
    """
    missing = {}
    for model, pretrained in config.arms():
        if pretrained:
            try:
                resolve_weights_path(model, "kinetics", config.weights_dir)
            except KineticsWeightsNotFound as error:
                missing[model] = str(error)
                continue
            # The stem and the classifier are not taken from the file, so the channels and classes do not matter.
            build_model(model, num_classes=2, in_channels=len(config.contrasts), pretrained="kinetics",
                        weights_dir=config.weights_dir)
    if not missing:
        return
    if config.experiment != "demo":
        raise KineticsWeightsNotFound("\n\n".join(missing.values()) + "\n\nOr run with --pretrained none.")
    print(f"Demo: pre-trained weights not found for {', '.join(missing)}; running the from-scratch arms only "
          f"(put torchvision's files in --weights-dir to include them).")
    config.pretrained = "none"


def planned_trials(config: ExperimentConfig, folds: int) -> list[str]:
    constants = config.training_constants()
    return [trial_name({**constants, "model": m, "pretrained": p, "fold": f})
            for m, p in config.arms() for f in range(folds)] if config.experiment in ("paper", "demo") else []


def tune_runs(config: ExperimentConfig, searched: bool) -> dict[str, str]:
    """Where this experiment's Tune runs live, for experiment.json and the user: the grid and/or the search, each
    followed by its retrain runs found in the storage now (``paper-retrain-1``: ``<run>-retrain-<n>``, made when a
    finished trial's final checkpoint was lost), oldest first, so that a reader taking the last run holding a trial
    gets the retrained one."""
    from trainables.tuning import retrain_runs  # imports Ray: only once an experiment runs

    kinds = [kind for kind, used in (("paper", config.experiment in ("paper", "demo")), ("search", searched)) if used]
    runs = {}
    for kind in kinds:
        name = config.tune_run_name(kind)
        runs[kind] = f"{config.storage_root}/{name}"
        runs.update({kind + retrain[len(name):]: f"{config.storage_root}/{retrain}"
                     for retrain in retrain_runs(config, name)})
    return runs


def channel_names(config: ExperimentConfig) -> list[str]:
    """The input channels in the order training feeds them: a manifest's path columns, else the contrasts (what
    prediction compares a new manifest's columns with)."""
    from datasets.sources import manifest_path_columns

    return list(manifest_path_columns(config.manifest)) if config.manifest else list(config.contrasts)


def save_experiment_record(config: ExperimentConfig, data, studies: list[dict]) -> None:
    record = {**config.to_dict(), "tune_runs": tune_runs(config, bool(studies)),
              "n_folds": len(data.plan.folds), "classes": list(data.classes),
              "arms": [{"model": m, "pretrained": p} for m, p in config.arms()],
              "planned_trials": planned_trials(config, len(data.plan.folds)),
              "paper_config_id": config.paper_config_id(),
              "deviations": deviations_from_paper(config.training_constants()),
              "paper_defaults": {k: config.training_constants()[k] for k in ("lr", "weight_decay", "dropout", "augmentation", "aug_strength")},
              "search_space": space_table(config.training_constants()), "optuna_studies": studies,
              "search_design": "nested" if studies else None,
              "channel_names": channel_names(config),
              "excluded_subjects": list(data.excluded), "cache": data.cache_dir,
              "stripping": data.stripping,
              "cohort": {k: data.cohort[k] for k in ("max_per_class", "available", "drawn")},
              "options": config.to_dict()}  # as given, compared on resume
    write_text_atomic(config.output_path / "experiment.json", json.dumps(record, indent=2))


def assign_run_id(config: ExperimentConfig) -> None:
    """The id in this experiment's Tune run names: the one saved in OUT/experiment.json, else a new one.

    An experiment saved before run ids existed has none and keeps its runs' old names (``paper``, ``search``),
    so it still resumes.
    """
    saved_file = config.output_path / "experiment.json"
    if saved_file.is_file():
        config.run_id = read_experiment_record(saved_file).get("options", {}).get("run_id")
        return
    # experiment.json is written before Ray starts, so Tune runs or Optuna studies without it mean it was deleted.
    # A new run id would train everything again beside them and add its trials to the old studies: refuse instead.
    left = sorted(p.relative_to(config.output_path).as_posix() for p in
                  [*(config.output_path / "ray").glob("paper*"), *(config.output_path / "ray").glob("search*"),
                   config.output_path / "optuna" / "search.db"] if p.exists())
    if left:
        raise ValueError(f"{config.output_path} holds an earlier experiment's results ({', '.join(left)}) but no "
                         "experiment.json, which records its options: restore that file to resume it, or use another "
                         "--output (or delete those results to start this folder over)")
    config.run_id = new_run_id()


def refuse_changed_options(config: ExperimentConfig) -> None:
    saved_file = config.output_path / "experiment.json"
    if saved_file.is_file():
        saved = read_experiment_record(saved_file).get("options", {})
        changed = config.differences(saved)
        if changed:
            hint = ""
            if "storage" in changed:
                original = saved.get("storage") or str(config.output_path / "ray")
                hint = (f". Its Tune runs (finished trials, checkpoints) are under --storage {original}: rerun with "
                        f"--storage {original}")
            elif {"max_failures", "max_concurrent", "overrides"} & set(changed):
                hint = (". A resumed run keeps its first --max-failures, --max-concurrent and checkpoint_every (Ray "
                        "Tune restores them with the run), so a new value would be ignored")
            raise ValueError(f"{config.output_path} holds an experiment run with other options ({', '.join(changed)}); "
                             f"rerun with the same options to resume it, or choose another --output{hint}")


def recorded_classes(config: ExperimentConfig) -> list[str] | None:
    """The class order the experiment in --output was started with (experiment.json), None for a new one."""
    saved_file = config.output_path / "experiment.json"
    return read_experiment_record(saved_file).get("classes") if saved_file.is_file() else None


def class_order_problem(recorded: list[str] | None, classes: tuple[str, ...], output: Path) -> str | None:
    """Why ``classes`` (this data's) cannot continue the experiment started with ``recorded``, or None.

    A checkpoint's output k is the run's k-th class: under another order its trials would go on training and be
    scored with the classes swapped, without an error.
    """
    if recorded is None or list(recorded) == list(classes):
        return None
    return (f"{output} was started with the classes {', '.join(recorded)}, but its data now gives "
            f"{', '.join(classes)}: its checkpoints' outputs follow the first. Restore the data it was started "
            "with, or start a new --output")


def interrupted(grid) -> bool:
    """Tune returns normally on Ctrl-C; unfinished trials without an error tell us it was stopped.

    A trial that failed permanently (``fold_failed``) is over, not interrupted."""
    return any(result.error is None and not result.metrics.get("fold_finished")
               and not result.metrics.get("fold_failed") for result in grid)


def stop_interrupted(config: ExperimentConfig) -> int:
    print(f"\nInterrupted. Finished trials are kept; rerun the same command (same --output "
          f"{config.output_path}) to resume.", flush=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        check_writable(config.output_path, "--output")
        check_writable(config.cache_path, "--cache-dir")
        if config.storage and "://" not in config.storage:
            check_writable(Path(config.storage), "--storage")
        check_local_cpus(config)
        if config.address:
            from trainables.cluster import check_address_reachable
            check_address_reachable(config.address)
        assign_run_id(config)
        if config.experiment == "demo":
            ensure_demo_data(config)
        check_kinetics_weights(config)
        refuse_changed_options(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("Experiment options:\n" + json.dumps(config.to_dict(), indent=2), flush=True)
    return run_experiment(config)


def fit_baselines(data, config: ExperimentConfig, out: Path) -> None:
    """The two scikit-learn baselines every deep arm must beat, on the same outer folds (seconds; before Ray)."""
    from trainables.baselines import run_baselines

    predictions, selection = run_baselines(data.subjects, data.cached, data.plan, data.classes, seed=config.seed)
    write_csv_atomic(predictions, out / "baseline_predictions.csv")
    write_csv_atomic(selection, out / "baseline_selection.csv")
    scores = selection.groupby("model")["val_macro_f1"].mean()
    print("Baselines (inner-validation macro F1, mean over folds; test scores in the report): "
          + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()), flush=True)


def tensorboard_command(config: ExperimentConfig, searched: bool) -> str:
    """OUT/ray holds this experiment's runs only; a shared --storage holds other experiments' too: name ours."""
    if not config.storage:
        return f"tensorboard --logdir {config.output_path / 'ray'}"
    return "tensorboard --logdir_spec " + ",".join(f"{kind}:{path}" for kind, path in tune_runs(config, searched).items())


def run_experiment(config: ExperimentConfig) -> int:
    import ray

    from trainables.cluster import ClusterCheckError, check_cluster, ignored_ray_address, init_options
    from trainables.tuning import (ResumeRefusedError, grid_fold_values, run_grid, run_search, search_studies,
                                   trial_resources)

    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    recorded = recorded_classes(config)
    # A resumed run keeps the class order it was started with, also where this version would order the same
    # labels otherwise (as it does for MGMT labels in any case since 2026-11-25).
    classes = config.classes or recorded
    try:
        data = prepare_data(
            DataSpec(config.data_root, config.manifest, tuple(config.contrasts), classes, config.skip_invalid,
                     config.allow_unstripped, config.max_per_class),
            config.preprocess_config(),
            config.split_spec(),
            config.cache_path, splits_file=out / "splits.json", num_workers=config.preprocess_workers,
            cohort_file=out / "cohort.json",
        )
    except Interrupted:  # its one line said which volumes are kept in the cache and what a rerun does
        return 130
    except KeyboardInterrupt:
        return stop_interrupted(config)
    except (InvalidDataError, ValueError, FileNotFoundError, DiskFullError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from analysis.binary import positive_class  # the two-class analysis's own rule, said before training

    positive = (f" (positive: {positive_class(list(data.classes))}; --classes sets the order)"
                if len(data.classes) == 2 else "")
    print(f"Data: {len(data.cached.table)} subjects, classes {', '.join(data.classes)}{positive}, cache {data.cache_dir}; "
          f"{config.split} with {len(data.plan.folds)} folds, splits in {out / 'splits.json'}", flush=True)
    problem = class_order_problem(recorded, data.classes, out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    write_csv_atomic(data.subjects, out / "subjects.csv")
    try:
        fit_baselines(data, config, out)
    except KeyboardInterrupt:
        return stop_interrupted(config)
    search_arms = [(m, p) for m, p in config.arms()
                   if config.experiment == "search" or (config.experiment == "demo" and m in (config.search_models or config.models))]
    folds = len(data.plan.folds)
    save_experiment_record(config, data, search_studies(config, search_arms, folds, {}))

    note = ignored_ray_address(config)
    if note:
        print(note, flush=True)
    try:
        ray.init(**init_options(config))  # with --address: the code reaches every node through the runtime_env
    except (ConnectionError, ValueError) as error:  # a cluster that is not running; an address Ray cannot parse
        print(f"error: --address {config.address}: {str(error).rstrip('.')}. Start the cluster first (`ray start "
              "--head` on its head node) or check the address (HOST:PORT, e.g. 10.0.0.1:6379, or auto); the "
              "prepared data is cached, so a rerun does not preprocess again", file=sys.stderr)
        return 2
    short = cpu_shortfall(config)
    if short:
        print(f"error: {short}", file=sys.stderr)
        ray.shutdown()
        return 2
    try:
        if config.address:
            try:
                notes, _ = check_cluster(config, data.cache_dir)
            except ClusterCheckError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            print("\n".join(notes), flush=True)
        resources = trial_resources(config)
        print(f"Each trial gets {resources} (cluster: {ray.cluster_resources()})", flush=True)
        grids = []
        grid_values: dict = {}
        stopped = False
        if config.experiment in ("paper", "demo"):
            grids.append(run_grid(config, data, resources))
            stopped = interrupted(grids[-1])
            if not stopped:
                grid_values = grid_fold_values(grids[-1])
        if search_arms and not stopped:
            # Which grid trial each fold study was seeded with is known only now: record it before searching.
            save_experiment_record(config, data, search_studies(config, search_arms, folds, grid_values))
            grid = run_search(config, data, resources, search_arms, grid_values)
            if grid is not None:
                grids.append(grid)
                stopped = interrupted(grid)
        # Written again, interrupted or not: a run may have made a retrain run (<run>-retrain-<n>), which tune_runs
        # lists from the storage.
        save_experiment_record(config, data, search_studies(config, search_arms, folds, grid_values))
        if stopped:
            return stop_interrupted(config)
    except ResumeRefusedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    # Tune's SIGINT handler outlives Tuner.fit; without the default one back, Ctrl-C in the report would be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return write_outputs(config, grids, data, out, bool(search_arms))
    except KeyboardInterrupt:
        print(f"\nInterrupted after training: every trial is kept. Rerun the same command to write the tables and the "
              f"report (nothing is trained again), or `python -m analysis {out}` once the tables exist.", flush=True)
        return 130


def write_outputs(config: ExperimentConfig, grids: list, data, out: Path, searched: bool) -> int:
    """The tables from Tune's results, then the report; 0 when every planned trial finished."""
    from trainables.collect import collect, write_tables

    tables = collect(grids, planned_trials(config, len(data.plan.folds)), subjects=data.subjects)
    write_tables(tables, out)
    trials = tables["trials"]
    print(f"\n{(trials['status'] == 'TERMINATED').sum()} of {len(trials)} trials finished; "
          f"predictions: {out / 'predictions.csv'}")
    failed = trials[trials["status"] != "TERMINATED"]
    for _, row in failed.iterrows():
        print(f"  {row['status']}: {row['trial_name']} {row['error']}")
    if config.report:
        try:
            from analysis import build_report
        except ImportError:
            print("The analysis module is not available; the fold results are in the CSV files above.")
        else:
            from analysis.__main__ import summary

            report = build_report(out)
            print(summary(report))
            if config.experiment == "demo":  # a newcomer's first numbers: say what they are before they alarm
                print(f"Demo: synthetic phantoms at {config.spacing:g} mm, {config.epochs} epochs (sized for 2 CPU "
                      "cores), to show the pipeline end to end; not a reproduction (the paper column, where shown, is "
                      "the published result on real data at 2 mm and 50 epochs; README: Notes on the reproduction).")
            print(f"Report: {report / 'report.md'} and {report / 'report.html'}")
    print(f"TensorBoard: {tensorboard_command(config, searched)}")
    return 0 if failed.empty else 1


if __name__ == "__main__":
    sys.exit(main())
