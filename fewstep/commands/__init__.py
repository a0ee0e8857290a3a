"""CLI command groups that live outside `fewstep/cli.py`; each module has `register(app)`."""
