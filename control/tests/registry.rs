//! The service registry in a real redis-server, through the library and
//! through the real `headroom services` / `headroom agent` binary.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use headroom_control::registry::{
    parse_services, service_key, Registry, RegistryError, SERVICES_SET,
};

const FILE: &str = r#"
[[service]]
name = "api"
min = 1
max = 3
load_balanced = true
lb = { service = "web", port_param = "port" }
requirements = { node_type = "small", labels = { zone = "a" } }
resources = { cpu = 0.5, ram_mib = 128 }
warm_up_secs = 5
cool_down_secs = 7
thresholds = { base_pct = 60, step_pct = 10, max_pct = 80 }
params = { port = { type = "port", min = 9000, max = 9100 } }
templates.start = { argv = ["/usr/bin/sleep", "{port}"] }

[[service]]
name = "batch"
min = 0
max = 1
resources = { cpu = 1, ram_mib = 64 }
templates.start = { kind = "podman", argv = ["podman", "run", "--rm", "--name", "b-{instance_id}", "busybox", "true"] }
templates.stop = { kind = "podman", argv = ["podman", "stop", "b-{instance_id}"] }
"#;

#[tokio::test]
async fn register_list_get_replace_remove() {
    let redis = RedisServer::start();
    let mut reg = Registry::connect(&redis.url()).await.unwrap();
    let specs = parse_services(FILE).unwrap();
    reg.register(&specs).await.unwrap();
    let listed = reg.list().await.unwrap();
    assert_eq!(listed, specs, "stored and read back unchanged");
    let api = reg.get("api").await.unwrap();
    assert_eq!(api.thresholds.up_at(1), 60.0);
    assert_eq!(api.thresholds.up_at(2), 70.0);
    assert_eq!(api.thresholds.up_at(5), 80.0);
    assert_eq!(api.requirements.labels["zone"], "a");

    // Re-registering replaces.
    let mut changed = specs[0].clone();
    changed.max = 9;
    reg.register(&[changed]).await.unwrap();
    assert_eq!(reg.get("api").await.unwrap().max, 9);
    assert_eq!(reg.list().await.unwrap().len(), 2);

    // An invalid spec is refused and nothing is written.
    let mut bad = specs[1].clone();
    bad.name = "evil".into();
    bad.min = 5;
    let e = reg.register(&[bad]).await.unwrap_err();
    assert!(e.to_string().contains("min"), "{e}");
    assert!(matches!(
        reg.get("evil").await,
        Err(RegistryError::NotFound(_))
    ));

    // A spec written to Redis by hand, bypassing validation, is refused on read.
    let mut c = redis.conn();
    let mut tampered = serde_json::to_value(&specs[1]).unwrap();
    tampered["templates"]["start"]["argv"] = serde_json::json!(["sh", "-c", "{instance_id}"]);
    let _: () = redis::cmd("HSET")
        .arg(service_key("batch"))
        .arg("spec")
        .arg(tampered.to_string())
        .query(&mut c)
        .unwrap();
    let e = reg.get("batch").await.unwrap_err();
    assert!(matches!(e, RegistryError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("templates.start.argv[0]"), "{e}");
    reg.register(&specs[1..]).await.unwrap();

    reg.remove("api").await.unwrap();
    assert!(matches!(
        reg.remove("api").await,
        Err(RegistryError::NotFound(_))
    ));
    let mut c = redis.conn();
    let names: Vec<String> = redis::cmd("SMEMBERS")
        .arg(SERVICES_SET)
        .query(&mut c)
        .unwrap();
    assert_eq!(names, vec!["batch".to_string()]);
    let exists: bool = redis::cmd("EXISTS")
        .arg(service_key("api"))
        .query(&mut c)
        .unwrap();
    assert!(!exists);
}

/// The `headroom` binary next to this test's own target dir
/// (`cargo build --release -p lb-userspace --bin headroom`, or a workspace
/// `cargo test`, builds it).
fn headroom_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("headroom");
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build --release -p lb-userspace --bin headroom`",
        bin.display()
    );
    bin
}

fn run(args: &[&str]) -> Output {
    Command::new(headroom_bin())
        .args(args)
        .env_remove("HEADROOM_REDIS")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn binary_services_register_list_remove() {
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("services.toml");
    std::fs::write(&good, FILE).unwrap();
    let out = run(&[
        "services",
        "--redis",
        &url,
        "register",
        good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "registered api\nregistered batch\n");

    let out = run(&["services", "--redis", &url, "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    assert!(
        listing.starts_with("api\tmin=1\tmax=3\tlb=web"),
        "{listing}"
    );
    assert!(listing.contains("batch\tmin=0\tmax=1\tlb=-"), "{listing}");

    // A bad file fails naming the field and changes nothing.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, FILE.replace("max = 3", "max = 3\nreplicas = 2")).unwrap();
    let out = run(&[
        "services",
        "--redis",
        &url,
        "register",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("replicas"),
        "{}",
        text(&out.stderr)
    );
    let bad2 = dir.path().join("bad2.toml");
    std::fs::write(&bad2, FILE.replace("\"{port}\"", "\"{port}\", \"{cmd}\"")).unwrap();
    let out = run(&[
        "services",
        "--redis",
        &url,
        "register",
        bad2.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("service[0].templates.start.argv[2]") && err.contains("{cmd}"),
        "{err}"
    );

    let out = run(&["services", "--redis", &url, "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(v[0]["templates"]["start"]["argv"][1], "{port}");

    let out = run(&["services", "--redis", &url, "remove", "batch"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["services", "--redis", &url, "remove", "batch"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no service named \"batch\""),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["services", "--redis", &url, "list"]);
    assert_eq!(text(&out.stdout).lines().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_agent_serves_signed_requests_and_stops_on_sigterm() {
    use headroom_control::keystore::{Grant, KeyStore};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let k = ks.create_key("container-manager").await.unwrap();
    ks.set_grant(
        "agent",
        "container-manager",
        &Grant {
            methods: vec!["GET".into(), "POST".into(), "DELETE".into()],
            prefixes: vec!["/v1/instances".into()],
        },
    )
    .await
    .unwrap();
    Registry::connect(&redis.url())
        .await
        .unwrap()
        .register(&parse_services(FILE).unwrap())
        .await
        .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(headroom_bin())
        .args([
            "agent",
            "--node",
            "bin1",
            "--listen",
            &listen,
            "--redis",
            &redis.url(),
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let c = client();
    eventually(Duration::from_secs(20), "agent ready", || {
        let c = c.clone();
        async move {
            let req = hyper::Request::builder()
                .uri(format!("http://{addr}/_headroom/ready"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            matches!(
                tokio::time::timeout(Duration::from_secs(2), c.request(req)).await,
                Ok(Ok(r)) if r.status() == 200
            )
        }
    })
    .await;
    let creds = Creds {
        akid: k.access_key_id,
        secret: k.secret,
    };
    let body = br#"{"instance_id":"b1","service":"api","params":{"port":9050}}"#;
    let (st, b) = signed(&c, addr, "POST", "/v1/instances", body, &creds, "agent").await;
    assert_eq!(st, 201, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["argv"], serde_json::json!(["/usr/bin/sleep", "9050"]));
    let (st, b) = signed(
        &c,
        addr,
        "POST",
        "/v1/instances",
        br#"{"instance_id":"b2","service":"api","params":{"port":"9050;id"}}"#,
        &creds,
        "agent",
    )
    .await;
    assert_eq!(st, 400, "{b}");
    let (st, b) = signed(&c, addr, "DELETE", "/v1/instances/b1", b"", &creds, "agent").await;
    assert_eq!(st, 200, "{b}");
    assert!(b.contains("\"stopped\""), "{b}");
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
