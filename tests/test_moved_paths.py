"""The old import paths of what moved in issue 24 (into demul_fast.app and demul_fast.data,
mapping.py to phi.py, the reference modules out of the specification) keep working for one
release: each old name is the very object at its new place,
reached with a DeprecationWarning that names the new place; a name the old module never had
is still an AttributeError. The entry points (``demul-fast``, ``python -m demul_fast.cli``)
run the new command line."""

import importlib
import subprocess
import sys
import warnings

import pytest

MOVED = {
    "demul_fast.train": {"train": "demul_fast.app.train", "TrainConfig": "demul_fast.app.config",
                         "evaluate": "demul_fast.app.evaluate", "load_clip": "demul_fast.app.models",
                         "run_log": "demul_fast.app.run_folder", "DataError": "demul_fast.data",
                         "CheckpointError": "demul_fast.app.checkpoint", "discover": "demul_fast.data.folders",
                         "OutputExistsError": "demul_fast.app.run_folder", "default_workers": "demul_fast.app.config"},
    "demul_fast.datasets": {"LAYOUTS": "demul_fast.data.coop_layouts", "coop_split": "demul_fast.data.coop_layouts",
                            "ClassNamesDiffer": "demul_fast.data.coop_layouts", "DataError": "demul_fast.data"},
    "demul_fast.llm": {"class_name_embeddings": "demul_fast.app.llm", "check_classnames": "demul_fast.data.classnames",
                       "ClassNameMismatch": "demul_fast.data.classnames"},
    "demul_fast.checkpoint": {"write": "demul_fast.app.checkpoint", "CheckpointError": "demul_fast.app.checkpoint"},
    "demul_fast.zeroshot": {"zeroshot": "demul_fast.app.zeroshot"},
    "demul_fast.sweep": {"sweep": "demul_fast.app.sweep", "MissingExtra": "demul_fast.app.runtime"},
    "demul_fast.mapping": {"fit_phi": "demul_fast.phi", "load_phi": "demul_fast.phi",
                           "dataset_classnames": "demul_fast.data.classnames", "DATASETS": "demul_fast.data.classnames",
                           "fit_phi_for_model": "demul_fast.app.phi_cache"},
    "demul_fast.reference": {"DeMulReference": "demul_fast.model", "FullTextEncoder": "demul_fast.text_encoder",
                             "ReferenceHead": "demul_fast.nn", "DeMulModule": "demul_fast.prompt_learner"},
    "demul_fast.distributed": {"ShardedDeMul": "demul_fast.sharded", "shard_bounds": "demul_fast.sharded",
                               "init_from_env": "demul_fast.app.processes"},
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_names_are_the_new_objects_with_a_deprecation_warning(old):
    module = importlib.import_module(old)
    for name, new in MOVED[old].items():
        with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}.{name}"):
            got = getattr(module, name)
        assert got is getattr(importlib.import_module(new), name), (old, name)
        assert name in dir(module)
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_the_specification_keeps_its_own_names_without_a_warning():
    from demul_fast import reference

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(reference.demul_head) and reference.EPS > 0
    assert {"demul_head", "aggregate_prompts", "DeMulReference"} <= set(dir(reference))


def test_from_import_of_an_old_path_works():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from demul_fast.train import TrainConfig, train  # noqa: F401
    from demul_fast.app.config import TrainConfig as new_config
    assert TrainConfig is new_config
    assert [w.category for w in caught] == [DeprecationWarning, DeprecationWarning]


def test_cli_module_runs_the_new_command_line():
    from demul_fast import cli
    from demul_fast.app import cli as app_cli

    assert cli.main is app_cli.main
    for argv in (["-m", "demul_fast.cli", "--help"], ["-m", "demul_fast.app.cli", "--help"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and "{train,eval,fit-phi,sweep,zeroshot}" in proc.stdout, proc.stderr


def test_console_script_names_the_new_command_line():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["demul-fast"] == "demul_fast.app.cli:main"
    module, _, func = project["project"]["scripts"]["demul-fast"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))
