import json

import pytest

from stablesynth.data.annotation_files import DatasetFormatError, read_jsonl
from stablesynth.data.annotation_records import IGNORE_LABEL, AnswerVocab
from stablesynth.data.msrvtt_formats import read_msrvtt_mc, read_msrvtt_retrieval
from stablesynth.data.qa_formats import read_msrvtt_qa, read_msvd_qa, read_qa, read_tgif_frameqa


def test_msrvtt_qa_with_ans2label_and_categories(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "msrvtt_qa_test.jsonl", [
        {"question": "what is shown?", "answer": "cat", "video_id": "video7010"},
        {"question": "who sings?", "answer": "unicorn", "video_id": "video7011"},
    ])
    (tmp_path / "msrvtt_train_ans2label.json").write_text(json.dumps({"dog": 0, "cat": 1}))
    (tmp_path / "annotation").mkdir()
    (tmp_path / "annotation" / "MSR_VTT.json").write_text(json.dumps(
        {"videos": [{"video_id": "video7010", "category": 9}], "annotations": []}))
    qa = read_msrvtt_qa(tmp_path, "test", media_root=tmp_path / "media")
    assert len(qa) == 2 and len(qa.vocab) == 2 and qa.vocab.source.endswith("ans2label.json")
    a, b = qa.records
    assert (a.label, a.category, a.sample_id) == (1, 9, 0)
    assert a.media_path == tmp_path / "media" / "videos" / "all" / "video7010.mp4"
    assert b.label == IGNORE_LABEL and b.category is None
    assert qa.num_out_of_vocab == 1


def test_msrvtt_qa_builds_vocab_from_train(tmp_path, write_jsonl):
    answers = ["man"] * 3 + ["woman"] * 2 + ["dog", "cat"]
    write_jsonl(tmp_path / "msrvtt_qa_train.jsonl",
                [{"question": "q", "answer": a, "video_id": "video1"} for a in answers])
    qa = read_msrvtt_qa(tmp_path, "train", num_classes=3)
    # Top-3 by frequency, ties alphabetical: man, woman, cat.
    assert qa.vocab.labels == ["man", "woman", "cat"]
    assert [r.label for r in qa.records] == [0, 0, 0, 1, 1, IGNORE_LABEL, 2]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "msrvtt_qa_test.jsonl"
    p.write_text('{"question": "q", "answer": "a", "video_id": "v"}\n{not json\n')
    with pytest.raises(DatasetFormatError, match=r"msrvtt_qa_test\.jsonl:2"):
        read_jsonl(p)
    p.write_text('{"question": "q", "video_id": "v"}\n')
    (tmp_path / "msrvtt_train_ans2label.json").write_text('{"a": 0}')
    with pytest.raises(DatasetFormatError, match=r"msrvtt_qa_test\.jsonl:1: missing field 'answer'"):
        read_msrvtt_qa(tmp_path, "test")


def test_missing_file_and_bad_split(tmp_path):
    with pytest.raises(DatasetFormatError, match=r"msrvtt_qa_test\.jsonl"):
        read_msrvtt_qa(tmp_path, "test", vocab=AnswerVocab({"a": 0}))
    with pytest.raises(ValueError, match="split"):
        read_tgif_frameqa(tmp_path, "val")
    with pytest.raises(ValueError, match="unknown QA dataset"):
        read_qa("nope", tmp_path, "test")


def test_vocab_larger_than_k_is_an_error(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "msrvtt_qa_test.jsonl", [{"question": "q", "answer": "a", "video_id": "v"}])
    (tmp_path / "msrvtt_train_ans2label.json").write_text(json.dumps({"a": 0, "b": 1, "c": 2}))
    with pytest.raises(DatasetFormatError, match="num_classes = 2"):
        read_msrvtt_qa(tmp_path, "test", num_classes=2)
    (tmp_path / "msrvtt_train_ans2label.json").write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(DatasetFormatError, match="share index 0"):
        read_msrvtt_qa(tmp_path, "test")


