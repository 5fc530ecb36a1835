//! The embedded object passes the verifier.
use headroom::{Balancer, LoadOptions};

#[test]
fn root_program_loads() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root");
        return;
    }
    let opts = LoadOptions {
        conntrack_size: 1024,
        max_services: 4,
        max_table_size: 251,
        ..Default::default()
    };
    match Balancer::load(&opts) {
        Ok(_) => {}
        Err(e) => panic!("{e}\n{e:?}"),
    }
}
