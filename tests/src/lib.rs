//! Test harness: network namespaces, veths, redis-server.
