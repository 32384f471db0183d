"""I/O edges: trio listeners, the per-connection handler, backend connections and the relay."""
