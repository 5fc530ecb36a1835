//! `headroom agent` against a real redis-server and real processes: hostile
//! requests are refused and run nothing; starts are idempotent by instance
//! id; stops escalate; exits are reported (HTTP and Redis); a restarted
//! agent re-adopts live instances; node reports arrive signed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use headroom_control::agent::publish::instances_key;
use headroom_control::agent::{start_agent, AgentArgs, AgentHandle, AGENT_SERVICE};
use headroom_control::keystore::{Grant, KeyStore};
use headroom_control::registry::{parse_services, Registry};
use http_body_util::Full;
use hyper::Request;
use serde_json::{json, Value};

const NODE: &str = "n1";

struct Env {
    redis: RedisServer,
    agent: Option<AgentHandle>,
    cm: Creds,
    intruder: Creds,
    revoked: Creds,
    state: tempfile::TempDir,
    markers: tempfile::TempDir,
}

fn services_toml(markers: &Path) -> String {
    let m = markers.display();
    format!(
        r#"
[[service]]
name = "marker"
min = 0
max = 5
resources = {{ cpu = 0.1, ram_mib = 16 }}
params = {{ tag = {{ type = "ident" }}, n = {{ type = "int", min = 1, max = 100 }} }}
templates.start = {{ argv = ["/usr/bin/touch", "{m}/m-{{instance_id}}-{{tag}}-{{n}}"] }}

[[service]]
name = "sleeper"
min = 0
max = 5
resources = {{ cpu = 0.1, ram_mib = 16 }}
stop_grace_secs = 1
params = {{ secs = {{ type = "int", min = 1, max = 3600 }} }}
templates.start = {{ argv = ["/usr/bin/sleep", "{{secs}}"] }}
templates.stop = {{ argv = ["/usr/bin/touch", "{m}/stopped-{{instance_id}}"] }}

[[service]]
name = "plain"
min = 0
max = 5
resources = {{ cpu = 0.1, ram_mib = 16 }}
stop_grace_secs = 2
params = {{ secs = {{ type = "int", min = 1, max = 3600 }} }}
templates.start = {{ argv = ["/usr/bin/sleep", "{{secs}}"] }}

[[service]]
name = "failer"
min = 0
max = 5
resources = {{ cpu = 0.1, ram_mib = 16 }}
templates.start = {{ argv = ["/usr/bin/false"] }}
"#
    )
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let state = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let mut ks = KeyStore::connect(&redis.url()).await.unwrap();
    let grant = Grant {
        methods: vec!["GET".into(), "POST".into(), "DELETE".into()],
        prefixes: vec!["/v1/instances".into()],
    };
    let cm = ks.create_key("container-manager").await.unwrap();
    ks.set_grant(AGENT_SERVICE, "container-manager", &grant)
        .await
        .unwrap();
    // Same grant, valid key — but not the allowed principal.
    let intruder = ks.create_key("intruder").await.unwrap();
    ks.set_grant(AGENT_SERVICE, "intruder", &grant)
        .await
        .unwrap();
    let revoked = ks.create_key("container-manager").await.unwrap();
    ks.revoke_key(&revoked.access_key_id).await.unwrap();
    let specs = parse_services(&services_toml(markers.path())).unwrap();
    Registry::connect(&redis.url())
        .await
        .unwrap()
        .register(&specs)
        .await
        .unwrap();
    let agent = start(&redis, state.path()).await;
    let creds = |k: headroom_control::keystore::NewKey| Creds {
        akid: k.access_key_id,
        secret: k.secret,
    };
    Env {
        redis,
        agent: Some(agent),
        cm: creds(cm),
        intruder: creds(intruder),
        revoked: creds(revoked),
        state,
        markers,
    }
}

async fn start(redis: &RedisServer, state: &Path) -> AgentHandle {
    let args = AgentArgs::new(
        NODE,
        "127.0.0.1:0".parse().unwrap(),
        &redis.url(),
        state.to_path_buf(),
    );
    let a = start_agent(args).await.unwrap();
    assert!(a.keysync.state.is_ready(), "key cache loaded from redis");
    a
}

