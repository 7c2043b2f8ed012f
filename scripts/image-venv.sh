#!/bin/sh
# The container image's install steps, in one place: the Dockerfile's build
# stage runs this, and tests/integration/test_image.py runs the same script in a
# fresh directory to prove the recipe without a Docker engine.
#
#   image-venv.sh SRC_DIR VENV_DIR [PYTHON]
#
# Creates VENV_DIR with PYTHON, builds the project's wheel and the wheels of its
# runtime dependencies (never the dev extra) from SRC_DIR with the venv's pip,
# installs them from those wheels only (--no-index), byte-compiled so the venv
# runs on a read-only root filesystem, then removes pip and setuptools from the
# venv: the final image has no build tools.
set -eu

src=${1:?usage: image-venv.sh SRC_DIR VENV_DIR [PYTHON]}
venv=${2:?usage: image-venv.sh SRC_DIR VENV_DIR [PYTHON]}
python=${3:-python3}

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

"$python" -m venv "$venv"
"$venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$wheels" "$src"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
  --no-index --find-links "$wheels" --compile a3mailer-exporter
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools
# Entry point works from any working directory and imports nothing from SRC_DIR.
"$venv/bin/a3mailer-exporter" version
