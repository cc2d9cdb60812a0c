import pytest

from lmsqueeze.evaluation.scoring import exact_match, normalize_answer, rouge, score_all, token_f1


def test_squad_normalisation_and_em():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat sat.", "Cat sat") == 1.0
    assert exact_match("a dog", "cat") == 0.0


def test_token_f1_hand_computed():
    # pred tokens: red fox jumps; ref tokens: quick red fox -> overlap 2, P = 2/3, R = 2/3
    assert token_f1("the red fox jumps", "quick red fox") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # clipped counts: one shared "b", P = 1/3, R = 1
    assert token_f1("b b b", "b") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_rouge1_hand_computed():
    # tokens: pred [the, cat, is, on, the, mat], ref [the, cat, sat, on, the, mat]: overlap 5 of 6 each
    assert rouge("The cat is on the mat.", "the cat sat on the mat")[0] == pytest.approx(5 / 6)


def test_rouge_l_hand_computed():
    # pred: police killed the gunman; ref: police kill the gunman -> LCS 3, P = R = 3/4
    assert rouge("police killed the gunman", "police kill the gunman")[1] == pytest.approx(0.75)
    # LCS "the gunman" order matters: pred: the gunman police killed (4), ref: police kill the gunman (4) -> LCS 2
    assert rouge("the gunman police killed", "police kill the gunman")[1] == pytest.approx(0.5)
    assert rouge("", "") == (1.0, 1.0) and rouge("", "a") == (0.0, 0.0) and rouge("...", "!") == (1.0, 1.0)
    assert score_all("Paris.", "paris") == {"em": 1.0, "f1": 1.0, "rouge1": 1.0, "rougeL": 1.0}
