"""The `fewstep` commands, one module per command group, each with `register(app)`; `common.py` holds what they
share. A command parses its flags, calls one function of `fewstep.api` and prints the result; `fewstep/cli.py`
assembles the app from these modules."""