impl Env {
    fn addr(&self) -> std::net::SocketAddr {
        self.agent.as_ref().unwrap().local_addr
    }

    async fn call(&self, creds: &Creds, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let b = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let (st, text) = signed(
            &client(),
            self.addr(),
            method,
            path,
            &b,
            creds,
            AGENT_SERVICE,
        )
        .await;
        (st, parse(&text))
    }

    async fn cm(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        self.call(&self.cm, method, path, body).await
    }

    async fn instance(&self, id: &str) -> Value {
        let (st, v) = self
            .cm("GET", &format!("/v1/instances/{id}"), &Value::Null)
            .await;
        assert_eq!(st, 200, "{v}");
        v
    }

    fn redis_instances(&self) -> std::collections::HashMap<String, Value> {
        let mut c = self.redis.conn();
        let m: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(instances_key(NODE))
            .query(&mut c)
            .unwrap();
        m.into_iter().map(|(k, v)| (k, parse(&v))).collect()
    }

    fn marker_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.markers.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Stop every live instance (cleanup, also after a failed assertion
    /// would leave sleepers: they are bounded by their own `secs` anyway).
    async fn stop_all(&self) {
        let (_, v) = self.cm("GET", "/v1/instances", &Value::Null).await;
        for i in v["instances"].as_array().cloned().unwrap_or_default() {
            if i["state"] == "running" {
                let id = i["instance_id"].as_str().unwrap().to_string();
                self.cm("DELETE", &format!("/v1/instances/{id}"), &Value::Null)
                    .await;
            }
        }
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::String(text.to_string()))
}

fn alive(pid: u64) -> bool {
    // A zombie still has /proc/PID: look at its state letter.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let after = &s[s.rfind(')').unwrap() + 1..];
            after.split_whitespace().next() != Some("Z")
        }
        Err(_) => false,
    }
}

