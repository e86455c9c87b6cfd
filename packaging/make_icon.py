"""Render packaging/icons/gpusoc-console.svg to PNGs with Qt's SVG renderer (offscreen).

The PNGs are committed so packaging needs no renderer; run this after editing the SVG:
    QT_QPA_PLATFORM=offscreen python packaging/make_icon.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "icons"
SIZES = (256, 48)


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication, QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    renderer = QSvgRenderer(str(HERE / "gpusoc-console.svg"))
    if not renderer.isValid():
        print("gpusoc-console.svg did not parse", file=sys.stderr)
        return 1
    for size in SIZES:
        image = QImage(size, size, QImage.Format.Format_ARGB32)
        image.fill(Qt.GlobalColor.transparent)
        painter = QPainter(image)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        renderer.render(painter)
        painter.end()
        name = "gpusoc-console.png" if size == 256 else f"gpusoc-console-{size}.png"
        out = HERE / name
        if not image.save(str(out)):  # format from the .png suffix
            print(f"could not write {out}", file=sys.stderr)
            return 1
        print(f"{out} {size}x{size} {out.stat().st_size} bytes")
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
