//! `headroom lb check-config FILE` as a user runs it: the example passes,
//! and every kind of invalid config is rejected with a non-zero exit and a
//! message naming the field's path and the reason. No root, no kernel, no
//! Redis: check-config touches none of them.

use std::{io::Write, path::Path, process::Output};

const HEADROOM: &str = env!("CARGO_BIN_EXE_headroom");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/headroom.example.toml");

/// A valid config with two groups, the base every invalid case edits.
const BASE: &str = r#"name = "t"

[scoreboard]
redis_url = "redis://127.0.0.1:6379"
refresh_interval = "100ms"
ttl = "3s"

[weights]
floor = 5
ewma_alpha = 0.5
dead_band = 0.05

[datapath]
max_services = 8

[[group]]
name = "user"

[[group.interface]]
name = "veth-user"
mode = "native"

[[group.service]]
name = "web"
vip = "192.0.2.10"
port = 80
mode = "nat"
table_size = 65537

[[group.service.backend]]
address = "10.0.0.1:8080"
weight = 3

[[group]]
name = "internal"

[[group.interface]]
name = "veth-int"

[[group.service]]
name = "orders"
vip = "2001:db8::20"
port = 443
protocol = "tcp"
mode = "dsr"
table_size = 251
"#;

fn check_config(path: &Path) -> Output {
    std::process::Command::new(HEADROOM)
        .args(["lb", "check-config"])
        .arg(path)
        .output()
        .expect("run headroom")
}

fn check_text(text: &str) -> Output {
    let mut f = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    f.write_all(text.as_bytes()).expect("write config");
    check_config(f.path())
}

/// `BASE` with `from` replaced by `to`; `from` must be there, so a case can
/// never silently test the valid base.
fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} is not in BASE");
    BASE.replacen(from, to, 1)
}

#[test]
fn example_and_base_configs_pass() {
    for (name, out) in [
        ("example", check_config(Path::new(EXAMPLE))),
        ("base", check_text(BASE)),
    ] {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{name}: {:?}\n{stdout}\n{stderr}",
            out.status
        );
        assert!(
            stdout.contains("ok: 2 group(s)"),
            "{name}: summary missing:\n{stdout}"
        );
    }
}

/// One invalid config: its text, and what the message must contain.
struct Case {
    what: &'static str,
    text: String,
    path: &'static str,
    reason: &'static str,
}

fn case(what: &'static str, text: String, path: &'static str, reason: &'static str) -> Case {
    Case {
        what,
        text,
        path,
        reason,
    }
}

