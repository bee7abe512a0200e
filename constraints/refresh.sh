#!/usr/bin/env bash
# Refresh constraints/test.txt against the newest releases of the day: a throw-away venv
# installs the project with every extra and no constraints, and its resolved closure
# (this project excluded) becomes the constraints file. Run from anywhere:
#   bash constraints/refresh.sh
# then run the README's Quick start blocks (they install with -c constraints/test.txt)
# and commit the file only if they pass.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch torchvision setuptools wheel
(cd "$root" && DEMUL_FAST_BUILD_CUDA=0 pip install -q --no-build-isolation ".[test,bench,clip,llm,triton]")
{
  echo "# The resolved closure of demul-fast[test,bench,clip,llm,triton] on $(date -u +%Y-%m-%d),"
  echo "# Python $(python -c 'import platform; print(platform.python_version())'), $(uname -m)."
  echo "# Made by constraints/refresh.sh (the newest releases that day); used with pip's -c by the"
  echo "# README's Quick start blocks and so by .ci/run."
  pip freeze --all --exclude-editable | grep -viE '^(demul-fast|demul_fast|pip)[=@ ]'
} > "$root/constraints/test.txt"
echo "wrote constraints/test.txt ($(grep -vc '^#' "$root/constraints/test.txt") packages)"
