"""The run layer under every front end: a request (request.py) resolved once (resolve.py) and executed
(execute.py). Importing it imports no torch."""
