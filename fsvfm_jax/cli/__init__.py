"""Command-line tools. Each module has a ``main()`` installed as the console script
``fsvfm-<name>`` (setup.cfg); in a checkout ``python tools/<name>.py`` runs the same."""
