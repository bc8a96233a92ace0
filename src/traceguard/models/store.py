"""Model directories: the learned state saved without pickle.

A directory holds ``manifest.json`` (format name, version, the SHA-256 of
every file) plus ``latency.npz``, ``structure.json``, ``forest.npz``,
``rates.json`` (the rate detectors' states, keyed by kind, and the incident
tracker's rates of per-trace findings per stage) and
``templates.json`` (each service's log templates and their baselines).
Arrays are read with ``allow_pickle=False``; forests are stored as the
normal traces they were fitted on and refitted on load, which gives the same
trees (fixed seed) and leaves nothing executable in the file. A file whose
version differs, or whose checksum does not match, is refused with a message
that says which and why; so is data out of its bounds (counts that are not
finite, arrays larger than the configuration allows once decompressed,
nesting deeper than the format has).

Saving is atomic: the files are written in full to a sibling directory and
synced, then swapped in by two renames. A kill at any point leaves a whole
model directory, the new one or the one before (``.NAME.old`` while the
swap is half done, which ``load`` and ``exists`` find).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from traceguard import __version__
from traceguard.config import LearnedConfig
from traceguard.models import Models
from traceguard.models.forest import GENERIC_FEATURES, STAGE_COLUMNS, RootForest
from traceguard.models.histogram import BINS, LogHistogram
from traceguard.models.latency import StageLatency
from traceguard.models.structure import RootStructure

FORMAT = "traceguard-models"
VERSION = 3  # 2: rates.json, templates.json; 3: forests' fitted trees and buffer order (2 is read: refit on load)
READS = (2, 3)
FILES = ("latency.npz", "structure.json", "forest.npz", "rates.json", "templates.json")


class ModelFileError(ValueError):
    """A model directory that cannot be used; the message says why."""


def save(models: Models, directory: Path, extras: dict[str, bytes] | None = None) -> None:
    """``extras``: more files saved with the models, atomically with them and
    checksummed (``serve`` keeps the write-ahead log position the models cover);
    read back with ``extra``."""
    directory = Path(directory)
    extras = extras or {}
    staging, previous = _sibling(directory, "new"), _sibling(directory, "old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _save_latency(models, staging / "latency.npz")
    _save_structure(models, staging / "structure.json")
    _save_forest(models, staging / "forest.npz")
    (staging / "rates.json").write_text(json.dumps(models.rates, sort_keys=True))
    (staging / "templates.json").write_text(json.dumps(models.templates.state(), sort_keys=True))
    for name, data in extras.items():
        (staging / name).write_bytes(data)
    names = (*FILES, *extras)
    manifest = {"format": FORMAT, "version": VERSION, "traceguard": __version__,
                "files": {name: _sha256(staging / name) for name in names}}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for name in (*names, "manifest.json"):
        sync(staging / name)
    sync(staging)
    if (previous / "manifest.json").exists() and not (directory / "manifest.json").exists():
        shutil.rmtree(directory, ignore_errors=True)  # a swap that was cut short: the old one is the whole one
    else:
        shutil.rmtree(previous, ignore_errors=True)
        if directory.exists():
            os.rename(directory, previous)
    os.rename(staging, directory)
    sync(directory.parent)
    shutil.rmtree(previous, ignore_errors=True)


def extra(directory: Path, name: str) -> bytes | None:
    """A file ``save`` kept with the models (``extras``), or None if it has none.

    Raises:
        ModelFileError: it does not match its checksum.
    """
    located = _located(Path(directory))
    if located is None:
        return None
    try:
        digest = json.loads((located / "manifest.json").read_text()).get("files", {}).get(name)
    except (ValueError, AttributeError):
        return None  # load() says what is wrong with the manifest
    if digest is None:
        return None
    path = located / name
    if not path.is_file() or _sha256(path) != digest:
        raise ModelFileError(f"{path} does not match its checksum in manifest.json: the file was changed or is corrupt")
    return path.read_bytes()


def exists(directory: Path) -> bool:
    """Whether ``directory`` holds a model (or the whole one of a swap cut short)."""
    return _located(Path(directory)) is not None


def sync(path: Path) -> None:
    """Makes a file's (or a directory's entries') writes durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replaces ``path`` with ``data`` whole: written to a temporary file, synced, renamed."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    sync(temporary)
    os.replace(temporary, path)
    sync(path.parent)


