//! `cargo xtask bench e2e`: Headroom against ECMP, nftables DNAT, HAProxy
//! and a direct route on one topology (new connections/s, keep-alive
//! requests/s and latency, bulk throughput, CPU per connection), the cost
//! of XDP on veths (TSO, GRO), and the feedback latency from a scoreboard
//! write to the kernel's table. The binary is `src/bin/bench-e2e.rs`.
pub mod feedback;
pub mod measure;
pub mod net;
pub mod servers;
pub mod stats;
pub mod variants;
