"""CoOp's dataset layouts (demul_fast.data.coop_layouts): every layout read from a generated miniature,
CoOp's few-shot draw, the class-name warning, and the bad splits that stop `demul-fast
train` / `sweep` / `zeroshot` with one error line and nothing written."""

import json
import os
import warnings

import pytest

from coop_mini import COUNTS, make_dataset
from demul_fast.data import classnames
from demul_fast.app import cli
from demul_fast.app.config import TrainConfig
from demul_fast.app.train import data_split
from demul_fast.data import DataError
from demul_fast.data import coop_layouts as datasets
from demul_fast.data.coop_layouts import LAYOUTS, ClassNamesDiffer


def test_layout_table_covers_the_eleven_datasets_in_order():
    assert tuple(LAYOUTS) == classnames.DATASETS
    assert LAYOUTS["eurosat"].images == "2750" and LAYOUTS["eurosat"].split == "split_zhou_EuroSAT.json"
    assert LAYOUTS["sun397"].images == "SUN397" and LAYOUTS["caltech101"].folder == "caltech-101"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_reads_its_miniature(tmp_path, name):
    folder = make_dataset(tmp_path, name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClassNamesDiffer)  # the shipped names: no warning
        data = datasets.read(name, tmp_path)
    assert data.folder == folder and data.classes == classnames.dataset_classnames(name)[:3]
    per_split = {s: len(v) for s, v in data.items.items()}
    if name == "imagenet":  # val/ is the test set; there is no validation split
        assert per_split == {"train": 3 * COUNTS["train"], "val": 0, "test": 3 * COUNTS["test"]}
    else:
        assert per_split == {s: 3 * n for s, n in COUNTS.items()}
    image_root = folder / LAYOUTS[name].images
    for s, items in data.items.items():
        assert sorted({label for _, label in items}) == ([0, 1, 2] if items else [])
        assert all(os.path.isfile(p) and os.path.commonpath([p, image_root]) == str(image_root) for p, _ in items)
    # the dataset's own folder works as --root too
    assert datasets.read(name, folder).classes == data.classes


@pytest.mark.parametrize("name", ["oxford_pets", "imagenet", "fgvc_aircraft"])
def test_coop_split_draws_k_train_and_min_k_4_val_shots_by_seed(tmp_path, name):
    make_dataset(tmp_path, name, counts={"train": 7, "val": 5, "test": 2})
    split = datasets.coop_split(name, tmp_path, shots=5, seed=1, allow_fewer=False)
    classes = classnames.dataset_classnames(name)[:3]
    assert split["classes"] == classes and split["short"] == {} and split["layout"] == f"coop:{name}"
    assert {c: len(v) for c, v in split["train"].items()} == {c: 5 for c in classes}
    if name == "imagenet":
        assert list(split["eval"]) == ["test"]
    else:
        assert {c: len(v) for c, v in split["eval"]["val"].items()} == {c: 4 for c in classes}
    assert {c: len(v) for c, v in split["eval"]["test"].items()} == {c: 2 for c in classes}
    assert datasets.coop_split(name, tmp_path, shots=5, seed=1, allow_fewer=False) == split
    other = datasets.coop_split(name, tmp_path, shots=5, seed=2, allow_fewer=False)
    assert other["train"] != split["train"] and other["eval"]["test"] == split["eval"]["test"]
    with pytest.raises(DataError, match="3 class.*fewer than --shots=8 training images.*--allow-fewer"):
        datasets.coop_split(name, tmp_path, shots=8, seed=1, allow_fewer=False)
    short = datasets.coop_split(name, tmp_path, shots=8, seed=1, allow_fewer=True)
    assert short["short"] == {c: 7 for c in classes}