def _sibling(directory: Path, what: str) -> Path:
    return directory.with_name(f".{directory.name}.{what}")


def _located(directory: Path) -> Path | None:
    for candidate in (directory, _sibling(directory, "old")):
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def load(directory: Path, config: LearnedConfig) -> Models:
    """Raises:
        ModelFileError: missing, of another format or version, or not what the manifest says.
    """
    directory = _located(Path(directory)) or Path(directory)
    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{directory} is not a model directory: no manifest.json") from None
    except ValueError as exc:
        raise ModelFileError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelFileError(f"{manifest_path} is not a traceguard model manifest")
    if manifest.get("version") not in READS:
        raise ModelFileError(
            f"{directory} holds model format version {manifest.get('version')}, this traceguard reads "
            f"versions {', '.join(map(str, READS))}: retrain with 'traceguard train'"
        )
    for name in FILES:
        path = directory / name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing")
        if _sha256(path) != manifest.get("files", {}).get(name):
            raise ModelFileError(f"{path} does not match its checksum in manifest.json: the file was changed or is corrupt")
    models = Models.new(config)
    try:
        _load_latency(models, directory / "latency.npz", _latency_bytes(config))
        _load_structure(models, directory / "structure.json")
        _load_forest(models, directory / "forest.npz", _forest_bytes(config))
        models.rates = json.loads((directory / "rates.json").read_text())
        if not isinstance(models.rates, dict):
            raise ValueError("rates.json must hold an object")
        models.templates.restore(json.loads((directory / "templates.json").read_text()))
    except (KeyError, ValueError, TypeError, OverflowError, RecursionError, zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{directory}: malformed model data: {type(exc).__name__}: {exc}"[:500]) from None
    return models


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_SLACK = 16 << 20  # bytes an npz may hold beyond its arrays' bound (names, JSON metadata)


def _latency_bytes(config: LearnedConfig) -> int:
    return config.latency.max_stages * 2 * BINS * 8


def _forest_bytes(config: LearnedConfig) -> int:
    forest = config.forest
    rows = forest.reservoir * (len(GENERIC_FEATURES) + STAGE_COLUMNS)
    trees = forest.n_estimators * (2 * 256) * 6  # at most 2 x max_samples nodes a tree, 6 arrays of them
    return (forest.max_root_operations + 1) * (rows + trees) * 8


def _npz(path: Path, bound: int, counts: bool = False) -> dict[str, np.ndarray]:
    """The arrays, refused before anything is inflated when their sizes in the
    archive exceed ``bound`` (a small file can inflate to gigabytes), and when
    a number is not finite (or, for ``counts``, negative)."""
    with zipfile.ZipFile(path) as archive:
        inflated = sum(member.file_size for member in archive.infolist())
    if inflated > bound + _SLACK:
        raise ValueError(f"{path.name} would inflate to {inflated} bytes, over the {bound + _SLACK} the "
                         "configuration's bounds allow")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    for key, array in arrays.items():
        if array.dtype.kind in "fiu" and not (np.isfinite(array).all() and (not counts or (array >= 0).all())):
            raise ValueError(f"{path.name}: {key} holds numbers that are not finite{' and non-negative' if counts else ''}")
    return arrays


def _save_latency(models: Models, path: Path) -> None:
    stages = models.latency.stages_
    keys = list(stages)
    for key in keys:  # bars are set lazily; what is loaded is judged as what is saved
        if stages[key].regression is None:
            models.latency.set_slow_threshold(stages[key])
    np.savez_compressed(
        path,
        keys=np.array(json.dumps(keys)),
        self_counts=np.array([stages[k].self_hist.counts_ for k in keys]).reshape(len(keys), BINS),
        total_counts=np.array([stages[k].total_hist.counts_ for k in keys]).reshape(len(keys), BINS),
    )


def _load_latency(models: Models, path: Path, bound: int) -> None:
    data = _npz(path, bound, counts=True)
    keys = json.loads(str(data["keys"]))
    model = models.latency
    for key, self_counts, total_counts in zip(keys, data["self_counts"], data["total_counts"], strict=True):
        stage = model.stages_[(str(key[0]), str(key[1]), int(key[2]))] = StageLatency(LogHistogram(self_counts),
                                                                                       LogHistogram(total_counts))
        model.set_slow_threshold(stage)


def structure_state(models: Models) -> dict:
    """The learned structure as JSON-ready data (small: counts per stage)."""
    return {"roots": [
        {"service": service, "operation": operation, "traces": root.traces,
         "stages": [[*stage, count] for stage, count in root.stages.items()]}
        for (service, operation), root in models.structure.roots_.items()
    ]}


def restore_structure(models: Models, state: dict) -> None:
    models.structure.roots_.clear()
    for item in state["roots"]:
        root = models.structure.roots_[(str(item["service"]), str(item["operation"]))] = RootStructure()
        root.traces = int(item["traces"])
        root.stages = {(str(s), str(o), int(k)): int(c) for s, o, k, c in item["stages"]}


def _save_structure(models: Models, path: Path) -> None:
    path.write_text(json.dumps(structure_state(models)))


def _load_structure(models: Models, path: Path) -> None:
    restore_structure(models, json.loads(path.read_text()))


def _save_forest(models: Models, path: Path) -> None:
    """Each forest's buffer in slot order with its write position, and what its last
    fit made (``RootForest.fitted_state``): loading gives the forest in memory, and
    its later refits fit the same rows in the same order as the running one's."""
    forests = [*models.forest.forests_.items(), (None, models.forest.shared_)]
    meta, arrays = [], {}
    for i, (key, forest) in enumerate(forests):
        name = "shared" if key is None else f"rows_{i}"
        arrays[name] = forest.reservoir_[: forest.filled_]
        item = {"next": forest.next_, "since_fit": forest.since_fit_, "fit": None}
        if key is not None:
            item.update(root=list(key), stages=[[*stage, column] for stage, column in forest.stage_index_.items()])
        fitted = forest.fitted_state()
        if fitted is not None and all(np.isfinite(v).all() for v in fitted[1].values()):
            item["fit"] = fitted[0]
            arrays.update({f"fit_{name}_{k}": v for k, v in fitted[1].items()})
        meta.append(item)
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)


