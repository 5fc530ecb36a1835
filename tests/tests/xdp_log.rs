//! The in-kernel log follows the level set at load: debug shows new flows,
//! the default (off) logs nothing per packet.

use std::sync::Mutex;

use headroom::LoadOptions;
use headroom_tests::{fixture_env::*, packets::*, require_root};
use lb_common::{MODE_NAT, PROTO_TCP};

static RECORDS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        if let Ok(mut v) = RECORDS.lock() {
            v.push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

/// Runs three SYNs through a balancer loaded at `level`; returns what it logged.
fn logged_at(level: u8) -> Vec<String> {
    let opts = LoadOptions {
        conntrack_size: 1024,
        max_services: 2,
        max_backends: 4,
        max_table_size: 7,
        log_level: level,
        ..LoadOptions::default()
    };
    let FixtureEnv {
        ns, mut lb, fx0, ..
    } = FixtureEnv::new(&opts).expect("fixture env");
    let _inside = ns.enter_thread().expect("enter namespace");
    lb.set_backend(0, backend(backend4(0).into(), BACKEND_PORT))
        .expect("backend");
    lb.publish(
        service_key(VIP4.into(), 80, PROTO_TCP),
        1,
        MODE_NAT,
        &[0; 7],
    )
    .expect("publish");
    RECORDS.lock().expect("lock").clear();
    for sport in 50000..50003 {
        let r = lb
            .run(&Desc::tcp(VIP4.into(), sport, 80, SYN).frame(), fx0)
            .expect("run");
        assert_eq!(r.action, 4, "SYN redirected");
    }
    lb.flush_logs();
    RECORDS.lock().expect("lock").clone()
}

#[test]
fn root_log_level_is_set_at_load() {
    if !require_root("root_log_level_is_set_at_load") {
        return;
    }
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Trace);

    let debug = logged_at(4);
    let new_flows = debug
        .iter()
        .filter(|r| r.contains("new flow: service 1 -> backend 0"))
        .count();
    assert_eq!(new_flows, 3, "one debug record per new flow, got {debug:?}");

    let off = logged_at(0);
    assert!(off.is_empty(), "log level 0 logs nothing, got {off:?}");
    let warn = logged_at(2);
    assert!(
        warn.is_empty(),
        "per-packet records are debug, hidden at warn: {warn:?}"
    );
}
