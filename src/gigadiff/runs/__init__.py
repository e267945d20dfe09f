"""The run layer under every front end: a request (gigadiff.options) checked and resolved once (checks.py,
resolve.py) and executed (execute.py) into outputs with their metadata (outputs.py, metadata.py). Importing it
imports no torch."""
