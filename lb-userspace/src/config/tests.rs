//! Parsing details. The invalid-config catalogue runs through the real
//! binary in `lb-userspace/tests/config.rs`.

use std::{net::IpAddr, str::FromStr, time::Duration};

use super::*;

const EXAMPLE: &str = include_str!("../../../docs/headroom.example.toml");

/// The smallest valid file: everything else defaults.
const MINIMAL: &str = r#"
[[group]]
name = "g"
[[group.interface]]
name = "eth0"
[[group.service]]
name = "api"
vip = "192.0.2.1"
port = 80
mode = "nat"
"#;

fn err(text: &str) -> ConfigError {
    Config::from_str(text).expect_err("config should be rejected")
}

/// The single field error of `text`.
fn field_err(text: &str) -> FieldError {
    match err(text) {
        ConfigError::Invalid(v) if v.len() == 1 => v.into_iter().next().unwrap(),
        other => panic!("expected one field error, got {other:?}"),
    }
}

#[test]
fn minimal_config_gets_the_documented_defaults() {
    let c = Config::from_str(MINIMAL).unwrap();
    assert_eq!(c.name, "default");
    assert_eq!(c.pin_dir(), Path::new("/sys/fs/bpf/headroom/default"));
    assert_eq!(c.log_level, LogLevel::Info);
    assert_eq!(c.metrics_listen, "127.0.0.1:9470".parse().unwrap());
    assert_eq!(c.scoreboard.redis_url.as_str(), "redis://127.0.0.1:6379");
    assert_eq!(c.scoreboard.refresh_interval, Duration::from_millis(100));
    assert_eq!(c.scoreboard.ttl, Duration::from_secs(5));
    assert_eq!(c.weights.floor, 5.0);
    assert_eq!(c.weights.ewma_alpha, 0.5);
    assert_eq!(c.weights.dead_band, 0.05);
    assert_eq!(c.weights.ramp_up, Duration::from_secs(10));
    assert_eq!(c.weights.ramp_from, 0.1);
    // The defaults are the weight policy's own.
    assert_eq!(c.policy(), crate::weights::Policy::default());
    let d = &c.datapath;
    assert_eq!(d.conntrack_size, lb_common::DEFAULT_CONNTRACK_SIZE);
    assert_eq!(d.max_services, lb_common::DEFAULT_MAX_SERVICES);
    assert_eq!(d.max_backends, lb_common::DEFAULT_MAX_BACKENDS);
    assert_eq!(d.max_table_size, lb_common::DEFAULT_TABLE_SIZE);
    assert_eq!(d.udp_idle_timeout, Duration::from_secs(30));
    assert_eq!(d.log_level, LogLevel::Off);
    let g = &c.groups[0];
    assert_eq!(g.interfaces[0].mode, AttachMode::Auto);
    let s = &g.services[0];
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.table_size, lb_common::DEFAULT_TABLE_SIZE);
    assert_eq!(s.scoreboard_name(), "api");
    assert!(!s.is_static());
}

#[test]
fn load_options_follow_the_datapath_section() {
    let c = Config::from_str(&format!(
        "[datapath]\nconntrack_size = 4096\nudp_idle_timeout = \"5s\"\nmax_services = 8\n\
         max_backends = 100\nmax_table_size = 131071\nlog_level = \"debug\"\n{MINIMAL}"
    ))
    .unwrap();
    let o = c.load_options();
    assert_eq!(o.conntrack_size, 4096);
    assert_eq!(o.udp_idle_timeout, Duration::from_secs(5));
    assert_eq!(o.max_services, 8);
    assert_eq!(o.max_backends, 100);
    assert_eq!(o.max_table_size, 131071);
    assert_eq!(o.log_level, 4);
}

#[test]
fn example_file_is_valid_and_has_two_groups() {
    let c = Config::from_str(EXAMPLE).unwrap();
    assert_eq!(c.name, "edge");
    let groups: Vec<&str> = c.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(groups, ["user", "internal"]);
    let (_, web6) = c.services().find(|(_, s)| s.name == "web6").unwrap();
    assert_eq!(web6.scoreboard_name(), "web");
    assert!(web6.vip.is_ipv6());
    let (g, dns) = c.services().find(|(_, s)| s.name == "dns").unwrap();
    assert_eq!(g.name, "internal");
    assert!(dns.is_static());
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(dns.backends[0].weight, 2);
    assert_eq!(dns.backends[1].weight, 1);
    assert_eq!(
        dns.backends[0].address,
        BackendAddr {
            ip: "10.0.1.11".parse().unwrap(),
            port: Some(5353)
        }
    );
    let ifaces: Vec<&str> = c.interfaces().map(|(_, i)| i.name.as_str()).collect();
    assert_eq!(ifaces, ["eth0", "eth1"]);
    let summary = c.summary();
    assert!(summary.contains("group \"internal\""), "{summary}");
    assert!(summary.contains("10.0.1.11:5353×2"), "{summary}");
    assert!(
        summary.ends_with("ok: 2 group(s), 4 service(s)\n"),
        "{summary}"
    );
}

