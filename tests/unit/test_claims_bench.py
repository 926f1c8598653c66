"""The claim-support benchmark on a slice of the shared SQuAD data: the combined confidence
separates right answers from ones with a name or number no passage has, and better than before."""

import json

from hybrid_serve.benchmarks.claims import main
from tests.conftest import shared_file


def test_claim_support_separates_added_and_swapped_names(tmp_path):
    squad = shared_file("data/squad/squad-v1.1-dev-part-a.json")
    assert main(["--squad", str(squad), "--limit", "40", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("restated/added/all", "restated/swapped/all", "sentence/swapped/all"):
        s = report["summary"][key]
        assert s["auroc_after"] > max(0.9, s["auroc_before"]), (key, s)
        assert s["flagged_wrong"] > 0.8 and s["flagged_right"] < 0.1
    assert (tmp_path / "roc.png").is_file()
