"""The README's modelled headline figures are the committed reports' (benchmarks/readme_figures.py)."""

import json

import pytest

from benchmarks import readme_figures

pytestmark = pytest.mark.usefixtures("one_thread")


def _readme():
    with open(readme_figures.os.path.join(readme_figures.ROOT, "README.md")) as f:
        return f.read()


def test_readme_equals_its_rendering_from_the_reports():
    text = _readme()
    assert readme_figures.render(text) == text, (
        "README.md's headline figures differ from the committed reports: run python -m benchmarks.readme_figures")


def test_a_changed_report_changes_the_rendering(monkeypatch):
    """A regenerated report with another figure makes the README differ from its rendering
    (so the test above fails until the README is re-rendered)."""
    load = readme_figures._load

    def changed(name):
        rep = json.loads(json.dumps(load(name)))
        if name == "imagenet.json":
            rep["cards"]["h100"]["head_fwd_bwd_us_by_backend"]["triton"]["frozen"] += 1.0
        return rep
    monkeypatch.setattr(readme_figures, "_load", changed)
    text = _readme()
    rendered = readme_figures.render(text)
    assert rendered != text
    h = {c: load("imagenet.json")["cards"][c]["head_fwd_bwd_us_by_backend"]["triton"]["frozen"] for c in ("h100", "h200")}
    assert f"{h['h100'] + 1.0:.1f} / {h['h200']:.1f} us" in rendered


def test_every_rendered_row_is_in_the_table():
    with pytest.raises(ValueError, match="rows starting with"):
        readme_figures.render(f"{readme_figures.BEGIN}\n| what | number |\n{readme_figures.END}\n")
    with pytest.raises(ValueError, match="needs one"):
        readme_figures.render("no markers")
