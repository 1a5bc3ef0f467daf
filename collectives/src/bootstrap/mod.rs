//! Bootstrap: how ranks find each other (filled in by the bootstrap work).
