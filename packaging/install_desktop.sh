#!/bin/sh
# Install the unpacked gpusoc-console bundle for this user (default) or system-wide (--system):
# the program folder, a gpusoc-console command, the menu entry and the icon.
#   ./install_desktop.sh            -> ~/.local/opt, ~/.local/bin, ~/.local/share
#   sudo ./install_desktop.sh --system   -> /opt, /usr/local/bin, /usr/local/share
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = "--system" ]; then
    opt=/opt bin=/usr/local/bin share=/usr/local/share
else
    opt=$HOME/.local/opt bin=$HOME/.local/bin share=${XDG_DATA_HOME:-$HOME/.local/share}
fi
mkdir -p "$opt" "$bin" "$share/applications" "$share/icons/hicolor/256x256/apps" "$share/icons/hicolor/scalable/apps"
rm -rf "$opt/gpusoc-console"
cp -a "$here/gpusoc-console" "$opt/gpusoc-console"
ln -sf "$opt/gpusoc-console/gpusoc-console" "$bin/gpusoc-console"
# The menu entry runs the absolute path, so it works even where $bin is not on the desktop's PATH.
sed -e "s|^Exec=gpusoc-console|Exec=$opt/gpusoc-console/gpusoc-console|" \
    -e "s|^TryExec=gpusoc-console|TryExec=$opt/gpusoc-console/gpusoc-console|" \
    "$here/gpusoc-console.desktop" >"$share/applications/gpusoc-console.desktop"
cp "$here/gpusoc-console.png" "$share/icons/hicolor/256x256/apps/gpusoc-console.png"
cp "$here/gpusoc-console.svg" "$share/icons/hicolor/scalable/apps/gpusoc-console.svg"
if command -v update-desktop-database >/dev/null; then update-desktop-database "$share/applications" || true; fi
if command -v gtk-update-icon-cache >/dev/null; then gtk-update-icon-cache -q "$share/icons/hicolor" 2>/dev/null || true; fi
echo "installed: $bin/gpusoc-console, menu entry $share/applications/gpusoc-console.desktop"
echo "needs on this machine: libgl1 libegl1 fonts-dejavu-core (apt) or mesa-libGL mesa-libEGL (dnf)"