def test_coop_split_draws_the_images_dassl_draws(tmp_path):
    """Known answer from Dassl's own generate_fewshot_dataset (run once, outside the repository,
    after random.seed(1) as CoOp's set_random_seed does): K=2 from train, then min(2, 4) from
    val with the same generator; label 3 has one val image and keeps it."""
    names = classnames.dataset_classnames("eurosat")[:4]
    train_labels = [2, 0, 1, 2, 0, 3, 1, 2, 0, 1, 2, 0, 3, 1, 2, 0, 1, 0, 2, 1, 0]
    val_labels = [1, 0, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]
    split = {"train": [[f"tr{i}.jpg", label, names[label]] for i, label in enumerate(train_labels)],
             "val": [[f"va{i}.jpg", label, names[label]] for i, label in enumerate(val_labels)],
             "test": [["te0.jpg", 0, names[0]]]}
    folder = tmp_path / "eurosat"
    (folder / "2750").mkdir(parents=True)
    for items in split.values():
        for rel, _, _ in items:
            (folder / "2750" / rel).touch()  # the draw reads the split, not the pixels
    (folder / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    got = datasets.coop_split("eurosat", tmp_path, shots=2, seed=1, allow_fewer=False)

    def drawn(by_class):  # in the order CoOp lists them: class by class, each in draw order
        return [os.path.basename(p) for c in names if c in by_class for p in by_class[c]]

    by_label = {n: [] for n in names}
    for p in ["tr3.jpg", "tr14.jpg", "tr20.jpg", "tr1.jpg", "tr9.jpg", "tr2.jpg", "tr12.jpg", "tr5.jpg"]:
        by_label[names[train_labels[int(p[2:-4])]]].append(p)
    assert drawn(got["train"]) == drawn(by_label)
    by_label = {n: [] for n in names}
    for p in ["va11.jpg", "va7.jpg", "va10.jpg", "va1.jpg", "va2.jpg", "va5.jpg", "va9.jpg"]:
        by_label[names[val_labels[int(p[2:-4])]]].append(p)
    assert drawn(got["eval"]["val"]) == drawn(by_label)
    assert got["short"] == {}


def test_renamed_class_warns_with_the_first_difference(tmp_path):
    folder = make_dataset(tmp_path, "dtd")
    path = folder / LAYOUTS["dtd"].split
    split = json.loads(path.read_text())
    for s in split.values():
        for item in s:
            if item[1] == 1:
                item[2] = "fuzzy"
    path.write_text(json.dumps(split))
    with pytest.warns(ClassNamesDiffer, match="dtd: class 1 is 'fuzzy' where the shipped dtd list has 'blotchy'"):
        data = datasets.read("dtd", tmp_path)
    assert data.classes == ["banded", "fuzzy", "braided"]


def _break(kind, tmp_path):
    """A dataset root holding eurosat broken one way; returns the expected error text."""
    folder = make_dataset(tmp_path / "data", "eurosat")
    path = folder / LAYOUTS["eurosat"].split
    split = json.loads(path.read_text())
    if kind == "missing split file":
        path.unlink()
        return "eurosat: split file .*split_zhou_EuroSAT.json not found"
    if kind == "missing images":
        split["test"][1][0] = "Forest/not_there.jpg"
        split["test"].append(["Forest/gone.jpg", 1, "Forest"])
        path.write_text(json.dumps(split))
        return r"eurosat: the split names 2 image\(s\) that do not exist under .*2750, the first: Forest/not_there.jpg"
    split["val"][4][2] = "Pasture Land"
    path.write_text(json.dumps(split))
    return (r"eurosat: .*split_zhou_EuroSAT.json gives label 1 two class names: 'Forest' \(in train\) and "
            r"'Pasture Land' \(val\[4\]\)")


KINDS = ["missing split file", "missing images", "one label two names"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["train", "sweep", "zeroshot"])
def test_bad_split_is_one_error_line_and_nothing_written(tmp_path, capsys, kind, command):
    import re

    expected = _break(kind, tmp_path)
    out = tmp_path / "out"
    root = str(tmp_path / "data")
    argv = {"train": ["train", "--dataset", "eurosat", "--root", root, "--out", str(out), "--shots", "1"],
            "sweep": ["sweep", "--root", root, "--datasets", "eurosat", "--shots", "1,2", "--seeds", "1",
                      "--out", str(out), "--epochs", "1"],
            "zeroshot": ["zeroshot", "--dataset", "eurosat", "--root", root, "--json", str(out / "zs.json")]}[command]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demul-fast: error: "), captured.err
    assert re.search(expected, lines[0]), lines[0]
    assert not out.exists() and captured.out == ""


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.__setitem__("train", [i for i in s["train"] if i[1] != 0]), "train labels must be 0..C-1"),
    (lambda s: s["test"].append(["Forest/x.jpg", 7, "Sea"]), "label 7 .*'Sea'.* is in test but not in train"),
    (lambda s: [i.__setitem__(2, "Forest") for i in s["train"] + s["val"] + s["test"] if i[1] == 2],
     "labels 1 and 2 share the class name 'Forest'"),
    (lambda s: s["val"].__setitem__(0, ["a.jpg", "0", "Annual Crop Land"]), r"val\[0\] is .*not \[relative path"),
    (lambda s: s.pop("test"), "must be a JSON object with lists 'train', 'val' and 'test'"),
])
def test_malformed_splits_are_refused(tmp_path, edit, message):
    folder = make_dataset(tmp_path, "eurosat")
    path = folder / LAYOUTS["eurosat"].split
    split = json.loads(path.read_text())
    edit(split)
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=message):
        datasets.read("eurosat", tmp_path)


