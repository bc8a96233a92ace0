"""Detection quality on the labeled scenario: every structural kind at ≥ 0.99."""

from benchmarks.quality import STRUCTURAL_KINDS, evaluate


def test_every_structural_kind_is_found_precisely(scenario):
    report = evaluate(scenario)
    for kind in STRUCTURAL_KINDS:
        row = report["per_kind"][kind]
        assert row["labels"] >= 5, (kind, row)
        assert row["precision"] >= 0.99 and row["recall"] >= 0.99, (kind, row)
    assert report["anomalies_with_logs"] == report["anomalies"]
