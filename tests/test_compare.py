"""gdro compare's pieces: variant specs, the row read from an eval's results.json, the table."""
import pytest

from pipeline.errors import GdroError
from stages.compare import _row, format_table, parse_variant


def test_parse_variant():
    assert parse_variant("dgpo") == ("dgpo", "dgpo", ["train.loss=dgpo"])
    slug, loss, sets = parse_variant("dpo:train.beta=50,train.lr=2e-5")
    assert (slug, loss) == ("dpo-beta50-lr2e-5", "dpo")
    assert sets == ["train.loss=dpo", "train.beta=50", "train.lr=2e-5"]
    with pytest.raises(GdroError, match="KEY=VALUE"):
        parse_variant("dpo:beta")


def _res(ref, trained, gain, ci, q0, q1):
    est = lambda v: {"value": v}
    # the shape pipeline/eval/report.py writes: out_of_domain is a list (the table shows the first)
    return {"target": "strict", "out_of_domain": ["quality", "partial"],
            "models": [{"overall": {"strict": est(ref), "quality": est(q0)}},
                       {"overall": {"strict": est(trained), "quality": est(q1)},
                        "gain": {"value": gain, "ci": ci}}]}


def test_row_and_table():
    row = _row("dgpo", _res(0.40, 0.60, 0.20, [0.12, 0.28], 0.80, 0.79), 123.4, 0.40)
    assert row["share"] == pytest.approx(0.5) and row["ood_change"] == pytest.approx(-0.01)
    text = format_table([row], "strict", "quality")
    assert "| dgpo | 0.600 | +0.200 [+0.120, +0.280] | 50% | 0.790 (-0.010) | 123 |" in text
    no_ceiling = _row("raft", _res(0.4, 0.4, 0.0, None, 0.8, 0.8), None, None)
    assert "| raft | 0.400 | +0.000 |  | 0.800 (+0.000) |  |" in format_table([no_ceiling], "strict", "quality")