#[test]
fn service_key_is_in_map_encoding() {
    let c = Config::from_str(EXAMPLE).unwrap();
    let (_, dns) = c.services().find(|(_, s)| s.name == "dns").unwrap();
    let k = dns.key();
    assert_eq!(k.addr, [u32::from_ne_bytes([10, 96, 0, 53]), 0, 0, 0]);
    assert_eq!(k.port, 53u16.to_be());
    assert_eq!(k.proto, lb_common::PROTO_UDP);
    assert_eq!(k.family, lb_common::FAMILY_V4);
    assert_eq!(dns.mode.code(), lb_common::MODE_NAT);
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    assert_eq!(
        addr_words(v6)[0],
        u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8])
    );
    assert_eq!(family(v6), lb_common::FAMILY_V6);
}

#[test]
fn backend_addresses_parse_with_and_without_port() {
    let p = |s: &str| s.parse::<BackendAddr>();
    assert_eq!(p("10.0.0.1:80").unwrap().port, Some(80));
    assert_eq!(p("10.0.0.1").unwrap().port, None);
    assert_eq!(p("[2001:db8::1]:80").unwrap().port, Some(80));
    assert_eq!(p("2001:db8::1").unwrap().port, None);
    assert_eq!(p("[2001:db8::1]").unwrap().port, None);
    assert_eq!(
        p("[2001:db8::1]:80").unwrap().to_string(),
        "[2001:db8::1]:80"
    );
    for bad in [
        "10.0.0.1:",
        "host:80",
        "10.0.0.1:70000",
        "",
        "2001:db8::1:80:",
    ] {
        assert!(p(bad).is_err(), "{bad}");
    }
}

#[test]
fn example_file_shows_every_default() {
    // The example documents the defaults: it must not drift from them.
    let ex = Config::from_str(EXAMPLE).unwrap();
    let def = Config::from_str(MINIMAL).unwrap();
    assert_eq!(ex.policy(), def.policy());
    assert_eq!(ex.scoreboard.redis_url, def.scoreboard.redis_url);
    assert_eq!(
        ex.scoreboard.refresh_interval,
        def.scoreboard.refresh_interval
    );
    assert_eq!(ex.metrics_listen, def.metrics_listen);
    assert_eq!(ex.log_level, def.log_level);
    assert_eq!(format!("{:?}", ex.datapath), format!("{:?}", def.datapath));
}

#[test]
fn weight_knobs_are_the_policys() {
    let c = Config::from_str(&format!(
        "[weights]\nfloor = 20\newma_alpha = 0.25\ndead_band = 0\nramp_up = \"0s\"\nramp_from = 1\n\
         [scoreboard]\nttl = \"2s\"\n{MINIMAL}"
    ))
    .unwrap();
    let p = c.policy();
    assert_eq!(
        (p.floor, p.alpha, p.dead_band, p.ramp_from),
        (20.0, 0.25, 0.0, 1.0)
    );
    assert_eq!((p.ttl, p.ramp_up), (Duration::from_secs(2), Duration::ZERO));
    for (knob, path) in [
        ("floor = 0", "weights.floor"),
        ("floor = 101", "weights.floor"),
        ("ewma_alpha = 1.5", "weights.ewma_alpha"),
        ("dead_band = 1", "weights.dead_band"),
        ("ramp_from = 0", "weights.ramp_from"),
        ("ramp_up = \"2d\"", "weights.ramp_up"),
    ] {
        let e = field_err(&format!("[weights]\n{knob}\n{MINIMAL}"));
        assert_eq!(e.path, path, "{knob}: {e}");
    }
    let e = field_err(&format!("[scoreboard]\nttl = \"0s\"\n{MINIMAL}"));
    assert_eq!(e.path, "scoreboard.ttl", "{e}");
}

