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


def test_the_measured_column_fills_from_committed_gpu_rows(monkeypatch, tmp_path):
    """The kernel-model table's measured-on-GPU column is empty without committed GPU rows
    and shows benchmarks/gpu_check.sh's demul_head fwd+bwd row (imagenet, bfloat16) per
    backend once one is under benchmarks/results/gpu/<device-date>/."""
    monkeypatch.setattr(readme_figures, "GPU_RESULTS", str(tmp_path))
    empty = readme_figures.kernel_model_table()
    assert all(line.rstrip().endswith("|  |") or line.rstrip().endswith("| |") for line in empty.split("\n")[2:])
    run = tmp_path / "h100-2026-12-07"
    run.mkdir()
    row = dict(suite="head", op="demul_head", mode="fwd+bwd", dtype="bfloat16", preset="imagenet", status="ok",
               provider="cuda", time_ms=0.0612, device_name="NVIDIA H100 80GB HBM3", date="2026-12-07T10:00:00Z")
    other = dict(row, mode="fwd", time_ms=0.02)  # not the fwd+bwd row: ignored
    (run / "imagenet-cuda.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(other) + "\n")
    table = readme_figures.kernel_model_table()
    cuda_frozen = next(ln for ln in table.split("\n") if ln.startswith("| ImageNet preset") and "CUDA, X frozen" in ln)
    assert cuda_frozen.endswith("| 61.2 us (NVIDIA H100 80GB HBM3, 2026-12-07) |"), cuda_frozen
    triton_frozen = next(ln for ln in table.split("\n") if ln.startswith("| ImageNet preset") and "Triton, X frozen" in ln)
    assert triton_frozen.endswith("|  |"), triton_frozen