def test_msvd_qa_mapping_and_answer_set(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "msvd_test_qa_encode.json", [
        {"question": "what is the man doing?", "answer": "play", "video_id": 2},
        {"question": "who cooks?", "answer": "woman", "video_id": 1},
    ])
    (tmp_path / "msvd_youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nabc_1_9 vid2\n")
    (tmp_path / "msvd_answer_set.txt").write_text("woman\nman\nplay\n")
    qa = read_msvd_qa(tmp_path, "test")
    assert qa.vocab.labels == ["woman", "man", "play"]
    a, b = qa.records
    assert a.label == 2 and a.video_id == "vid2"
    assert a.media_path == tmp_path / "YouTubeClips" / "abc_1_9.avi"
    assert b.label == 0 and b.media_path.name == "-4wsuPCjDBc_5_15.avi"
    (tmp_path / "msvd_youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\nbroken line here\n")
    with pytest.raises(DatasetFormatError, match=r"msvd_youtube_mapping\.txt:2"):
        read_msvd_qa(tmp_path, "test")
    (tmp_path / "msvd_youtube_mapping.txt").write_text("-4wsuPCjDBc_5_15 vid1\n")
    with pytest.raises(DatasetFormatError, match="video_id 2"):
        read_msvd_qa(tmp_path, "test")


def test_tgif_tsv_reads_header(tmp_path):
    # Column order differs from the jsonl; the header decides.
    (tmp_path / "Test_frameqa_question.tsv").write_text(
        "gif_name\tquestion\tanswer\ttype\tvid_id\tkey\tdescription\n"
        "tumblr_abc\twhat is the color of the cat ?\twhite\t2\tgif1\t1\ta cat\n"
        "tumblr_def\thow many dogs run ?\tthree\t1\tgif2\t2\tdogs\n")
    (tmp_path / "frameqa_trainval_ans2label.json").write_text(json.dumps({"white": 0, "two": 1}))
    qa = read_qa("tgif-frameqa", tmp_path, "test")
    a, b = qa.records
    assert (a.video_id, a.answer, a.label, a.question_type) == ("tumblr_abc", "white", 0, 2)
    assert a.media_path == tmp_path / "gifs" / "tumblr_abc.gif"
    assert b.label == IGNORE_LABEL and b.question_type == 1
    (tmp_path / "Test_frameqa_question.tsv").write_text("gif_name\tquestion\tanswer\ntumblr_x\tq?\n")
    with pytest.raises(DatasetFormatError, match=r"Test_frameqa_question\.tsv:2"):
        read_tgif_frameqa(tmp_path, "test")


def test_tgif_jsonl_preferred(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "frameqa_test.jsonl", [{"gif_name": "g1", "question": "q", "answer": "red"}])
    write_jsonl(tmp_path / "frameqa_train.jsonl", [{"gif_name": "g0", "question": "q", "answer": "red"}])
    qa = read_tgif_frameqa(tmp_path, "test")
    assert qa.records[0].label == 0 and qa.records[0].question_type == 0


def test_msrvtt_mc(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "msrvtt_mc_test.jsonl", [
        {"clip_name": "video7010", "options": ["a", "b", "c", "d", "e"], "answer": 3},
    ])
    (rec,) = read_msrvtt_mc(tmp_path)
    assert rec.options[rec.answer] == "d" and rec.media_path.name == "video7010.mp4"
    write_jsonl(tmp_path / "msrvtt_mc_test.jsonl", [
        {"clip_name": "video7010", "options": ["a", "b"], "answer": 0},
    ])
    with pytest.raises(DatasetFormatError, match=r"msrvtt_mc_test\.jsonl:1: 'options'"):
        read_msrvtt_mc(tmp_path)


def test_msrvtt_retrieval(tmp_path):
    ann = tmp_path / "annotation"
    ann.mkdir()
    (ann / "MSR_VTT.json").write_text(json.dumps({"annotations": [
        {"image_id": "video0", "caption": "a man talks"},
        {"image_id": "video0", "caption": "someone speaks"},
        {"image_id": "video9", "caption": "a dog runs"},
    ]}))
    (tmp_path / "train_list_jsfusion.txt").write_text("video0\nvideo9\n")
    (tmp_path / "val_list_jsfusion.txt").write_text("video9\nvideo0\n")
    train = read_msrvtt_retrieval(tmp_path, "train")
    assert [r.caption for r in train] == ["a man talks", "someone speaks", "a dog runs"]
    test = read_msrvtt_retrieval(tmp_path, "test")
    assert [(r.video_id, r.caption) for r in test] == [("video9", "a dog runs"), ("video0", "a man talks")]
    (tmp_path / "val_list_jsfusion.txt").write_text("video5\n")
    with pytest.raises(DatasetFormatError, match="video5"):
        read_msrvtt_retrieval(tmp_path, "test")