#[test]
fn floats_accept_integers_and_reject_nan() {
    let c = Config::from_str(&format!(
        "[weights]\nfloor = 100\newma_alpha = 1\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.weights.floor, 100.0);
    assert_eq!(c.weights.ewma_alpha, 1.0);
    let e = field_err(&format!("[weights]\newma_alpha = nan\n{MINIMAL}"));
    assert_eq!(e.path, "weights.ewma_alpha");
    let e = field_err(&format!("[weights]\nfloor = nan\n{MINIMAL}"));
    assert_eq!(e.path, "weights.floor");
}

#[test]
fn syntax_errors_keep_line_and_column() {
    match err("name = \"x\"\n[scoreboard]\nttl = \"3s\n") {
        ConfigError::Syntax { line, column, .. } => assert_eq!((line, column), (3, 10)),
        other => panic!("{other:?}"),
    }
    let e = err("name = 'a'\nname = 'b'\n");
    assert!(matches!(e, ConfigError::Syntax { line: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("line 2, column 1"), "{e}");
}

#[test]
fn serde_errors_name_the_field_and_the_line() {
    // Missing field: serde reports it on the table; the path gets the field.
    let e = field_err(&MINIMAL.replace("vip = \"192.0.2.1\"\n", ""));
    assert_eq!(e.path, "group[0].service[0].vip");
    assert!(e.reason.contains("missing field `vip`"), "{e}");
    assert_eq!(e.location.map(|l| l.0), Some(6), "{e}");
    // Unknown field, with its line.
    let e = field_err(&MINIMAL.replace("port = 80", "port = 80\ntabel_size = 3"));
    assert_eq!(e.path, "group[0].service[0].tabel_size");
    assert!(e.reason.contains("unknown field `tabel_size`"), "{e}");
    assert_eq!(e.location, Some((10, 1)));
    // Type and range errors from serde.
    let e = field_err(&MINIMAL.replace("port = 80", "port = 70000"));
    assert_eq!(e.path, "group[0].service[0].port");
    let e = field_err(&MINIMAL.replace("\"nat\"", "\"snat\""));
    assert_eq!(e.path, "group[0].service[0].mode");
    assert!(e.reason.contains("expected `nat` or `dsr`"), "{e}");
    // Top level, and durations given as numbers or with a bad unit.
    let e = field_err(&format!("colour = 1\n{MINIMAL}"));
    assert_eq!(e.path, "colour");
    let e = field_err(&format!("[scoreboard]\nttl = 3\n{MINIMAL}"));
    assert_eq!(e.path, "scoreboard.ttl");
    assert!(e.reason.contains("duration string"), "{e}");
    let e = field_err(&format!("[weights]\nramp_up = \"2 fortnights\"\n{MINIMAL}"));
    assert_eq!(e.path, "weights.ramp_up");
    assert!(e.reason.contains("unknown unit"), "{e}");
    assert!(e.to_string().starts_with("weights.ramp_up: "), "{e}");
}

#[test]
fn every_validation_problem_is_reported_at_once() {
    let text = MINIMAL
        .replace("port = 80", "port = 80\ntable_size = 100")
        .replace("name = \"eth0\"", "name = \"eth0/1\"")
        + "[weights]\nfloor = 0\n";
    let e = err(&text);
    let paths: Vec<&str> = e.fields().iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "weights.floor",
            "group[0].interface[0].name",
            "group[0].service[0].table_size"
        ],
        "{e}"
    );
    assert!(e.to_string().starts_with("3 invalid fields:"), "{e}");
}

#[test]
fn dsr_backends_may_omit_the_port_or_repeat_the_vips() {
    let dsr = MINIMAL.replace("\"nat\"", "\"dsr\"");
    let c = Config::from_str(&format!(
        "{dsr}[[group.service.backend]]\naddress = \"192.0.2.10\"\n\
         [[group.service.backend]]\naddress = \"192.0.2.11:80\"\n"
    ))
    .unwrap();
    assert_eq!(c.groups[0].services[0].backends.len(), 2);
    // The same backend twice, once with the (implied) VIP port.
    let e = field_err(&format!(
        "{dsr}[[group.service.backend]]\naddress = \"192.0.2.10\"\n\
         [[group.service.backend]]\naddress = \"192.0.2.10:80\"\n"
    ));
    assert_eq!(e.path, "group[0].service[0].backend[1].address");
    assert!(e.reason.contains("duplicate backend"), "{e}");
}

#[test]
fn a_scoreboard_name_may_serve_two_vips() {
    let c = Config::from_str(&format!(
        "{MINIMAL}[[group.service]]\nname = \"api-udp\"\nvip = \"192.0.2.1\"\nport = 80\n\
         protocol = \"udp\"\nmode = \"nat\"\nscoreboard_name = \"api\"\n"
    ))
    .unwrap();
    let names: Vec<&str> = c.services().map(|(_, s)| s.scoreboard_name()).collect();
    assert_eq!(names, ["api", "api"]);
}

#[test]
fn redis_urls_are_checked_and_passwords_never_shown() {
    for ok in [
        "redis://127.0.0.1:6379",
        "redis://:secret@10.0.0.1:6380/2",
        "unix:///run/redis.sock",
        "redis+unix:///run/redis.sock?db=1",
    ] {
        Config::from_str(&format!("[scoreboard]\nredis_url = \"{ok}\"\n{MINIMAL}"))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for (bad, why) in [
        ("http://x", "unsupported scheme `http://`"),
        ("127.0.0.1:6379", "not a URL"),
        ("redis://", "not a usable Redis URL"),
        ("redis://:secret@h:99999", "not a usable Redis URL"),
    ] {
        let e = field_err(&format!("[scoreboard]\nredis_url = \"{bad}\"\n{MINIMAL}"));
        assert_eq!(e.path, "scoreboard.redis_url");
        assert!(e.reason.contains(why), "{bad}: {e}");
        assert!(!e.reason.contains("secret"), "{e}");
    }
    let u = |s: &str| RedisUrl(s.into()).to_string();
    assert_eq!(u("redis://:pw@h:1/0"), "redis://:***@h:1/0");
    assert_eq!(u("redis://user:pw@h"), "redis://user:***@h");
    assert_eq!(u("redis://pw@h"), "redis://***@h");
    assert_eq!(u("redis://h:6379"), "redis://h:6379");
    assert_eq!(u("unix:///s?db=1&pass=pw"), "unix:///s?db=1&pass=***");
    let c = Config::from_str(&format!(
        "[scoreboard]\nredis_url = \"redis://:hunter2@h\"\n{MINIMAL}"
    ))
    .unwrap();
    assert!(!format!("{c:?}").contains("hunter2"));
    assert!(!c.summary().contains("hunter2"));
    assert_eq!(c.scoreboard.redis_url.as_str(), "redis://:hunter2@h");
}

#[test]
fn limits_count_over_all_groups() {
    let second = MINIMAL
        .replace("name = \"g\"", "name = \"h\"")
        .replace("eth0", "eth1")
        .replace("\"api\"", "\"api2\"")
        .replace("192.0.2.1", "192.0.2.2");
    let two = format!("{MINIMAL}{second}");
    Config::from_str(&two).unwrap();
    let e = field_err(&format!("[datapath]\nmax_services = 1\n{two}"));
    assert_eq!(e.path, "datapath.max_services");
    assert!(e.reason.contains("2 services"), "{e}");
    // The same interface in two groups.
    let e = field_err(&format!("{MINIMAL}{}", second.replace("eth1", "eth0")));
    assert_eq!(e.path, "group[1].interface[0].name");
    assert!(e.reason.contains("group[0].interface[0].name"), "{e}");
}

#[test]
fn load_reports_the_path_of_an_unreadable_file() {
    let e = Config::load("/nonexistent/headroom.toml").unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains("/nonexistent/headroom.toml"), "{e}");
}

#[test]
fn tc_attach_mode_is_accepted_and_listed_in_errors() {
    let with_mode = |m: &str| {
        MINIMAL.replace(
            "name = \"eth0\"",
            &format!("name = \"eth0\"\nmode = \"{m}\""),
        )
    };
    let c = Config::from_str(&with_mode("tc")).unwrap();
    let mode = c.groups[0].interfaces[0].mode;
    assert_eq!(mode, AttachMode::Tc);
    assert!(mode.is_tc());
    assert!(!AttachMode::Native.is_tc() && !AttachMode::Auto.is_tc());
    assert!(
        c.summary().contains("interfaces eth0 (tc)"),
        "{}",
        c.summary()
    );
    // A near miss names the field and lists every mode, tc included.
    let e = field_err(&with_mode("tcx"));
    assert_eq!(e.path, "group[0].interface[0].mode");
    assert!(
        e.reason
            .contains("unknown variant `tcx`, expected one of `native`, `generic`, `auto`, `tc`"),
        "{e}"
    );
}

#[test]
fn max_services_beyond_16_bit_service_ids_is_refused() {
    // Flow entries keep the service id in 16 bits.
    let e = field_err(&format!(
        "[datapath]\nmax_services = 65537\nmax_table_size = 31\n{MINIMAL}table_size = 31\n"
    ));
    assert_eq!(e.path, "datapath.max_services");
    assert!(e.reason.contains("65536"), "{e}");
    Config::from_str(&format!(
        "[datapath]\nmax_services = 65536\nmax_table_size = 31\n{MINIMAL}table_size = 31\n"
    ))
    .unwrap();
}
