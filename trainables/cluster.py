"""Running on a Ray cluster of several hosts: ship the code, then check that every node sees the shared files.

``ray.init(address=...)`` ships nothing by itself: a worker on another host would import whatever copy of this
repository it happens to have (or none). So the driver hands Ray a ``runtime_env`` whose ``working_dir`` is this
repository (without data, runs, caches, weights or large files, which must not be uploaded: Ray keeps the
package in its GCS, at most 512 MiB) and the environment variables a trial depends on.

Trials read the preprocessing cache and the Kinetics weights by path, and write results and checkpoints to
Tune's storage, wherever they run. A node that does not see one of those paths would fail every trial placed
on it, hours into a run. :func:`check_cluster` finds out before the Tuner starts: the driver writes a token
file under ``--storage``, and a tiny task pinned to each alive node (``NodeAffinitySchedulingStrategy``)
reports what that node sees of the token, the cache entry and the weights files.
"""
from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainables.experiment import ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# Never uploaded with the code (gitwildmatch patterns relative to the repository root, as Ray reads them):
# version control, run folders, caches, data and weight files. .gitignore is honoured as well (Ray's default).
UPLOAD_EXCLUDES = (
    ".git/", "runs/", "cache/", "data/", "**/__pycache__/", ".pytest_cache/", ".benchmarks/", ".whl/", ".gl/",
    "*.nii", "*.nii.gz", "*.mgz", "*.npy", "*.npz", "*.pth", "*.pt", "*.ckpt", "*.db", "*.sqlite",
    "*.zip", "*.tar", "*.tar.gz", "*.tgz", "events.out.tfevents.*",
)
# Any other file at least this large stays behind too: code is small, and Ray warns from 10 MiB on.
LARGE_FILE_BYTES = 10 * 1024 * 1024
# Variables a trial reads in its own process, forwarded when the driver has them set (a worker inherits the
# environment of its node's `ray start`, not the driver's): the torch hub folder where Kinetics weights are
# looked up without --weights-dir, Tune's output mode and trial-folder behaviour, cuBLAS determinism.
FORWARDED_ENV = ("TORCH_HOME", "RAY_AIR_NEW_OUTPUT", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S",
                 "RAY_CHDIR_TO_TRIAL_DIR", "CUBLAS_WORKSPACE_CONFIG")
# A node answers within this time or is reported: its first task starts a worker and unpacks the code.
NODE_CHECK_TIMEOUT_S = 180.0
TOKEN_PREFIX = ".cluster-check-"
SHARED_FS_FIX = ("Fix: mount the shared file system at the same path on every node, and put --storage, --cache-dir "
                 "(default OUT/cache) and --weights-dir on it, e.g. --storage /shared/runs --cache-dir /shared/cache "
                 "--weights-dir /shared/kinetics.")


class ClusterCheckError(RuntimeError):
    """The cluster cannot run this experiment as it stands; the message names each node, path and the fix."""


@dataclass(frozen=True)
class SharedPath:
    """A path every trial needs on whatever node it runs, with what the driver sees there."""

    what: str  # for the message, e.g. "the preprocessing cache entry (--cache-dir)"
    path: str
    expected: str  # the driver's fingerprint (see ``fingerprint``)


@dataclass
class NodeView:
    """What one node answered: who it is, where its code came from, the forwarded variables, its view of each path."""

    node_id: str
    hostname: str
    code: str
    env: dict[str, str] = field(default_factory=dict)
    seen: dict[str, str | None] = field(default_factory=dict)


def is_uri(storage: str) -> bool:
    return "://" in storage


def fingerprint(path: str) -> str | None:
    """None when missing; "folder"; or a file's size, so that a node-local copy of another size is caught."""
    if os.path.isdir(path):
        return "folder"
    if os.path.isfile(path):
        return f"{os.path.getsize(path)} bytes"
    return None


def _inside_repo(path: str | None) -> str | None:
    """``path`` as an anchored exclude pattern when it lies inside the repository, else None."""
    if not path or is_uri(path):
        return None
    try:
        relative = Path(path).resolve().relative_to(REPO_ROOT)
    except ValueError:
        return None
    return f"/{relative.as_posix()}" if relative.parts else None


