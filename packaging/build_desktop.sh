#!/usr/bin/env bash
# Build the desktop console as one folder and a tarball:
#   dist/gpusoc-console/                         (run dist/gpusoc-console/gpusoc-console)
#   dist/gpusoc-console-<version>-linux-<arch>.tar.gz   (folder + .desktop + icons + install script)
# in a clean venv with gpusoc[console] and PyInstaller, then smoke-tests the frozen binary
# offscreen: --version, --help and, with SMOKE_DEMO=1 (default), a short `--demo` start.
# Target machines need libgl1 libegl1 and fonts (PyInstaller does not bundle libGL/libEGL) and
# glibc >= the build host's (PySide6 itself needs >= 2.34). docs/packaging.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
BUILD=build/desktop
VENV=$BUILD/venv
VERSION=${VERSION:-$(sed -n 's/^__version__ = "\(.*\)"/\1/p' console/__init__.py)}
ARCH=$(uname -m)
OUT=dist/gpusoc-console
TARBALL=dist/gpusoc-console-$VERSION-linux-$ARCH.tar.gz

echo "== venv ($($PY --version)) in $VENV"
if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV"; fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q ".[console]" "pyinstaller>=6.10"

echo "== PyInstaller"
rm -rf "$OUT" "$BUILD/work"
t0=$(date +%s)
"$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath dist --workpath "$BUILD/work" packaging/gpusoc-console.spec
echo "pyinstaller took $(( $(date +%s) - t0 )) s"
if command -v strip >/dev/null; then  # pyenv-built interpreters carry debug symbols
    find "$OUT/_internal" -maxdepth 1 -name 'libpython3*.so*' -type f -exec strip --strip-debug {} +
    find "$OUT/_internal/python3.11" -name '*.so' -type f -exec strip --strip-debug {} + 2>/dev/null || true
fi
du -sh "$OUT"

echo "== smoke tests (offscreen)"
export QT_QPA_PLATFORM=offscreen
"$OUT/gpusoc-console" --version
"$OUT/gpusoc-console" --help >/dev/null && echo "--help ok"
# Headless path through the frozen binary: the agent's fleet-sim (spawned workers), the
# collector (gRPC -> pyarrow -> DuckDB) and a query. Catches modules PyInstaller missed.
smoke=$(mktemp -d)
"$OUT/gpusoc-console" -m agent.cli fleet-sim --hosts 2 --gpus 2 --base-port 17600 --insecure \
    --inventory "$smoke/fleet.txt" >"$BUILD/fleet-smoke.log" 2>&1 &
fleet=$!
for _ in $(seq 100); do [ -s "$smoke/fleet.txt" ] && break; sleep 0.2; done
set +e
timeout -s INT 8 "$OUT/gpusoc-console" collect --agents "$smoke/fleet.txt" --db "$smoke/s.duckdb" --insecure \
    --status-every 2 >"$BUILD/collect-smoke.log" 2>&1
set -e
kill "$fleet" 2>/dev/null; wait "$fleet" 2>/dev/null || true
"$OUT/gpusoc-console" query --db "$smoke/s.duckdb" "SELECT count(*) AS gpu_samples, count(DISTINCT host) AS hosts FROM gpu_samples"
rm -rf "$smoke"

if [ "${SMOKE_DEMO:-1}" = 1 ] && "$OUT/gpusoc-console" --help | grep -q -- "--demo"; then
    # Own session and process group, so the demo fleet it starts is stopped with it whatever happens.
    demo_dir=$(mktemp -d)
    log=$BUILD/demo-smoke.log
    HOME=$demo_dir setsid "$OUT/gpusoc-console" --demo --demo-hosts 4 --db "$demo_dir/demo.duckdb" >"$log" 2>&1 &
    demo=$!
    alive=1
    for _ in $(seq 30); do sleep 1; kill -0 "$demo" 2>/dev/null || { alive=0; break; }; done
    kill -INT -- "-$demo" 2>/dev/null; sleep 5; kill -KILL -- "-$demo" 2>/dev/null; wait "$demo" 2>/dev/null || true
    if [ "$alive" = 1 ]; then
        echo "--demo started offscreen and ran 30 s; log: $log; what it stored:"
        "$OUT/gpusoc-console" query --db "$demo_dir/demo.duckdb" \
            "SELECT count(*) AS gpu_samples, count(DISTINCT host) AS hosts FROM gpu_samples" || true
    else
        echo "--demo exited early:" >&2; tail -20 "$log" >&2; exit 1
    fi
    rm -rf "$demo_dir"
fi

echo "== tarball"
stage=$BUILD/stage/gpusoc-console-$VERSION
rm -rf "$BUILD/stage" && mkdir -p "$stage"
cp -a "$OUT" "$stage/gpusoc-console"
cp packaging/gpusoc-console.desktop packaging/install_desktop.sh "$stage/"
cp packaging/icons/gpusoc-console.svg packaging/icons/gpusoc-console.png "$stage/"
tar -C "$BUILD/stage" -czf "$TARBALL" "gpusoc-console-$VERSION"
ls -l "$TARBALL"
