import json

import pytest
import torch

from lmsqueeze import data, models
from lmsqueeze.errors import LmsqueezeError


@pytest.fixture(scope="module")
def tok():
    return models.byte_tokenizer()


def test_pydoc_is_english_prose():
    text = data.load_text("pydoc")
    assert len(text) > 100_000 and "the" in text


def test_calibration_windows_are_disjoint_seeded_slices(tok):
    a = data.calibration_batches(tok, "pydoc", 8, 64, seed=3)
    b = data.calibration_batches(tok, "pydoc", 8, 64, seed=3)
    c = data.calibration_batches(tok, "pydoc", 8, 64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    all_tokens = data.tokenize_text(tok, data.load_text("pydoc"))
    starts = []
    for row in a:  # each window is an aligned slice of the token stream
        hits = [i for i in range(0, all_tokens.numel() - 63, 64) if torch.equal(all_tokens[i:i + 64], row)]
        assert hits
        starts.append(hits[0])
    assert len(set(starts)) == 8


def test_too_short_says_counts(tok, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("abc def")
    with pytest.raises(LmsqueezeError, match=r"has 7 tokens but 2 x 16 = 32 were asked"):
        data.calibration_batches(tok, str(p), 2, 16)


def test_local_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"content": "y"}\n')
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{broken\n')
    assert data.load_text(str(tmp_path / "a.json")) == "one\n\ntwo"
    assert data.load_text(str(tmp_path / "b.jsonl")) == "x\n\ny"
    with pytest.raises(LmsqueezeError, match=r"c.jsonl:2: not valid JSON"):
        data.load_text(str(tmp_path / "c.jsonl"))
    with pytest.raises(LmsqueezeError, match="does not exist"):
        data.load_text(str(tmp_path / "nope.txt"))


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(LmsqueezeError, match=f"looked in: {tmp_path}/wikitext2/test.txt"):
        data.load_text("wikitext2:test", data_dir=tmp_path)


def test_unknown_source():
    with pytest.raises(LmsqueezeError, match="unknown text source 'c4'"):
        data.load_text("c4")


def test_data_dir_env(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_text("hello wiki")
    monkeypatch.setenv("LMSQUEEZE_DATA_DIR", str(tmp_path))
    assert data.load_text("wikitext2:valid") == "hello wiki"


@pytest.mark.skipif(not (data.REPO_ROOT.parent / "shared" / "data" / "wikitext2").exists(),
                    reason="../shared/data is not beside the repository")
def test_shared_data_sources():
    assert data.load_text("wikitext2").lstrip().startswith("= Robert")
    assert len(data.alpaca_records()) == 5000
    piqa = data.piqa_records()
    assert len(piqa) == 1838 and {r["label"] for r in piqa} == {0, 1}


# ---- text files that are not UTF-8 (issue 16, item 7): one line naming file, line and the problem ----

CP1252_JSONL = '{"text": "plain"}\n{"text": "caf\u00e9"}\n'.encode("cp1252")  # line 2 holds the lone byte 0xe9


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", CP1252_JSONL),
    (".txt", "first line\nsecond caf\u00e9 line\n".encode("cp1252")),
    (".json", '[\n"one",\n"caf\u00e9"\n]'.encode("cp1252")),
])
def test_non_utf8_text_file_names_file_line_and_byte(tmp_path, suffix, content):
    p = tmp_path / f"bad{suffix}"
    p.write_bytes(content)
    with pytest.raises(LmsqueezeError) as e:
        data.load_text(str(p))
    msg = str(e.value)
    line = {".jsonl": 2, ".txt": 2, ".json": 3}[suffix]
    assert msg.startswith(f"{p}:{line}: ") and "not UTF-8" in msg and "e9" in msg, msg
    assert "\n" not in msg and "byte offset" not in msg


def test_read_text_file_and_iter_jsonl(tmp_path):
    from lmsqueeze.io import iter_jsonl, read_text_file

    p = tmp_path / "ok.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"b": "x\xe2\x80\xa8y"}\n')  # BOM, CRLF, a U+2028 inside a string
    assert read_text_file(p, "mc task file").startswith('{"a"')
    assert list(iter_jsonl(p, "mc task file")) == [(1, {"a": 1}), (3, {"b": "x\u2028y"})]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(CP1252_JSONL)
    with pytest.raises(LmsqueezeError, match=r"bad.jsonl:2: mc task file is not UTF-8: byte\(s\) e9 at column 14"):
        list(iter_jsonl(bad, "mc task file"))
    with pytest.raises(LmsqueezeError, match=r"dialect file '.*nope.tsv' does not exist"):
        read_text_file(tmp_path / "nope.tsv", "dialect file")
    with pytest.raises(LmsqueezeError, match="is a directory"):
        read_text_file(tmp_path, "dialect file")


def test_non_utf8_named_data_set(tmp_path):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "valid.txt").write_bytes(b"ok\nok\n\x93quoted\x94\n")
    with pytest.raises(LmsqueezeError, match=r"valid.txt:3: the wikitext2:valid data set is not UTF-8"):
        data.load_text("wikitext2:valid", data_dir=tmp_path)


def test_calibration_batches_takes_text_read_before(tok):
    text = data.load_text("pydoc")
    assert torch.equal(data.calibration_batches(tok, "pydoc", 4, 32, seed=1, text=text),
                       data.calibration_batches(tok, "pydoc", 4, 32, seed=1))


def test_write_json_atomic_gets_umask_permissions(tmp_path):
    """mkstemp makes 0600 files: a JSON report must be readable as a plain open() would leave it (issue 16,
    the sibling of item 8 in the atomic writers)."""
    import os

    from lmsqueeze.io import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_json_atomic(tmp_path / "private.json", {"a": 1})
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
