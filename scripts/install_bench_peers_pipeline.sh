#!/usr/bin/env bash
# A private Python 3.14 with bergtalzug 0.2.0, for scripts/bench_pipeline.py (issue 11).
#
# bergtalzug 0.2.0 needs Python >= 3.14; the machine runs Debian 12 (Python 3.11,
# glibc 2.36).  This unpacks Debian unstable's python3.14 and the newer libraries it was
# built against (glibc, OpenSSL, ...) into a prefix with dpkg -x -- nothing is installed
# into the system, the system python is not touched -- points the interpreter binary at
# the prefix's dynamic loader and libraries (patchelf from the stable archive, unpacked
# the same way), makes a venv and pip-installs bergtalzug==0.2.0 into it (and pytest, to
# run tests/test_compat_bergtalzug.py against the real library: bench_pipeline.py
# --compat-check).
#
#   bash scripts/install_bench_peers_pipeline.sh          # prefix /opt/py314
#   PY314_PREFIX=/somewhere/else bash scripts/install_bench_peers_pipeline.sh
#
# Idempotent: a second run finds the venv's bergtalzug and exits.  Prints the venv's
# python path last; bench_pipeline.py looks for /opt/py314/venv/bin/python (or
# $BERGTALZUG_PYTHON).
set -euo pipefail
PREFIX="${PY314_PREFIX:-/opt/py314}"
ROOT="$PREFIX/root"
VENV="$PREFIX/venv"
ARCH="x86_64-linux-gnu"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import bergtalzug, pytest, pytest_timeout' 2>/dev/null; then
    echo "$VENV/bin/python"
    exit 0
fi

mkdir -p "$PREFIX/apt/etc" "$PREFIX/apt/lists/partial" "$PREFIX/apt/cache/archives/partial" \
         "$PREFIX/tools/debs" "$ROOT"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian unstable main" \
    > "$PREFIX/apt/etc/sources.list"
# A separate source list, package lists and cache: the system's apt state is only read
# (Dir::State::status), never written.
UNSTABLE=(-o "Dir::Etc::SourceList=$PREFIX/apt/etc/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$PREFIX/apt/lists" -o "Dir::Cache=$PREFIX/apt/cache"
          -o "Dir::State::status=/var/lib/dpkg/status" -o "APT::Sandbox::User=root")
apt-get "${UNSTABLE[@]}" -qq update

PACKAGES=(python3.14 python3.14-minimal libpython3.14-stdlib libpython3.14-minimal
          python3.14-venv python3-pip-whl
          libc6 libssl3t64 libffi8 libsqlite3-0 libexpat1 zlib1g libzstd1 liblzma5
          libbz2-1.0 libuuid1 libncursesw6 libtinfo6 libreadline8t64 libdb5.3t64 libmpdec4)
(cd "$PREFIX/apt/cache/archives" && apt-get "${UNSTABLE[@]}" -qq download "${PACKAGES[@]}")
for deb in "$PREFIX"/apt/cache/archives/*.deb; do
    dpkg -x "$deb" "$ROOT"
done

# patchelf from the system's own (stable) archive: unstable's needs the newer glibc.
if [ ! -x "$PREFIX/tools/usr/bin/patchelf" ]; then
    (cd "$PREFIX/tools/debs" && apt-get -qq download patchelf)
    dpkg -x "$PREFIX"/tools/debs/patchelf_*.deb "$PREFIX/tools"
fi
# The interpreter loads the prefix's glibc and libraries (DT_RPATH also covers the
# extension modules it dlopens).  Patched after every dpkg -x, which restores the binary.
"$PREFIX/tools/usr/bin/patchelf" \
    --set-interpreter "$ROOT/usr/lib/$ARCH/ld-linux-x86-64.so.2" \
    --force-rpath --set-rpath "$ROOT/usr/lib/$ARCH:$ROOT/lib/$ARCH" \
    "$ROOT/usr/bin/python3.14"
"$ROOT/usr/bin/python3.14" -c 'import ssl, sqlite3, ctypes, decimal, lzma, bz2'

# Debian's ensurepip looks for the system's (older) pip wheel, so the venv is made without
# pip and pip is installed from unstable's wheel, run from the wheel itself.
rm -rf "$VENV"
"$ROOT/usr/bin/python3.14" -m venv --without-pip "$VENV"
PIP_WHEEL="$(ls "$ROOT"/usr/share/python-wheels/pip-*.whl | head -n 1)"
"$VENV/bin/python" "$PIP_WHEEL/pip" install -q --no-index "$PIP_WHEEL"
"$VENV/bin/python" -m pip install -q "bergtalzug==0.2.0" pytest pytest-timeout
"$VENV/bin/python" -c 'import bergtalzug, concurrent.futures; concurrent.futures.InterpreterPoolExecutor'
echo "$VENV/bin/python"
