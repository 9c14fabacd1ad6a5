"""Which tensors of a torch.save file are the weights (``_torchfile.select_weights``),
on hand-made ``TorchFile`` dicts as the core returns them: the state dict chosen, other
keys reported, the DDP prefix, tied duplicates, overlapping slices, views refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastcast import ModelFolderError
from fastcast._source.torchfile import select_weights

PATH = Path("ckpt.pth")


def t(
    storage: str = "0",
    shape: tuple[int, ...] = (2, 3),
    offset: int = 0,
    stride: tuple[int, ...] | None = None,
    dtype: str = "F32",
) -> dict[str, Any]:
    """A tensor entry's description; offsets computed as the core would (data at 64)."""
    contiguous_stride = [3, 1] if shape == (2, 3) else [1] * len(shape)
    strides = list(stride) if stride is not None else contiguous_stride
    n = 1
    for d in shape:
        n *= d
    begin = 64 + 1000 * int(storage) + 4 * offset
    return {
        "dtype": dtype,
        "shape": list(shape),
        "stride": strides,
        "storage": storage,
        "storage_offset": offset,
        "offsets": [begin, begin + 4 * n],
        "contiguous": stride is None,
    }


def tf(*entries: tuple[list[str], Any], unreferenced: list[str] | None = None) -> Any:
    return {
        "format": "zip",
        "prefix": "archive",
        "byteorder": "little",
        "entries": [
            {"path": p, "tensor": v} if isinstance(v, dict) else {"path": p, "other": v}
            for p, v in entries
        ],
        "unreferenced": unreferenced or [],
    }


def names(w: Any) -> list[str]:
    return [x.name for x in w.tensors]


def test_a_top_level_dict_of_tensors_is_the_state_dict():
    w = select_weights(PATH, tf((["a"], t("0")), (["b"], t("1"))))
    assert names(w) == ["a", "b"] and w.key is None and not w.notes
    assert w.tensors[0].offsets == (64, 88) and w.tensors[1].shape == (2, 3)
    assert w.tensors[0].file == PATH and w.tensors[0].dtype == "F32"


@pytest.mark.parametrize("key", ["state_dict", "model", "module", "model_state_dict"])
def test_a_known_key_is_chosen_and_the_rest_reported(key):
    w = select_weights(
        PATH,
        tf(
            ([key, "x.weight"], t("0")),
            (["epoch"], "int"),
            (["optimizer", "state"], "dict with non-string keys"),
            (["optimizer", "param_groups"], "list of 1"),
        ),
    )
    assert names(w) == ["x.weight"] and w.key == key
    assert any("'epoch'" in n and "'optimizer'" in n and "skipped" in n for n in w.notes)


def test_nested_dicts_inside_the_state_dict_are_joined_with_dots():
    w = select_weights(PATH, tf((["model", "encoder", "w"], t("0")), (["model", "b"], t("1"))))
    assert names(w) == ["encoder.w", "b"]


def test_non_tensor_entries_of_the_state_dict_are_skipped_and_reported():
    w = select_weights(PATH, tf((["w"], t("0")), (["_extra_state"], "object foo.Bar")))
    assert names(w) == ["w"]
    assert any("'_extra_state'" in n for n in w.notes)


def test_two_known_keys_are_ambiguous():
    with pytest.raises(ModelFolderError, match=r"ambiguous.*state_dict, model.*--state-dict-key"):
        select_weights(PATH, tf((["model", "w"], t("0")), (["state_dict", "w"], t("1"))))


def test_an_unknown_key_must_be_named():
    file = tf((["ema", "w"], t("0")), (["step"], "int"))
    with pytest.raises(ModelFolderError, match="tensors are under ema; choose one with"):
        select_weights(PATH, file)
    w = select_weights(PATH, file, state_dict_key="ema")
    assert names(w) == ["w"] and w.key == "ema"


