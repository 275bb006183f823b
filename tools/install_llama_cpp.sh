#!/usr/bin/env bash
# Install llama.cpp for qatforge into a venv, building llama-cpp-python from its pinned sdist once
# per machine: the sdist, the built wheel and the llama-imatrix tool are cached under $CACHE, so a
# second venv (or a clean clone) installs in seconds. Also unpacks llama.cpp's own
# convert_hf_to_gguf.py, its conversion/ package and its vendored gguf-py into
# $VENV/share/llama.cpp (the converter must run with that gguf-py, not PyPI's).
set -euo pipefail
VENV=${1:?usage: install_llama_cpp.sh VENV CONSTRAINTS}
CONSTRAINTS=${2:?usage: install_llama_cpp.sh VENV CONSTRAINTS}
VERSION=$(sed -n 's/^llama-cpp-python==//p' "$CONSTRAINTS")
SHA256=$(sed -n 's/^# llama-cpp-python sdist sha256: //p' "$CONSTRAINTS")
CACHE=${QATFORGE_CACHE:-$HOME/.cache/qatforge}
SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
PIP="$VENV/bin/pip"
mkdir -p "$CACHE/sdist" "$CACHE/wheels" "$CACHE/bin"

if [ ! -f "$SDIST" ]; then
  "$PIP" download --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$VERSION"
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "sha256 mismatch for $SDIST" >&2; exit 1; }

if ! ls "$CACHE/wheels"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION from source (about 10 minutes, once per machine)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "$PIP" wheel --no-deps -w "$CACHE/wheels" "$SDIST"
fi
"$PIP" install -q -c "$CONSTRAINTS" --find-links "$CACHE/wheels" "llama-cpp-python==$VERSION"

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
tar -xzf "$SDIST" -C "$SRC"
LLAMA=$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp

TOOL=$CACHE/bin/llama-imatrix-$VERSION
if [ ! -x "$TOOL" ]; then
  echo "building llama-imatrix from the same llama.cpp sources (once per machine)"
  cmake -S "$LLAMA" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$SRC/build" --target llama-imatrix -j "$(nproc)" >/dev/null
  cp "$SRC/build/bin/llama-imatrix" "$TOOL.tmp" && mv "$TOOL.tmp" "$TOOL"
fi
# converter, conversion/, vendored gguf-py, templates and the imatrix tool into the venv
"$VENV/bin/python" -m qatforge.llamacpp install --sdist "$SRC/llama_cpp_python-$VERSION" \
  --prefix "$VENV" --imatrix-tool "$TOOL"
echo "llama.cpp $VERSION installed in $VENV"