fn invalid_cases() -> Vec<Case> {
    let web =
        "name = \"web\"\nvip = \"192.0.2.10\"\nport = 80\nmode = \"nat\"\ntable_size = 65537\n";
    vec![
        case(
            "table size not prime",
            edit("table_size = 65537", "table_size = 65536"),
            "group[0].service[0].table_size",
            "65536 is not prime",
        ),
        case(
            "table size out of range",
            edit("table_size = 251", "table_size = 1"),
            "group[1].service[0].table_size",
            "1 is out of range: must be a prime in [2, 16777216]",
        ),
        case(
            "table size above the loader's max",
            edit("table_size = 65537", "table_size = 131071"),
            "group[0].service[0].table_size",
            "131071 exceeds datapath.max_table_size (65537)",
        ),
        case(
            "backend family differs from the VIP's",
            edit(
                "address = \"10.0.0.1:8080\"",
                "address = \"[2001:db8::1]:8080\"",
            ),
            "group[0].service[0].backend[0].address",
            "IPv6 backend 2001:db8::1 for an IPv4 VIP (192.0.2.10): families must match",
        ),
        case(
            "nat backend without a port",
            edit("address = \"10.0.0.1:8080\"", "address = \"10.0.0.1\""),
            "group[0].service[0].backend[0].address",
            "nat backends need a port",
        ),
        case(
            "dsr backend with another port",
            format!("{BASE}\n[[group.service.backend]]\naddress = \"[2001:db8::1]:8443\"\n"),
            "group[1].service[0].backend[0].address",
            "dsr backends receive the VIP's port 443: port 8443 cannot be used",
        ),
        case(
            "static weight 0",
            edit("weight = 3", "weight = 0"),
            "group[0].service[0].backend[0].weight",
            "0 is not allowed: static weights must be > 0",
        ),
        case(
            "same VIP, port and protocol in two groups",
            format!(
                "{BASE}\n[[group.service]]\n{}",
                web.replace("\"web\"", "\"web2\"")
            ),
            "group[1].service[1].vip",
            "192.0.2.10:80/tcp is already a VIP (group[0].service[0])",
        ),
        case(
            "duplicate service name across groups",
            format!(
                "{BASE}\n[[group.service]]\n{}",
                web.replace("192.0.2.10", "192.0.2.11")
            ),
            "group[1].service[1].name",
            "duplicate service name \"web\" (also group[0].service[0].name)",
        ),
        case(
            "interface name too long",
            edit("name = \"veth-user\"", "name = \"a-very-long-ifname\""),
            "group[0].interface[0].name",
            "\"a-very-long-ifname\" is 18 bytes long: interface names have at most 15",
        ),
        case(
            "interface name with a slash",
            edit("name = \"veth-user\"", "name = \"eth0/1\""),
            "group[0].interface[0].name",
            "\"eth0/1\" is not a valid interface name: it contains '/'",
        ),
        case(
            "interface listed in two groups",
            edit("name = \"veth-int\"", "name = \"veth-user\""),
            "group[1].interface[0].name",
            "interface \"veth-user\" is listed twice (also group[0].interface[0].name)",
        ),
        case(
            "refresh interval not below the TTL",
            edit("ttl = \"3s\"", "ttl = \"100ms\""),
            "scoreboard.ttl",
            "100ms must be longer than scoreboard.refresh_interval (100ms)",
        ),
        case(
            "refresh interval of zero",
            edit("refresh_interval = \"100ms\"", "refresh_interval = \"0s\""),
            "scoreboard.refresh_interval",
            "0s is too short",
        ),
        case(
            "EWMA alpha of 0",
            edit("ewma_alpha = 0.5", "ewma_alpha = 0"),
            "weights.ewma_alpha",
            "0 is not in (0, 1]",
        ),
        case(
            "floor of 0",
            edit("floor = 5", "floor = 0"),
            "weights.floor",
            "0 is not in (0, 100]",
        ),
        case(
            "negative dead-band",
            edit("dead_band = 0.05", "dead_band = -0.1"),
            "weights.dead_band",
            "-0.1 is not in [0, 1)",
        ),
        case(
            "Redis URL with another scheme",
            edit("redis://127.0.0.1:6379", "http://127.0.0.1:6379"),
            "scoreboard.redis_url",
            "unsupported scheme `http://`",
        ),
        case(
            "more services than max_services",
            edit("max_services = 8", "max_services = 1"),
            "datapath.max_services",
            "2 services are configured over all groups, more than max_services (1)",
        ),
        case(
            "conntrack too small",
            edit("max_services = 8", "max_services = 8\nconntrack_size = 10"),
            "datapath.conntrack_size",
            "10 is too small",
        ),
        case(
            "VIP port 0",
            edit("port = 80", "port = 0"),
            "group[0].service[0].port",
            "0 is not a valid port",
        ),
        case(
            "multicast VIP",
            edit("vip = \"192.0.2.10\"", "vip = \"224.0.0.1\""),
            "group[0].service[0].vip",
            "224.0.0.1 is a multicast address",
        ),
        case(
            "service name the scoreboard cannot hold",
            edit("name = \"web\"", "name = \"web api\""),
            "group[0].service[0].name",
            "\"web api\" is not a valid service name",
        ),
        case(
            "scoreboard name on a static service",
            edit(
                "table_size = 65537",
                "table_size = 65537\nscoreboard_name = \"w\"",
            ),
            "group[0].service[0].scoreboard_name",
            "has no effect",
        ),
        case(
            "no groups",
            BASE.split("[[group]]").next().unwrap().to_string(),
            "group",
            "no [[group]]: at least one group",
        ),
        case(
            "unknown field (typo)",
            edit("table_size = 251", "tabel_size = 251"),
            "group[1].service[0].tabel_size",
            "unknown field `tabel_size`",
        ),
        case(
            "missing required field",
            edit("mode = \"dsr\"\n", ""),
            "group[1].service[0].mode",
            "missing field `mode`",
        ),
        case(
            "unknown attach mode",
            edit("mode = \"native\"", "mode = \"turbo\""),
            "group[0].interface[0].mode",
            "unknown variant `turbo`, expected one of `native`, `generic`, `auto`",
        ),
        case(
            "unknown protocol",
            edit("protocol = \"tcp\"", "protocol = \"sctp\""),
            "group[1].service[0].protocol",
            "unknown variant `sctp`, expected `tcp` or `udp`",
        ),
        case(
            "duration without a unit",
            edit("ttl = \"3s\"", "ttl = \"3\""),
            "scoreboard.ttl",
            "invalid duration \"3\": missing unit",
        ),
        case(
            "VIP that is not an address",
            edit("vip = \"192.0.2.10\"", "vip = \"192.0.2\""),
            "group[0].service[0].vip",
            "invalid IP address syntax",
        ),
        case(
            "port out of u16",
            edit("port = 443", "port = 65536"),
            "group[1].service[0].port",
            "invalid value: integer `65536`",
        ),
    ]
}

