#!/usr/bin/env bash
# Build the one-folder app dist/slimscope/ from this checkout, then print build time and size.
#
#   packaging/build.sh            # uses .venv (creates it if missing)
#   VENV=/tmp/buildenv packaging/build.sh --clean
#
# The venv gets this project with its `package` extra (PyInstaller), pinned by
# packaging/constraints.txt, exactly as the README installs it. --clean empties PyInstaller's
# cache first (slower; use it after upgrading a dependency). Check the result with
# packaging/smoke_test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
clean=""
for arg in "$@"; do
  case "$arg" in
    --clean) clean="--clean" ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing slimscope[package] into $VENV (constraints: packaging/constraints.txt)"
"$VENV/bin/python" -m pip install -q -e ".[package]" -c packaging/constraints.txt

echo "== checking the icons match resources/icons/slimscope.svg"
QT_QPA_PLATFORM=offscreen "$VENV/bin/python" packaging/render_icons.py --check

echo "== pyinstaller packaging/slimscope.spec"
pyi_start=$(date +%s)
"$VENV/bin/python" -m PyInstaller --noconfirm $clean --log-level WARN \
  --distpath "$ROOT/dist" --workpath "$ROOT/build/pyinstaller" packaging/slimscope.spec
end=$(date +%s)

app="$ROOT/dist/slimscope"
size_h=$(du -sh "$app" | cut -f1)
size_b=$(du -sb "$app" | cut -f1)
files=$(find "$app" -type f | wc -l)
echo "== built $app/slimscope"
echo "build time: $((end - start)) s in all, $((end - pyi_start)) s of it PyInstaller"
echo "folder size: $size_h ($size_b bytes, $files files)"
