"""What a forest fit costs: the trees grown directly against ``IsolationForest.fit``, same buffers.

Models are trained on the labeled scenario (``traceguard train``, 8,000
traces); each fitted forest's buffer, in the columns its last fit chose, is
fitted again both ways, 100 trees, interleaved rounds: ``IsolationForest(...)
.fit`` (what fits did before, the reference) and ``forest._grow_directly`` (the
same tree builder and random draws without the estimator around it). The
trees are checked to be the same, node for node, before anything is timed.
Medians per buffer, and the ratio of the two.

Run ``python -m benchmarks.forest_fit [--rounds N]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.scenario import ScenarioConfig, write_scenario
from traceguard.config import PipelineConfig
from traceguard.models import forest as forest_module, store


def buffers(tmp: Path) -> list[np.ndarray]:
    write_scenario(tmp / "train", ScenarioConfig(traces=8000, seed=8, duration_s=8000 / 3), proto=True)
    subprocess.run([sys.executable, "-m", "traceguard", "train", str(tmp / "train" / "traces.pb"), "--logs",
                    str(tmp / "train" / "logs.pb"), "--model-dir", str(tmp / "models"), "--no-progress"],
                   check=True, capture_output=True)
    model = store.load(tmp / "models", PipelineConfig().learned).forest
    return [f.reservoir_[: f.filled_][:, f.columns_] for f in (*model.forests_.values(), model.shared_) if f.fitted]


def timed(fit, features: np.ndarray) -> float:
    started = time.perf_counter()
    fit(features)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = PipelineConfig().learned.forest
    estimator = forest_module._isolation_forest()

    def reference(features):
        return estimator(n_estimators=config.n_estimators, max_samples=min(256, len(features)),
                         random_state=config.seed).fit(features)

    def direct(features):
        return forest_module._grow_directly(features, config.n_estimators, config.seed)

    with tempfile.TemporaryDirectory() as tmp:
        fitted = buffers(Path(tmp))
    results = []
    for features in fitted:
        same = all(np.array_equal(getattr(a.tree_, name), getattr(b, name))
                   for a, b in zip(reference(features).estimators_, direct(features))
                   for name in forest_module._TREE_ARRAYS)
        times: dict[str, list[float]] = {"isolation_forest": [], "direct": []}
        for _ in range(args.rounds):
            times["isolation_forest"].append(timed(reference, features))
            times["direct"].append(timed(direct, features))
        medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        results.append({"rows": len(features), "features": features.shape[1], "same_trees": same,
                        "ms_median": {name: round(ms, 1) for name, ms in medians.items()},
                        "direct_vs_isolation_forest": round(medians["direct"] / medians["isolation_forest"], 3)})
    print(json.dumps({"benchmark": "forest_fit", "trees": config.n_estimators, "rounds": args.rounds,
                      "buffers": results}, indent=1))


if __name__ == "__main__":
    main()
