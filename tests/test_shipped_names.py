"""The class-name lists shipped in demul_fast/data are pinned: length and SHA-256 of each file.

A change to a list (a fixed name, a regenerated union) must change this table on purpose.
``union.txt`` is generated from the 11 lists, never edited by hand:

    python -c "from demul_fast.data import classnames; names = classnames.compute_union(
        [classnames.dataset_classnames(d) for d in classnames.DATASETS]);
        open('demul_fast/data/union.txt', 'w', encoding='utf-8').write('\\n'.join(names) + '\\n')"

(names compared after underscores -> spaces and lower-casing, first spelling kept, in
``classnames.DATASETS`` order).
"""

import hashlib
from importlib import resources

import pytest

from demul_fast.data import classnames

# file: (names, sha256 of the file's bytes)
SHIPPED = {
    "imagenet": (1000, "8800e39242cbed4c6889376e20a49cfdaf4f84a773a6686d15c3b39972ef94c4"),
    "caltech101": (100, "04030f9999682befcc78147a0cc4f7de99f192cdbc4035b8e243de454b1a5027"),
    "oxford_pets": (37, "956787e7fabada0bd8a787af35d4a963c56fe5a577e720a6fce2bfa4aefcfc5c"),
    "stanford_cars": (196, "538c706e79b29f5225b847ab9ffd676cb9d5da36745c11ae9aa1ea1a05708e81"),
    "oxford_flowers": (102, "b82464f0bfb4f814d05cb37764b98d7e0d02e9c5d99698a4671cda7bde53b9af"),
    "food101": (101, "e2d699f9b5f65fb920d1db7c97bd237028790f1fb2755c5762bbe9ab90d3ab38"),
    "fgvc_aircraft": (100, "6e14e778b0a7c94c80619a7ba2c9f90c6784c9c997e308938ff8d3ee11662f0b"),
    "sun397": (397, "299af56c243af7feb40193ccdee4498eb16d14d7773b5e0f9ef284e4702ddf45"),
    "dtd": (47, "b5a36bd7012d5b019f0330d9c2ed1c9ed9a92d9698368220b0e6fe25acd86367"),
    "eurosat": (10, "c21a85e1ff8199174c1a358728d3f2ca44d0e9d89b584dadd7a7b340a3deda3a"),
    "ucf101": (101, "de6f552cdc00cf3b06079b9d18176de73af4a3707b47801845284f34d906545a"),
    "union": (2114, "4eb0f84e31809acb8412e30b0240ee2f5490ea4d9a5a99e38cd771a6464e48ef"),
}


def test_every_shipped_list_is_pinned():
    shipped = sorted(p.name for p in resources.files("demul_fast").joinpath("data").iterdir()
                     if p.name.endswith(".txt"))
    assert shipped == sorted(f"{name}.txt" for name in SHIPPED)
    assert set(SHIPPED) == set(classnames.DATASETS) | {"union"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_list_length_and_checksum(name):
    raw = resources.files("demul_fast").joinpath("data", f"{name}.txt").read_bytes()
    names = classnames.union_classnames() if name == "union" else classnames.dataset_classnames(name)
    count, digest = SHIPPED[name]
    assert len(names) == count, name
    assert hashlib.sha256(raw).hexdigest() == digest, f"{name}.txt changed: update SHIPPED on purpose"


def test_union_is_generated_from_the_lists_and_distinct():
    union = classnames.union_classnames()
    assert union == classnames.compute_union([classnames.dataset_classnames(d) for d in classnames.DATASETS])
    keys = [" ".join(n.replace("_", " ").lower().split()) for n in union]
    assert len(set(keys)) == len(union) == 2114


def test_oxford_flowers_lotus_is_named_as_coop_names_it():
    """CoOp's split file names Oxford Flowers label 77 (0-based) "lotus", not "lotus lotus"."""
    flowers = classnames.dataset_classnames("oxford_flowers")
    assert flowers[77] == "lotus" and "lotus lotus" not in classnames.union_classnames()
