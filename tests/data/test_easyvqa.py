import torch

from stablesynth.data.easyvqa import (
    COLORS,
    IGNORE,
    QUESTION_TYPES,
    SHAPES,
    load_easyvqa,
    question_type_of,
    scene_attributes,
)


def test_loads_both_splits_with_vocabulary():
    d = load_easyvqa()
    assert d.num_answers == 13
    assert set(d.answers) == {*COLORS, *SHAPES, "yes", "no"}
    assert d.train.images.shape == (4000, 3, 64, 64) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (1000, 3, 64, 64)
    assert len(d.train) == 38575 and len(d.test) == 9673
    assert int(d.train.image.max()) == 3999 and int(d.test.image.max()) == 999
    assert load_easyvqa() is d  # decoded once per process


def test_question_types_agree_with_answers():
    d = load_easyvqa()
    yes_no = {d.answers.index("yes"), d.answers.index("no")}
    colors = {d.answers.index(c) for c in COLORS}
    for split in (d.train, d.test):
        for qt, a in zip(split.question_type.tolist(), split.answer.tolist()):
            name = QUESTION_TYPES[qt]
            if name == "color":
                assert a in colors
            elif name == "shape":
                assert a not in colors and a not in yes_no
            else:
                assert a in yes_no


def test_question_type_of_examples():
    assert QUESTION_TYPES[question_type_of("what color is the shape?")] == "color"
    assert QUESTION_TYPES[question_type_of("what is the color of the circle?")] == "color"
    assert QUESTION_TYPES[question_type_of("what is the blue shape?")] == "shape"
    assert QUESTION_TYPES[question_type_of("is there a red shape in the image?")] == "yes_no_color"
    assert QUESTION_TYPES[question_type_of("does the image contain a rectangle?")] == "yes_no_shape"


def test_scene_attributes_agree_with_every_what_question():
    data = load_easyvqa()
    color, shape = scene_attributes(data, "test")
    src = data.test
    for q in range(len(src)):
        answer = data.answers[int(src.answer[q])]
        img = int(src.image[q])
        if answer in COLORS:
            assert color[img] == COLORS.index(answer)
        if answer in SHAPES:
            assert shape[img] == SHAPES.index(answer)
    assert float((color != IGNORE).float().mean()) > 0.85
    assert float((shape != IGNORE).float().mean()) > 0.85
