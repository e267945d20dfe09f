"""Where tiles run: the local device in batches (local.py), or shared out over processes (distributed.py).

Nothing is imported here, so that `executors.launch` (who am I in a torchrun group?) costs no torch import."""