def large_files(root: Path = REPO_ROOT, limit: int = LARGE_FILE_BYTES) -> list[str]:
    """Files of at least ``limit`` bytes under ``root`` (excluded folders are not walked), as anchored patterns."""
    pruned = {name.strip("/") for name in UPLOAD_EXCLUDES if name.endswith("/") and "*" not in name}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in pruned and d != "__pycache__"]
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink() and path.stat().st_size >= limit:
                found.append(f"/{path.relative_to(root).as_posix()}")
    return sorted(found)


def upload_excludes(config: ExperimentConfig) -> list[str]:
    """What stays behind when the code is uploaded: the fixed patterns, this run's folders, large files."""
    own = [_inside_repo(p) for p in (config.output, config.cache_dir, config.storage, config.data_root,
                                     config.weights_dir, config.manifest)]
    return [*UPLOAD_EXCLUDES, *sorted({p for p in own if p}), *large_files()]


def runtime_env(config: ExperimentConfig) -> dict[str, Any]:
    """The job's runtime_env: this repository as every worker's working directory, and the forwarded variables."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {"working_dir": str(REPO_ROOT), "excludes": upload_excludes(config), "env_vars": env}


def init_options(config: ExperimentConfig) -> dict[str, Any]:
    """``ray.init`` keywords: a new local instance, or the cluster at --address with the code shipped to it.

    Without --address the instance is explicitly local: a bare ``ray.init()`` joins whatever cluster the last
    ``ray start`` on this machine recorded (or $RAY_ADDRESS), skipping the code shipping and the checks below.
    """
    if not config.address:
        return {"address": "local", "include_dashboard": False}
    return {"address": config.address, "include_dashboard": False, "runtime_env": runtime_env(config)}


def check_address_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Refuse an --address where nothing listens, in seconds: ``ray.init`` would retry it for many minutes.

    ``auto`` is left to Ray (it reads the address that ``ray start`` recorded on this machine and fails fast).
    """
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # IPv6 in brackets
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--address {address}: nothing accepted a connection at {host}:{port} within {timeout_s:g} s ({error}). "
            f"Start the cluster first (`ray start --head --port {port}` on its head node) or check the address "
            "and that this machine can reach that port") from None


def ignored_ray_address(config: ExperimentConfig) -> str | None:
    """A note when $RAY_ADDRESS names a cluster that this run, lacking --address, will not use."""
    if config.address or not os.environ.get("RAY_ADDRESS"):
        return None
    return (f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set, but without --address this run starts its own local "
            "Ray instance; pass --address (and --storage) to run on that cluster.")


def trial_paths(config: ExperimentConfig, cache_dir: str) -> list[SharedPath]:
    """The cache entry every trial memory-maps and the Kinetics file of each pre-trained arm, as the driver sees them."""
    from models import pretraining_dataset, resolve_weights_path

    volumes = Path(cache_dir) / "volumes.npy"
    paths = [SharedPath("the preprocessing cache entry (--cache-dir)", str(volumes), fingerprint(str(volumes)))]
    for model in sorted({m for m, pretrained in config.arms() if pretrained}):
        weights = str(resolve_weights_path(model, "kinetics", config.weights_dir))
        paths.append(SharedPath(f"the {pretraining_dataset(model)} weights of {model} (--weights-dir)", weights, fingerprint(weights)))
    return paths


@contextmanager
def storage_token(storage: str) -> Iterator[SharedPath]:
    """Write a unique token file under a local ``--storage`` (proving it writable) and remove it afterwards."""
    token = Path(storage) / f"{TOKEN_PREFIX}{uuid.uuid4().hex}"
    try:
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text("written by tune_main's cluster check; safe to delete\n")
    except OSError as error:
        raise ClusterCheckError(f"--storage {storage}: cannot write there from the driver ({error}). Give a folder "
                                f"on the shared file system that this user may write to.") from error
    try:
        yield SharedPath("a token file the driver wrote under --storage", str(token), fingerprint(str(token)))
    finally:
        token.unlink(missing_ok=True)