def test_imagenet_and_aircraft_files_are_checked(tmp_path):
    folder = make_dataset(tmp_path, "imagenet")
    (folder / "images" / "val" / "n00000001").rename(folder / "images" / "val" / "n00000009")
    with pytest.raises(DataError, match="holds other class folders than images/train .first: n00000001"):
        datasets.read("imagenet", tmp_path)
    (folder / "classnames.txt").write_text("n00000000 tench\n")
    with pytest.raises(DataError, match="class folder n00000001 of .* is not in classnames.txt"):
        datasets.read("imagenet", tmp_path)
    air = make_dataset(tmp_path, "fgvc_aircraft")
    (air / "images_variant_val.txt").write_text("va00000 A380\n")
    with pytest.raises(DataError, match="images_variant_val.txt line 1 names variant 'A380', not in variants.txt"):
        datasets.read("fgvc_aircraft", tmp_path)
    air = make_dataset(tmp_path / "other", "fgvc_aircraft")
    (air / "images_variant_test.txt").unlink()
    with pytest.raises(DataError, match="images_variant_test.txt not found"):
        datasets.read("fgvc_aircraft", tmp_path / "other")


def test_data_and_dataset_exclude_each_other(tmp_path):
    make_dataset(tmp_path, "dtd")
    with pytest.raises(ValueError, match="excludes --data"):
        data_split(TrainConfig(data=str(tmp_path), out="", dataset="dtd", root=str(tmp_path)))
    with pytest.raises(ValueError, match="give --data DIR"):
        data_split(TrainConfig(data=None, out=""))
    with pytest.raises(DataError, match="--dataset 'cifar10' is not one of imagenet"):
        data_split(TrainConfig(data=None, out="", dataset="cifar10", root=str(tmp_path)))
    split = data_split(TrainConfig(data=None, out="", dataset="dtd", root=str(tmp_path), shots=2))
    assert split["layout"] == "coop:dtd"


def test_parse_names():
    assert datasets.parse_names("all") == list(LAYOUTS)
    assert datasets.parse_names(" eurosat, DTD ") == ["dtd", "eurosat"]  # table order
    for bad, message in (("dtd,foo", "--datasets: 'foo' is not one of imagenet"), (",", "--datasets is empty"),
                         ("dtd,dtd", "names a dataset twice")):
        with pytest.raises(DataError, match=message):
            datasets.parse_names(bad)
