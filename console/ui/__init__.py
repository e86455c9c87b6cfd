"""Qt widgets over the Qt-free models in console.models (napari-style qt_<thing>.py -> Qt<Thing>)."""
