"""An experiment's resolved options as plain data: printed, saved with the run, compared on resume."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datasets import PreprocessConfig, SplitSpec
from datasets.cohort import check_max_per_class
from datasets.rsna import SEQUENCE_ALIASES
from datasets.sources import BRATS_CONTRASTS
from models import MODEL_NAMES, PAPER_MODEL_NAMES
from trainables.fold_training import DEFAULT_CONFIG, PAPER_DEFAULTS, resolve_config
from trainables.ray_trainable import config_id

EXPERIMENTS = ("paper", "search", "demo")
DEMO_TASKS = ("tumour", "mgmt")  # the demo's synthetic data: BraTS/IXI three classes, or RSNA-MICCAI MGMT
# The Tune runs an experiment may hold: the fixed grid and the nested search (the demo runs both).
TUNE_RUNS = ("paper", "search")
PRETRAINED_CHOICES = {"none": (False,), "kinetics": (True,), "both": (False, True)}
# Options that only change how a run is executed, not what it computes, and that a resumed run really applies:
# they may differ on resume. Not --max-failures or --max-concurrent: Tuner.restore keeps the run's own (Ray 2.60
# restores the RunConfig and TuneConfig from tuner.pkl), so a new value would be ignored while experiment.json
# recorded it; --set checkpoint_every neither, as the trials' configs are restored with them. --storage is not one
# either: the Tune runs (finished trials, checkpoints) live there, so another
# --storage would silently start every trial again beside an Optuna study that already holds them.
# What ray.init accepts as a cluster: "auto", Ray Client's ray://HOST:PORT, or the GCS's HOST:PORT (IPv6 in brackets).
ADDRESS_FORMAT = re.compile(r"auto|ray://\S+|(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}")
EXECUTION_ONLY = {"address", "gpus_per_trial", "cpus_per_trial", "preprocess_workers", "report"}
# Not options: the experiment's identity, set once (see ``run_id`` below), and its folder, which holds the saved
# record being compared (a renamed or copied folder is the same experiment).
NOT_COMPARED = EXECUTION_ONLY | {"run_id", "output"}
# Options naming a file or folder: one inside the experiment folder (the demo's data, a cache under OUT) is
# compared relative to it, so that a renamed or copied experiment folder still resumes.
PATH_OPTIONS = ("data_root", "manifest", "cache_dir", "weights_dir", "storage")
# The command-line option behind a training constant that is not given with --set.
TRAINING_OPTIONS = {"epochs": "--epochs", "patience": "--patience", "seed": "--seed", "weights_dir": "--weights-dir"}


@dataclass
class ExperimentConfig:
    experiment: str = "paper"
    output: str = "runs/paper"
    # data
    data_root: str | None = None
    manifest: str | None = None
    contrasts: tuple[str, ...] = ("t1ce",)
    classes: tuple[str, ...] | None = None
    skip_invalid: bool = False
    allow_unstripped: bool = False  # go on although stripped and unstripped volumes are mixed
    cache_dir: str | None = None
    spacing: float = 2.0
    register: str = "none"  # "mni": N4 + affine registration to MNI152 (ANTsPy) before resampling
    max_per_class: dict[str, int] = field(default_factory=dict)  # e.g. {"Healthy": 259}, drawn with the seed
    # protocol
    models: tuple[str, ...] = PAPER_MODEL_NAMES  # the 2-D baseline (resnet18_2d) is opt-in: --models
    pretrained: str = "both"
    weights_dir: str | None = None
    split: str = "kfold"
    folds: int = 3
    test_size: float = 0.3
    val_fraction: float = 0.2
    seed: int = 0
    epochs: int = 50
    patience: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 20  # trials per (arm, fold) Optuna study
    search_models: tuple[str, ...] | None = None  # arms searched in a demo; None: all arms
    demo_task: str = "tumour"  # which synthetic data a demo writes (DEMO_TASKS)
    # execution
    gpus_per_trial: float = 0.25
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    address: str | None = None
    storage: str | None = None
    max_failures: int = 2
    preprocess_workers: int | None = None
    report: bool = True
    # Names this experiment's Tune runs ("paper-<run_id>", "search-<run_id>") so that experiments sharing one
    # --storage never restore each other's runs. Made on the first run, saved in OUT/experiment.json and read
    # back on resume; None for experiments saved before run ids existed, whose runs keep the bare names.
    run_id: str | None = None

    def __post_init__(self) -> None:
        # Lists arrive from JSON (a resumed run's saved options); keep one type so comparisons hold.
        for name in ("contrasts", "classes", "models", "search_models"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, tuple(value))
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"--experiment must be one of {', '.join(EXPERIMENTS)}, got {self.experiment!r}")
        unknown = [m for m in self.models if m not in MODEL_NAMES]
        if unknown or not self.models:
            raise ValueError(f"--models: unknown {unknown}; choose from {', '.join(MODEL_NAMES)}")
        twice = sorted({m for m in self.models if self.models.count(m) > 1})
        if twice:
            raise ValueError(f"--models names {', '.join(twice)} more than once; list each model once")
        if self.demo_task not in DEMO_TASKS:
            raise ValueError(f"--demo-task must be one of {', '.join(DEMO_TASKS)}, got {self.demo_task!r}")
        if self.pretrained not in PRETRAINED_CHOICES:
            raise ValueError(f"--pretrained must be one of {', '.join(PRETRAINED_CHOICES)}, got {self.pretrained!r}")
        if self.max_failures < 0:
            raise ValueError(f"--max-failures must be 0 or more, got {self.max_failures}")
        if self.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {self.num_samples}")
        if not self.cpus_per_trial > 0:
            raise ValueError(f"--cpus-per-trial must be positive (a trial needs a CPU to drive it), got "
                             f"{self.cpus_per_trial}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be at least 1 (leave it out for no cap), got {self.max_concurrent}")
        if not 0 < self.gpus_per_trial <= 1:
            # A trial trains one fold on one device (cuda:0 of the GPUs Ray gives it): more would sit idle.
            raise ValueError(f"--gpus-per-trial must be in (0, 1] (a trial uses one GPU; 0.25 packs four trials on "
                             f"a GPU), got {self.gpus_per_trial}")
        # Data, split and --set options are checked now, not after preprocessing or hours later in a worker.
        self.split_spec()
        self.preprocess_config()
        self.max_per_class = check_max_per_class(self.max_per_class)
        # A missing --weights-dir is left to the Kinetics check, whose message says where it looked and how to fix it.
        for option, path, kind in (("--data-root", self.data_root, "folder"), ("--manifest", self.manifest, "file")):
            if path is not None and not (Path(path).is_dir() if kind == "folder" else Path(path).is_file()):
                other = "file" if kind == "folder" else "folder"
                found = f"is a {other}, not a {kind}" if Path(path).exists() else f"no such {kind}"
                raise ValueError(f"{option} {path}: {found}")
        # --contrasts under --data-root: BraTS 2019's file suffixes, or RSNA-MICCAI's series (and their BraTS aliases).
        unknown = [c for c in self.contrasts if c.casefold() not in {*BRATS_CONTRASTS, *SEQUENCE_ALIASES}]
        if self.data_root is not None and unknown:  # else every subject's <id>_<contrast> file is "not found"
            raise ValueError(f"--contrasts: unknown {', '.join(unknown)}; BraTS has {', '.join(BRATS_CONTRASTS)}, "
                             f"RSNA-MICCAI {', '.join(s.lower() for s in dict.fromkeys(SEQUENCE_ALIASES.values()))}")
        try:
            training_seed = self.training_constants()["seed"]
        except ValueError as error:  # resolve_config names the key; say which option set it
            key = str(error).split(" ", 1)[0]
            option = f"--set {key}" if key in self.overrides else TRAINING_OPTIONS.get(key)
            raise ValueError(f"{option}: {error}" if option else str(error)) from None
        self._check_seeds(training_seed)
        if self.experiment in ("search", "demo"):
            self._check_search_space()
        if self.address and not ADDRESS_FORMAT.fullmatch(self.address):
            raise ValueError(f"--address {self.address}: not a Ray cluster address; give the head node's HOST:PORT as "
                             "`ray start --head` printed it (e.g. 10.0.0.1:6379), ray://HOST:PORT for Ray Client, or "
                             "auto (the cluster started on this machine)")
        if self.address and not self.storage:
            raise ValueError(
                f"--address {self.address} needs --storage: trials on other hosts write their results and checkpoints "
                "to Ray Tune's storage, and the default (OUT/ray) is on this machine only. Give a folder that every "
                "node mounts at the same path (e.g. --storage /shared/runs) or a URI (s3://bucket/runs).")

    def _check_search_space(self) -> None:
        """The search's ranges are centred on the training constants: build them now, not after the grid has run."""
        from search_spaces.paper import SEARCH_SPACE

        constants = self.training_constants()
        for item in SEARCH_SPACE:  # linear ranges take any centre; a log range only a positive one
            if item.log and not constants[item.name] > 0:
                option = f"--set {item.name}" if item.name in self.overrides else item.name
                raise ValueError(f"{option}={constants[item.name]}: the search draws {item.name} on a log scale "
                                 "around this value, which needs it above 0; give a positive value, or run "
                                 "--experiment paper to train with it unsearched")

    def _check_seeds(self, training_seed: int) -> None:
        """numpy takes seeds in [0, 2**32): training seeds it with seed * 1000 + fold, the inner splits with
        seed + 1000 + fold. Out of range, the splits would fail after preprocessing, or every trial in its worker."""
        training_max, split_max = (2**32 - self.folds) // 1000, 2**32 - 1000 - self.folds
        checks = [("--seed", self.seed, split_max), ("--set seed", training_seed, training_max)] \
            if "seed" in self.overrides else [("--seed", self.seed, min(split_max, training_max))]
        for option, seed, largest in checks:
            if not 0 <= seed <= largest:
                raise ValueError(f"{option} must be a whole number from 0 to {largest}, got {seed}")

    @property
    def output_path(self) -> Path:
        return Path(self.output).resolve()

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).resolve() if self.cache_dir else self.output_path / "cache"

    @property
    def storage_root(self) -> str:
        """Ray Tune's storage: --storage (a shared folder or a URI, kept as text), else OUT/ray."""
        return (self.storage or str(self.output_path / "ray")).rstrip("/")

    def tune_run_name(self, kind: str) -> str:
        """The Tune run of ``kind`` (``paper``: the grid, ``search``) under ``storage_root``, unique per experiment."""
        if kind not in TUNE_RUNS:
            raise ValueError(f"Tune run kind must be one of {', '.join(TUNE_RUNS)}, got {kind!r}")
        return kind if self.run_id is None else f"{kind}-{self.run_id}"

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(spacing=self.spacing, register=self.register)

    def split_spec(self) -> SplitSpec:
        return SplitSpec(self.split, self.folds, self.test_size, self.val_fraction, self.seed)

    def arms(self) -> list[tuple[str, bool]]:
        return [(m, p) for m in self.models for p in PRETRAINED_CHOICES[self.pretrained]]

    def training_constants(self) -> dict[str, Any]:
        """Every training option a trial receives, before the search or the grid adds its own."""
        constants = {**PAPER_DEFAULTS, "epochs": self.epochs, "patience": self.patience, "seed": self.seed,
                     "weights_dir": self.weights_dir, **self.overrides}
        resolved = resolve_config({**constants, "model": self.models[0]})
        return {k: resolved[k] for k in constants}

    def paper_config_id(self) -> str:
        """The id of the grid's configuration: the paper's recipe plus this run's --set overrides."""
        return config_id(self.training_constants())

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Options that differ from a saved run's, ignoring those that only affect execution."""
        mine = self.to_dict()
        saved_output = Path(saved.get("output") or self.output_path)

        def computed(key: str, value: Any, output: Path) -> Any:
            if key == "storage":  # no --storage is OUT/ray: giving that folder explicitly changes nothing
                value = (value or str(output / "ray")).rstrip("/")
            inside = path_in_output(value, output) if key in PATH_OPTIONS else None
            return ("OUT", inside) if inside is not None else value

        return sorted(k for k in mine if k not in NOT_COMPARED and k in saved
                      and computed(k, saved[k], saved_output) != computed(k, mine[k], self.output_path))