async fn wait_state(e: &Env, id: &str, state: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..500 {
        last = e.instance(id).await;
        if last["state"] == state {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("instance {id} never reached {state}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_run_nothing() {
    let e = env().await;
    let good = json!({"instance_id": "ok-1", "service": "marker", "params": {"tag": "t", "n": 1}});
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let mut refused = 0;

    // 1. Unsigned.
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{}/v1/instances", e.addr()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(good.to_string())))
        .unwrap();
    let (st, body) = send(&client(), req).await;
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "missing_authorization")
    );
    refused += 1;

    // 2. Signed by another principal that holds the same grant.
    let (st, v) = e.call(&e.intruder, "POST", "/v1/instances", &good).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (403, Some("principal_not_allowed"))
    );
    refused += 1;
    let (st, _) = e
        .call(&e.intruder, "DELETE", "/v1/instances/ok-1", &Value::Null)
        .await;
    assert_eq!(st, 403);
    refused += 1;

    // 3. The allowed principal's revoked key.
    let (st, v) = e.call(&e.revoked, "POST", "/v1/instances", &good).await;
    assert_eq!((st, v["error"].as_str()), (401, Some("key_revoked")));
    refused += 1;

    // 4. Right key id, wrong secret.
    let forged = Creds {
        akid: e.cm.akid.clone(),
        secret: "not-the-secret".into(),
    };
    let (st, v) = e.call(&forged, "POST", "/v1/instances", &good).await;
    assert_eq!((st, v["error"].as_str()), (401, Some("signature_mismatch")));
    refused += 1;

    // 5. Signed for another service's credential scope.
    let b = good.to_string();
    let (st, body) = signed(
        &client(),
        e.addr(),
        "POST",
        "/v1/instances",
        b.as_bytes(),
        &e.cm,
        "load-receiver",
    )
    .await;
    assert_eq!(
        (st, error_of(&body).as_str()),
        (401, "credential_scope_mismatch")
    );
    refused += 1;

    // 6. Unknown service / unknown template / the stop template as a start.
    let (st, v) = e
        .cm(
            "POST",
            "/v1/instances",
            &with(&|v| v["service"] = json!("nope")),
        )
        .await;
    assert_eq!((st, v["error"].as_str()), (404, Some("unknown_service")));
    refused += 1;
    for t in ["debug-shell", "stop"] {
        let (st, v) = e
            .cm(
                "POST",
                "/v1/instances",
                &with(&|v| v["template"] = json!(t)),
            )
            .await;
        assert_eq!(
            (st, v["error"].as_str()),
            (404, Some("unknown_template")),
            "{t}"
        );
        refused += 1;
    }

    // 7. Shell metacharacters and path traversal in a parameter.
    let hostile_tags = [
        "x;touch /tmp/pwned",
        "$(id)",
        "`id`",
        "a|b",
        "a&&b",
        "a\nb",
        "../../etc/passwd",
        "a/b",
        "a b",
        "",
    ];
    for tag in hostile_tags {
        let (st, v) = e
            .cm(
                "POST",
                "/v1/instances",
                &with(&|v| v["params"]["tag"] = json!(tag)),
            )
            .await;
        assert_eq!(st, 400, "{tag:?}: {v}");
        assert_eq!(v["error"], "invalid_param", "{tag:?}");
        assert_eq!(v["field"], "params.tag", "{tag:?}");
        refused += 1;
    }
    // ... and in the instance id, which is substituted too.
    for id in ["../x", "a;b", "$(id)"] {
        let (st, v) = e
            .cm(
                "POST",
                "/v1/instances",
                &with(&|v| v["instance_id"] = json!(id)),
            )
            .await;
        assert_eq!(
            (st, v["field"].as_str()),
            (400, Some("instance_id")),
            "{id:?}: {v}"
        );
        refused += 1;
    }

    // 8. Wrong type, out of range, missing, extra parameter, extra field.
    let bad_params: [(&str, Value); 5] = [
        ("params.n", json!({"tag": "t", "n": "1;reboot"})),
        ("params.n", json!({"tag": "t", "n": 101})),
        ("params.n", json!({"tag": "t", "n": 1.5})),
        ("params.n", json!({"tag": "t"})),
        ("params.cmd", json!({"tag": "t", "n": 1, "cmd": "rm -rf /"})),
    ];
    for (field, params) in bad_params {
        let (st, v) = e
            .cm(
                "POST",
                "/v1/instances",
                &with(&|v| v["params"] = params.clone()),
            )
            .await;
        assert_eq!(
            (st, v["field"].as_str()),
            (400, Some(field)),
            "{params}: {v}"
        );
        refused += 1;
    }
    let (st, v) = e
        .cm(
            "POST",
            "/v1/instances",
            &with(&|v| v["argv"] = json!(["/bin/sh"])),
        )
        .await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("invalid_request")),
        "{v}"
    );
    assert!(v["detail"].as_str().unwrap().contains("argv"), "{v}");
    refused += 1;

    // 9. Oversize body.
    let big = with(&|v| v["pad"] = json!("x".repeat(100 * 1024)));
    let (st, v) = e.cm("POST", "/v1/instances", &big).await;
    assert_eq!((st, v["error"].as_str()), (413, Some("body_too_large")));
    refused += 1;

    assert!(refused >= 10);
    // Nothing ran: no marker, no instance, nothing in Redis, no log.
    assert_eq!(e.marker_files(), Vec::<String>::new());
    let (st, v) = e.cm("GET", "/v1/instances", &Value::Null).await;
    assert_eq!(st, 200);
    assert_eq!(v["instances"], json!([]));
    assert!(e.redis_instances().is_empty());
    let logs = std::fs::read_dir(e.state.path().join("logs"))
        .unwrap()
        .count();
    assert_eq!(logs, 0, "no command was started");

    // The correct request, with a signed nonce, runs exactly once...
    let now = headroom_control::sigv4::unix_now();
    let b = good.to_string();
    let extra = [("x-headroom-nonce", "n-0001")];
    let (st, body) = signed_at(
        &client(),
        e.addr(),
        "POST",
        "/v1/instances",
        b.as_bytes(),
        &e.cm,
        AGENT_SERVICE,
        now,
        &extra,
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let v = wait_state(&e, "ok-1", "exited").await;
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(e.marker_files(), vec!["m-ok-1-t-1".to_string()]);
    // ... and its replay is refused before it reaches the executor.
    let (st, body) = signed_at(
        &client(),
        e.addr(),
        "POST",
        "/v1/instances",
        b.as_bytes(),
        &e.cm,
        AGENT_SERVICE,
        now,
        &extra,
    )
    .await;
    assert_eq!((st, error_of(&body).as_str()), (401, "replayed_nonce"));
    let (_, v) = e.cm("GET", "/v1/instances", &Value::Null).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);
    assert_eq!(e.marker_files().len(), 1);

    // The allowed principal without its grant (revoked live, via key sync).
    let mut ks = KeyStore::connect(&e.redis.url()).await.unwrap();
    ks.remove_grant(AGENT_SERVICE, "container-manager")
        .await
        .unwrap();
    // Wait with a read (which runs nothing) until key sync has applied it.
    eventually(Duration::from_secs(10), "grant removal applied", || async {
        e.cm("GET", "/v1/instances", &Value::Null).await.0 == 403
    })
    .await;
    let again = with(&|v| v["instance_id"] = json!("ok-2"));
    let (st, v) = e.cm("POST", "/v1/instances", &again).await;
    assert_eq!((st, v["error"].as_str()), (403, Some("no_grant")), "{v}");
    assert_eq!(e.marker_files().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicate_starts_make_one_process() {
    let e = env().await;
    let start = json!({"instance_id": "c1", "service": "plain", "params": {"secs": 120}});
    let calls = (0..16).map(|_| e.cm("POST", "/v1/instances", &start));
    let answers = futures_join_all(calls).await;
    let created = answers.iter().filter(|(st, _)| *st == 201).count();
    let same = answers.iter().filter(|(st, _)| *st == 200).count();
    assert_eq!((created, same), (1, 15), "{answers:?}");
    let pids: std::collections::BTreeSet<u64> = answers
        .iter()
        .map(|(_, v)| v["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "one process for one id");
    let (_, v) = e.cm("GET", "/v1/instances", &Value::Null).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);
    e.stop_all().await;
    assert!(!alive(*pids.iter().next().unwrap()));
}

/// The command line of `pid` once it has exec'ed `program`: the agent
/// answers after spawning, and the child may still be between fork and
/// exec (its cmdline then is empty or the agent's). Waits up to 5 s.
async fn exec_cmdline(pid: u64, program: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let c = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if c.starts_with(program) || std::time::Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Run futures concurrently on this task (no extra dependency).
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = fs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_idempotent_stop_escalates_exits_are_reported() {
    let e = env().await;
    let start = json!({"instance_id": "s1", "service": "sleeper", "params": {"secs": 120}});
    let (st, v) = e.cm("POST", "/v1/instances", &start).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["state"], "running");
    let pid = v["pid"].as_u64().unwrap();
    assert!(alive(pid));
    assert_eq!(
        exec_cmdline(pid, "/usr/bin/sleep").await,
        "/usr/bin/sleep\x00120\x00"
    );
    // Own process group, so a stop reaches everything it spawned.
    assert_eq!(unsafe { libc::getpgid(pid as i32) }, pid as i32);

    // Same id, same request: the same instance, not a second process.
    let (st, v) = e.cm("POST", "/v1/instances", &start).await;
    assert_eq!((st, v["pid"].as_u64()), (200, Some(pid)));
    // Same id, different parameters: conflict.
    let mut other = start.clone();
    other["params"]["secs"] = json!(60);
    let (st, v) = e.cm("POST", "/v1/instances", &other).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (409, Some("instance_id_conflict"))
    );
    let (_, v) = e.cm("GET", "/v1/instances", &Value::Null).await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 1);

    // The container-manager sees it in Redis.
    eventually(Duration::from_secs(10), "s1 running in redis", || async {
        e.redis_instances()
            .get("s1")
            .is_some_and(|r| r["state"] == "running")
    })
    .await;

    // Stop: the stop template runs (marker), the sleeper ignores it, so
    // SIGTERM follows after the 1 s grace.
    let (st, v) = e.cm("DELETE", "/v1/instances/s1", &Value::Null).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["signal"], libc::SIGTERM, "{v}");
    assert!(e.marker_files().contains(&"stopped-s1".to_string()));
    assert!(!alive(pid));
    // Stopping again is a no-op answer.
    let (st, v) = e.cm("DELETE", "/v1/instances/s1", &Value::Null).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("stopped")));
    eventually(Duration::from_secs(10), "s1 stopped in redis", || async {
        e.redis_instances()
            .get("s1")
            .is_some_and(|r| r["state"] == "stopped")
    })
    .await;

    // No stop template: SIGTERM directly.
    let (st, v) = e
        .cm(
            "POST",
            "/v1/instances",
            &json!({"instance_id": "p1", "service": "plain", "params": {"secs": 120}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let ppid = v["pid"].as_u64().unwrap();
    let (st, v) = e.cm("DELETE", "/v1/instances/p1", &Value::Null).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("stopped")), "{v}");
    assert_eq!(v["signal"], libc::SIGTERM);
    assert!(!alive(ppid));

    // A process that exits by itself: its exit code is reported.
    let (st, _) = e
        .cm(
            "POST",
            "/v1/instances",
            &json!({"instance_id": "f1", "service": "failer"}),
        )
        .await;
    assert_eq!(st, 201);
    let v = wait_state(&e, "f1", "exited").await;
    assert_eq!(v["exit_code"], 1, "{v}");
    eventually(Duration::from_secs(10), "f1 exit code in redis", || async {
        e.redis_instances()
            .get("f1")
            .is_some_and(|r| r["state"] == "exited" && r["exit_code"] == 1)
    })
    .await;

    // Unknown instance.
    let (st, _) = e.cm("DELETE", "/v1/instances/none", &Value::Null).await;
    assert_eq!(st, 404);
    e.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_readopts_live_instances_and_marks_gone_ones_lost() {
    let mut e = env().await;
    let (st, v) = e
        .cm(
            "POST",
            "/v1/instances",
            &json!({"instance_id": "r1", "service": "plain", "params": {"secs": 120}}),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    e.agent.take().unwrap().shutdown().await;
    assert!(alive(pid), "instances outlive the agent");

    // Add a record whose process is gone to the state file.
    let file: PathBuf = e.state.path().join("instances.json");
    let mut table: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut ghost = table["r1"].clone();
    ghost["instance_id"] = json!("ghost");
    ghost["proc_start"] = json!(1);
    table.insert("ghost".into(), ghost);
    std::fs::write(&file, serde_json::to_vec(&table).unwrap()).unwrap();

    e.agent = Some(start(&e.redis, e.state.path()).await);
    let v = e.instance("r1").await;
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("running"), Some(pid)),
        "{v}"
    );
    assert_eq!(v["adopted"], true);
    assert_eq!(e.instance("ghost").await["state"], "lost");

    // It ends outside the agent's control: the adopted record follows.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let v = wait_state(&e, "r1", "exited").await;
    assert!(v["ended_ms"].as_i64().is_some(), "{v}");
    eventually(Duration::from_secs(10), "r1 exited in redis", || async {
        e.redis_instances()
            .get("r1")
            .is_some_and(|r| r["state"] == "exited")
    })
    .await;
}
