"""Qt-free view models: what the console shows, testable without a display."""
