//! Built-in sources and sinks.
