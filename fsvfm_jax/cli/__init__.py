"""Command-line tools (``fsvfm-<name>`` entry points; ``tools/<name>.py`` are thin shims)."""
