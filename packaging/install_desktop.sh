#!/usr/bin/env bash
# Put the built app (dist/slimscope/) in the desktop's menu: a launcher, icons and AppStream data.
#
#   packaging/install_desktop.sh               # for this user, under ~/.local
#   PREFIX=/usr/local packaging/install_desktop.sh   # for everyone (as root)
#   packaging/install_desktop.sh --uninstall
#
# The app stays where it was built; PREFIX/bin/slimscope links to it, so `slimscope` works in a
# terminal too. The .desktop file's Exec and TryExec become that link's absolute path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PREFIX=${PREFIX:-$HOME/.local}
APP="$ROOT/dist/slimscope/slimscope"
SHARE="$PREFIX/share"
SIZES="16 32 48 64 128 256 512"

files=("$PREFIX/bin/slimscope" "$SHARE/applications/slimscope.desktop"
       "$SHARE/metainfo/io.github.slimscope.Slimscope.metainfo.xml"
       "$SHARE/icons/hicolor/scalable/apps/slimscope.svg")
for size in $SIZES; do files+=("$SHARE/icons/hicolor/${size}x${size}/apps/slimscope.png"); done

if [ "${1:-}" = "--uninstall" ]; then
  rm -f "${files[@]}"
  echo "removed Slimscope's launcher, icons and metadata from $PREFIX"
else
  [ -x "$APP" ] || { echo "no $APP: run packaging/build.sh first" >&2; exit 2; }
  install -d "$PREFIX/bin" "$SHARE/applications" "$SHARE/metainfo" "$SHARE/icons/hicolor/scalable/apps"
  ln -sfn "$APP" "$PREFIX/bin/slimscope"
  sed -e "s|^Exec=slimscope|Exec=$PREFIX/bin/slimscope|" -e "s|^TryExec=slimscope|TryExec=$PREFIX/bin/slimscope|" \
    resources/slimscope.desktop > "$SHARE/applications/slimscope.desktop"
  install -m 644 resources/io.github.slimscope.Slimscope.metainfo.xml "$SHARE/metainfo/"
  install -m 644 resources/icons/slimscope.svg "$SHARE/icons/hicolor/scalable/apps/slimscope.svg"
  for size in $SIZES; do
    install -D -m 644 "resources/icons/slimscope-$size.png" "$SHARE/icons/hicolor/${size}x${size}/apps/slimscope.png"
  done
  echo "installed: $PREFIX/bin/slimscope -> $APP, and Slimscope in the applications menu"
fi
command -v update-desktop-database >/dev/null && update-desktop-database -q "$SHARE/applications" || true
command -v gtk-update-icon-cache >/dev/null && gtk-update-icon-cache -q -t "$SHARE/icons/hicolor" || true