def test_top_level_tensors_beside_a_known_key_are_ambiguous():
    with pytest.raises(ModelFolderError, match=r"\(the top level\), state_dict"):
        select_weights(PATH, tf((["w"], t("0")), (["state_dict", "w"], t("1"))))


def test_state_dict_key_chooses_among_several():
    file = tf((["model", "w"], t("0")), (["ema", "w"], t("1")), (["state_dict", "v"], t("2")))
    assert names(select_weights(PATH, file, state_dict_key="ema")) == ["w"]
    with pytest.raises(ModelFolderError, match=r"has no key 'nope'.*'model', 'ema'"):
        select_weights(PATH, file, state_dict_key="nope")


def test_a_key_without_tensors_is_refused():
    with pytest.raises(ModelFolderError, match="key 'epoch' holds no tensors"):
        select_weights(PATH, tf((["w"], t("0")), (["epoch"], "int")), state_dict_key="epoch")


def test_files_without_a_dict_of_tensors_are_refused():
    with pytest.raises(ModelFolderError, match="single tensor"):
        select_weights(PATH, tf(([], t("0"))))
    with pytest.raises(ModelFolderError, match="holds no tensors"):
        select_weights(PATH, tf(([], "dict with non-string keys")))
    with pytest.raises(ModelFolderError, match="holds no tensors"):
        select_weights(PATH, tf((["epoch"], "int")))


def test_the_ddp_prefix_is_reported_and_stripped_on_request():
    file = tf((["module.a"], t("0")), (["module.b"], t("1")))
    w = select_weights(PATH, file)
    assert names(w) == ["module.a", "module.b"]
    assert any("--strip-prefix module." in n for n in w.notes)
    assert names(select_weights(PATH, file, strip_prefix="module.")) == ["a", "b"]
    with pytest.raises(ModelFolderError, match=r"no tensor name starts with 'model\.'"):
        select_weights(PATH, file, strip_prefix="model.")


def test_stripping_that_makes_two_names_one_is_refused():
    file = tf((["module.a"], t("0")), (["a"], t("1")))
    with pytest.raises(ModelFolderError, match="both be named 'a'"):
        select_weights(PATH, file, strip_prefix="module.")


def test_tied_duplicates_are_written_once_under_the_first_name():
    emb = t("0")
    file = tf(
        (["model.embed_tokens.weight"], emb),
        (["model.norm.weight"], t("1", shape=(3,))),
        (["lm_head.weight"], dict(emb)),
    )
    w = select_weights(PATH, file)
    assert names(w) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert w.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert any("lm_head.weight (= model.embed_tokens.weight)" in n for n in w.notes)


def test_partial_overlaps_keep_their_own_ranges():
    flat = [
        (["a"], t("0", shape=(6,))),
        (["b"], t("0", shape=(4,), offset=2)),
        (["c"], t("0", shape=(6,), dtype="I32")),  # same bytes, another dtype: not tied
        (["e1"], t("3", shape=(0,))),
        (["e2"], t("3", shape=(0,))),  # empty tensors share no bytes: both kept
    ]
    w = select_weights(PATH, tf(*flat))
    assert names(w) == ["a", "b", "c", "e1", "e2"] and not w.tied
    assert [x.offsets for x in w.tensors[:2]] == [(64, 88), (72, 88)]


def test_non_contiguous_views_are_refused_by_name():
    file = tf((["w"], t("0")), (["wt"], t("0", shape=(3, 2), stride=(1, 3))))
    with pytest.raises(ModelFolderError, match=r"tensor 'wt' is a view.*stride \[1, 3\]"):
        select_weights(PATH, file)


def test_an_empty_name_is_refused():
    with pytest.raises(ModelFolderError, match="empty name"):
        select_weights(PATH, tf((["w"], t("0")), ([""], t("1"))))


def test_unreferenced_members_are_reported():
    w = select_weights(PATH, tf((["w"], t("0")), unreferenced=["archive/data/99"]))
    assert any("archive/data/99" in n for n in w.notes)
