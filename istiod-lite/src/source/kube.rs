//! A live Kubernetes API server as a source: list, then watch, each kind.
