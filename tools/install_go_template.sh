#!/usr/bin/env bash
# Build qatforge's Go-template checker (tools/ollama_template/main.go, stdlib only) into
# $VENV/bin/qatforge-gotemplate: the Ollama Modelfile's TEMPLATE is executed by Go's own
# text/template. Installs Debian's golang-go when `go` is missing; rebuilds only when the source
# is newer than the binary. The build needs no network (no module requirements, GOPROXY=off).
set -euo pipefail
VENV=${1:?usage: install_go_template.sh VENV}
SRC=$(cd "$(dirname "$0")/ollama_template" && pwd)
mkdir -p "$VENV/bin"
OUT=$(cd "$VENV/bin" && pwd)/qatforge-gotemplate
CACHE=${QATFORGE_CACHE:-$HOME/.cache/qatforge}

if [ -x "$OUT" ] && [ "$OUT" -nt "$SRC/main.go" ] && [ "$OUT" -nt "$SRC/go.mod" ]; then
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_go_template.sh: 'go' is not on PATH and apt-get is not available; install Go (>= 1.16) and rerun 'make install'" >&2
    exit 1
  fi
  SUDO=
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  fi
  echo "installing Debian's golang-go (needed to build qatforge-gotemplate)"
  export DEBIAN_FRONTEND=noninteractive
  if ! { $SUDO apt-get install -y -qq golang-go >/dev/null \
         || { $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq golang-go >/dev/null; }; }; then
    echo "install_go_template.sh: 'apt-get install golang-go' failed; install Go (>= 1.16) and rerun 'make install'" >&2
    exit 1
  fi
  hash -r
  command -v go >/dev/null 2>&1 || { echo "install_go_template.sh: golang-go installed but 'go' is not on PATH" >&2; exit 1; }
fi

mkdir -p "$CACHE/go"
export GOCACHE=$CACHE/go/build GOPATH=$CACHE/go/path GOFLAGS= GOPROXY=off GOTOOLCHAIN=local CGO_ENABLED=0
(cd "$SRC" && go build -trimpath -o "$OUT.tmp" .)
mv -f "$OUT.tmp" "$OUT"
echo "built $OUT with $(go version)"
