//! Headroom userspace: loads the XDP program, fills its maps, builds tables.

pub mod maglev;
