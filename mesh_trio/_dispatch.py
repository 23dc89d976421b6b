"""Old home of the dispatch seam (now `mesh_trio.transports`): re-exports for its old importers."""

from .transports import ActorNotFound, Dispatcher, DispatchError, DispatchUnavailable, MemoryQueues

__all__ = ["ActorNotFound", "DispatchError", "DispatchUnavailable", "Dispatcher", "MemoryQueues"]
