#!/bin/sh
# Builds the container image's virtualenv: the Dockerfile runs it, and so does `make image-venv`
# (and the supply-chain test), since no container engine is needed to check what it installs.
# It installs the runtime lock, hash-checked, then the relay's own wheel, and nothing else: no pip,
# no setuptools, no dev or local extras.
# Usage: build-venv.sh SOURCE_DIR VENV_DIR   (PYTHON picks the interpreter, python3 by default)
set -eu
src=$(cd "$1" && pwd)
venv=$2
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The build tools (pip, setuptools, wheel) live in a throw-away virtualenv, pinned by hash.
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install --quiet --require-hashes --no-deps -r "$src/requirements/build.txt"
pip="$work/tools/bin/pip"

"$python" -m venv --without-pip "$venv"
"$pip" --python "$venv/bin/python" install --quiet --require-hashes --no-deps \
    -r "$src/requirements/runtime.txt"

# The relay's wheel is built from a copy of what the image ships, leaving the source tree clean.
mkdir "$work/src"
cp -R "$src/pyproject.toml" "$src/README.md" "$src/consumer" "$work/src/"
"$pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" "$work/src"
"$pip" --python "$venv/bin/python" install --quiet --no-deps "$work"/dist/chouette_relay-*.whl
# The lock is complete: every requirement of every installed package is satisfied.
"$pip" --python "$venv/bin/python" check