#[test]
fn invalid_configs_are_rejected_naming_the_field() {
    let cases = invalid_cases();
    assert!(cases.len() >= 12);
    let mut failures = Vec::new();
    for c in &cases {
        let out = check_text(&c.text);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let expected = format!("{}: {}", c.path, c.reason);
        if out.status.success() || out.status.code() != Some(1) {
            failures.push(format!(
                "{}: exit {:?}, stderr {stderr}",
                c.what, out.status
            ));
        } else if !stderr.contains(&expected) {
            failures.push(format!("{}: {expected:?} not in stderr:\n{stderr}", c.what));
        } else if !out.stdout.is_empty() {
            failures.push(format!("{}: printed a summary on failure", c.what));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn syntax_errors_give_line_and_column() {
    let out = check_text(&edit("ttl = \"3s\"", "ttl = \"3s"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("TOML syntax error at line 6, column 10"),
        "{stderr}"
    );
}

#[test]
fn type_errors_give_line_and_column() {
    let out = check_text(&edit("weight = 3", "weight = \"heavy\""));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("group[0].service[0].backend[0].weight: invalid type: string \"heavy\""),
        "{stderr}"
    );
    assert!(stderr.contains("(line 32, column 10)"), "{stderr}");
}

#[test]
fn all_problems_are_listed_at_once() {
    let text = edit("table_size = 65537", "table_size = 65536")
        .replacen("floor = 5", "floor = 200", 1)
        .replacen("name = \"veth-int\"", "name = \"veth int\"", 1);
    let out = check_text(&text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 invalid fields:"), "{stderr}");
    for path in [
        "weights.floor:",
        "group[0].service[0].table_size:",
        "group[1].interface[0].name:",
    ] {
        assert!(stderr.contains(path), "{path} not in {stderr}");
    }
}

#[test]
fn missing_file_is_named() {
    let out = check_config(Path::new("/nonexistent/headroom.toml"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reading /nonexistent/headroom.toml"),
        "{stderr}"
    );
}

#[test]
fn check_config_does_not_print_the_redis_password() {
    let out = check_text(&edit(
        "redis://127.0.0.1:6379",
        "redis://:hunter2@127.0.0.1:6379",
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("redis://:***@127.0.0.1:6379"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
}