def _load_forest(models: Models, path: Path, bound: int) -> None:
    data = _npz(path, bound)
    model = models.forest
    meta = json.loads(str(data["meta"]))
    for i, item in enumerate(meta):
        if "root" not in item:  # the shared one, last
            _refill(model.shared_, data["shared"], item, _fitted(data, "shared"))
            return
        forest = model.forest_for((str(item["root"][0]), str(item["root"][1])))
        if forest is None:
            break
        forest.stage_index_ = {(str(s), str(o), int(k)): int(c) for s, o, k, c in item["stages"]}
        _refill(forest, data[f"rows_{i}"], item, _fitted(data, f"rows_{i}"))
    _refill(model.shared_, data["shared"], {}, {})  # a file of version 2 or one cut at max_root_operations


def _fitted(data: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    prefix = f"fit_{name}_"
    return {key[len(prefix):]: value for key, value in data.items() if key.startswith(prefix)}


def _refill(forest: RootForest, rows: np.ndarray, item: dict, fitted: dict[str, np.ndarray]) -> None:
    """The buffer back (``item``'s write position: slot order; a file without one, or
    one saved with another reservoir size, holds or gets the rows oldest first), then
    what the last fit made, or a fit now where the file has none."""
    size = len(forest.reservoir_)
    if rows.ndim != 2 or rows.shape[1] != forest.reservoir_.shape[1]:
        raise ValueError(f"forest rows of shape {rows.shape}, expected (n, {forest.reservoir_.shape[1]})")
    exact = "next" in item and len(rows) <= size and (len(rows) == size or item["next"] == len(rows) % size)
    if not exact:
        if "next" in item and len(rows):
            rows = np.roll(rows, -int(item["next"]) % len(rows), axis=0)  # oldest first
        rows = rows[-size:]
    forest.reservoir_[: len(rows)] = rows
    forest.filled_ = len(rows)
    forest.next_ = int(item["next"]) % size if exact else len(rows) % size
    forest.since_fit_ = int(item.get("since_fit", 0)) if exact else 0
    if exact and item.get("fit") is not None:
        forest.restore_fitted(item["fit"], fitted)
    elif forest.filled_ >= min(forest.config.warmup_traces, size):
        forest.fit()
