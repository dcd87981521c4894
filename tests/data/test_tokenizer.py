import pytest

from stablesynth.data.easyvqa import load_easyvqa
from stablesynth.data.tokenizer import BERT_VOCAB_SIZE, CLS_ID, PAD_ID, SEP_ID, QuestionTokenizer


def test_loads_offline_and_gives_bert_ids(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = QuestionTokenizer()
    assert tok.vocab_size == BERT_VOCAB_SIZE == 30522
    ids, mask = tok.encode(["What color is the shape?", "is there a circle?"], max_length=12)
    assert ids.shape == mask.shape == (2, 12)
    assert ids[:, 0].tolist() == [CLS_ID, CLS_ID] == [101, 101]
    # uncased: "What" and "what" map to the same id (2054 in BERT-base-uncased)
    assert ids[0, 1] == 2054
    n = int(mask[0].sum())
    assert ids[0, n - 1] == SEP_ID and (ids[0, n:] == PAD_ID).all() and (mask[0, n:] == 0).all()
    assert tok.decode(ids[0].tolist()) == "what color is the shape?"


def test_truncation_keeps_sep_and_all_questions_fit_default_length():
    tok = QuestionTokenizer()
    ids, mask = tok.encode(["does the image not contain a gray shape in the image at all?"], max_length=6)
    assert ids.shape == (1, 6) and int(ids[0, -1]) == SEP_ID and mask.all()
    d = load_easyvqa()
    qs = sorted(set(d.train.questions) | set(d.test.questions))
    _, mask = tok.encode(qs, max_length=16)
    assert int(mask.sum(1).max()) < 16  # nothing an easy-VQA question says is cut off


def test_bad_input():
    tok = QuestionTokenizer()
    with pytest.raises(TypeError):
        tok.encode("a single string", 8)
    with pytest.raises(ValueError):
        tok.encode(["x"], 1)
    with pytest.raises(FileNotFoundError):
        QuestionTokenizer("/nonexistent/tokenizer")
