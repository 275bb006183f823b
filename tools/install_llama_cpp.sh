#!/usr/bin/env bash
# Install llama.cpp for qatforge into a venv from the pinned llama-cpp-python sdist, compiling the
# vendored llama.cpp sources once per machine:
#   - one cmake build (shared libraries) gives libllama/libggml* and the tools the pipeline calls
#     (llama-quantize, llama-imatrix, llama-perplexity, llama-bench); it is cached in
#     $CACHE/llama.cpp-<version>/, so a second venv or a clean clone installs in seconds;
#   - llama-cpp-python itself is installed as its pure-Python package (LLAMA_BUILD=OFF: nothing is
#     compiled a second time) and its lib/ directory gets the libraries and tools of that build;
#   - llama.cpp's convert_hf_to_gguf.py, its conversion/ package and vendored gguf-py go into
#     $VENV/share/llama.cpp (the converter must run with that gguf-py, not PyPI's).
set -euo pipefail
VENV=${1:?usage: install_llama_cpp.sh VENV CONSTRAINTS}
CONSTRAINTS=${2:?usage: install_llama_cpp.sh VENV CONSTRAINTS}
VERSION=$(sed -n 's/^llama-cpp-python==//p' "$CONSTRAINTS")
SHA256=$(sed -n 's/^# llama-cpp-python sdist sha256: //p' "$CONSTRAINTS")
CACHE=${QATFORGE_CACHE:-$HOME/.cache/qatforge}
SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
BUILT=$CACHE/llama.cpp-$VERSION
TOOLS="llama-quantize llama-imatrix llama-perplexity llama-bench"
PIP="$VENV/bin/pip"
mkdir -p "$CACHE/sdist" "$CACHE/wheels"

if [ ! -f "$SDIST" ]; then
  "$PIP" download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$VERSION"
fi
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "sha256 mismatch for $SDIST" >&2; exit 1; }

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
tar -xzf "$SDIST" -C "$SRC"
PKG=$SRC/llama_cpp_python-$VERSION
LLAMA=$PKG/vendor/llama.cpp

if [ ! -f "$BUILT/.complete" ]; then
  echo "building llama.cpp from llama-cpp-python $VERSION's sources (about 6 minutes on 2 cores, once per machine)"
  # Every library and tool looks for its libraries beside itself ($ORIGIN).
  cmake -S "$LLAMA" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$SRC/build" --target llama $TOOLS -j "$(nproc)" >/dev/null
  rm -rf "$BUILT.tmp" && mkdir -p "$BUILT.tmp"
  cp -P "$SRC"/build/bin/lib*.so* "$BUILT.tmp/"
  for t in $TOOLS; do cp "$SRC/build/bin/$t" "$BUILT.tmp/"; done
  touch "$BUILT.tmp/.complete"
  rm -rf "$BUILT" && mv "$BUILT.tmp" "$BUILT"
fi

# The bindings without their own copy of llama.cpp: a pure-Python wheel, cached like the build.
if ! ls "$CACHE/wheels"/llama_cpp_python-"$VERSION"-py3-none-*.whl >/dev/null 2>&1; then
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PIP" wheel -q --no-deps -w "$CACHE/wheels" "$SDIST"
fi
"$PIP" install -q -c "$CONSTRAINTS" --find-links "$CACHE/wheels" "llama-cpp-python==$VERSION"

# converter, conversion/, vendored gguf-py, templates; libraries and tools into llama_cpp/lib
"$VENV/bin/python" -m qatforge.llamacpp install --sdist "$PKG" --prefix "$VENV" --build "$BUILT"
echo "llama.cpp $VERSION installed in $VENV"