@ray.remote(num_cpus=0, max_retries=0)
def _look_from_node(paths: list[str]) -> NodeView:
    """Run on one node: its identity, where its copy of the code lives, and what it sees of ``paths``."""
    # Imported here: Ray pickles a remote function by value, so a module global would be the driver's value.
    import trainables

    return NodeView(node_id=ray.get_runtime_context().get_node_id(), hostname=socket.gethostname(),
                    code=str(Path(trainables.__file__).resolve().parents[1]), env={k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
                    seen={path: fingerprint(path) for path in paths})


def alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def node_label(node: dict[str, Any]) -> str:
    return (f"node {node.get('NodeManagerAddress', '?')} (host {node.get('NodeManagerHostname', '?')}, "
            f"node id {node['NodeID']})")


def look_from_every_node(nodes: list[dict[str, Any]], paths: list[str], timeout_s: float = NODE_CHECK_TIMEOUT_S,
                         ) -> tuple[dict[str, NodeView], dict[str, str]]:
    """One pinned task per node (``ray.nodes()`` entries): the views that came back, and per node id why none came back."""
    refs = {node["NodeID"]: _look_from_node.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(paths)
        for node in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    views, failures = {}, {}
    for node_id, ref in refs.items():
        if ref not in ready:
            failures[node_id] = (f"did not answer within {timeout_s:.0f} s (see `ray status` and the node's logs "
                                 "under /tmp/ray/session_latest/logs)")
            ray.cancel(ref, force=True)
            continue
        try:
            views[node_id] = ray.get(ref)
        except ray.exceptions.RayError as error:  # e.g. the runtime_env (the code) could not be set up there
            failures[node_id] = f"could not run a task: {str(error).strip().splitlines()[-1]}"
    return views, failures


def problems(nodes: list[dict[str, Any]], views: dict[str, NodeView], failures: dict[str, str],
             paths: list[SharedPath]) -> dict[str, list[str]]:
    """Per node id: a line per path that differs from the driver's view, or why the node could not be asked."""
    found = {}
    for node in nodes:
        label, node_id = node_label(node), node["NodeID"]
        if node_id in failures:
            found[node_id] = [f"{label}: {failures[node_id]}"]
            continue
        lines = []
        for shared in paths:
            seen = views[node_id].seen.get(shared.path)
            if seen is None:
                lines.append(f"{label}: does not see {shared.what}: {shared.path}")
            elif seen != shared.expected:
                lines.append(f"{label}: sees something else at {shared.path} ({seen}; the driver sees "
                             f"{shared.expected}): {shared.what} is not on a file system they share")
        if lines:
            found[node_id] = lines
    return found


@contextmanager
def _maybe_token(storage: str, notes: list[str]) -> Iterator[SharedPath | None]:
    """A token for a file-system --storage; for a URI, nothing to check file by file (noted)."""
    if is_uri(storage):
        notes.append(f"--storage {storage} is a URI: not checked from the nodes (Ray Tune writes to it from every "
                     "node, so each needs access and credentials); the cache and weights are checked.")
        yield None
        return
    with storage_token(storage) as token:
        yield token


def check_cluster(config: ExperimentConfig, cache_dir: str,
                  timeout_s: float = NODE_CHECK_TIMEOUT_S) -> tuple[list[str], dict[str, NodeView]]:
    """Stop (ClusterCheckError) unless every alive node sees --storage, the cache entry and the weights.

    Call after ``ray.init`` and before any Tuner. Returns notes to print and each node's view (by node id).
    A URI ``--storage`` (s3://, gs://...) is not a file system this check can read: it is skipped, and said so.
    """
    notes = []
    paths = trial_paths(config, cache_dir)
    nodes = alive_nodes()
    with _maybe_token(config.storage_root, notes) as token:
        checked = [token, *paths] if token else paths
        views, failures = look_from_every_node(nodes, [p.path for p in checked], timeout_s)
        found = problems(nodes, views, failures, checked)
    if found:
        lines = [line for node_lines in found.values() for line in node_lines]
        raise ClusterCheckError(
            f"The Ray cluster at --address {config.address} cannot run this experiment: {len(found)} of {len(nodes)} "
            "nodes are not ready.\n  " + "\n  ".join(lines) + f"\n{SHARED_FS_FIX}")
    notes.append(f"Cluster check: all {len(nodes)} nodes see " + ", ".join(p.what for p in checked) + ".")
    return notes, views
