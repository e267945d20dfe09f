"""Where tiles run: the local device in batches, or shared out over processes."""

from gigadiff.executors.local import LocalExecutor, TileExecutor

__all__ = ["LocalExecutor", "TileExecutor"]