def path_in_output(value: Any, output: Path) -> str | None:
    """``value`` relative to ``output`` (POSIX) when it is a local path inside that folder (or the folder), else None:
    how a renamed or copied experiment folder carries the paths that lie in it (PATH_OPTIONS)."""
    if not isinstance(value, str) or "://" in value:
        return None
    path = Path(value)
    return path.relative_to(output).as_posix() if path == output or output in path.parents else None


# Training options with an option of their own: --set would override it silently (and --set weights_dir would skip
# its absolute path and the Kinetics check before the run).
OWN_OPTIONS = {"epochs": "--epochs", "patience": "--patience", "weights_dir": "--weights-dir"}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value``: values parsed as JSON where possible (1e-4, true, null), else kept as text."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        if key in OWN_OPTIONS:
            raise ValueError(f"--set {key}: give it as {OWN_OPTIONS[key]} {text or 'VALUE'} instead (it has its own "
                             "option, which --set would override without a word)")
        if key not in DEFAULT_CONFIG or key in {"model", "pretrained", "fold"}:
            allowed = sorted(set(DEFAULT_CONFIG) - {"model", "pretrained", "fold"})
            raise ValueError(f"--set {key}: not a training option; choose from {', '.join(allowed)}")
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return overrides


def field_names() -> list[str]:
    return [f.name for f in fields(ExperimentConfig)]


def new_run_id() -> str:
    """A short random id for a new experiment's Tune runs (8 hex digits: collisions are not a practical risk)."""
    return uuid.uuid4().hex[:8]
