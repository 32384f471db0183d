"""Sans-io core: pure functions over h11 events and bytes; no sockets, no clock."""
