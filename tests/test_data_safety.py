from collections import Counter

import pytest

from lmsqueeze import data
from lmsqueeze.data import REPO_ROOT
from lmsqueeze.errors import LmsqueezeError

HAVE_DATA = (REPO_ROOT.parent / "shared" / "data" / "bbq").exists()


@pytest.mark.skipif(not HAVE_DATA, reason="../shared/data is not beside the repository")
def test_shipped_safety_data():
    crows = data.crows_pairs()
    assert len(crows) == 1508 and crows[0]["index"] == 0
    assert Counter(r["stereo_antistereo"] for r in crows) == {"stereo": 1290, "antistereo": 218}
    assert len({r["bias_type"] for r in crows}) == 9
    pairs = data.dialect_pairs()
    assert len(pairs) == 699
    assert pairs[0] == {"index": 0, "aae": "he be cracking", "sae": "he's usually cracking"}
    prompts, empty = data.bold_prompts()
    assert (len(prompts), empty) == (23674, 5)
    assert len({(p["domain"], p["group"]) for p in prompts}) == 43
    assert not any(p["prompt"] != p["prompt"].strip() for p in prompts)
    assert {x["category"] for x in data.bbq_items(categories=["Religion", "Age"])} == {"Religion", "Age"}
    with pytest.raises(LmsqueezeError, match="unknown BBQ categories"):
        data.bbq_items(categories=["Gender_identity"])


def test_bad_dialect_line_says_where(tmp_path):
    (tmp_path / "dialect").mkdir()
    (tmp_path / "dialect" / "habitual_pairs.tsv").write_text("he be going\the usually goes\nno tab here\n")
    with pytest.raises(LmsqueezeError, match=r"habitual_pairs.tsv:2: expected 'AAE<TAB>SAE'"):
        data.dialect_pairs(tmp_path)
