#![allow(clippy::unwrap_used)]
//! The task service (virtual port 1003) between real nodes on loopback: the whole
//! submit / accept / execute / results lifecycle, declines, forged updates from the wrong
//! node, hostile task IDs and file names, oversize frames, persistence across a restart,
//! the enable switch, the polo gate and the timeout sweep.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pilot_registry::store::RedbStore;
use pilot_registry::{Config as RegistryConfig, Registry};
use pilotd::engine::EngineHandle;
use pilotd::events::{Event, Events};
use pilotd::node::Node;
use pilotd::tasks::{
    encode_frame, frame_type, Reply, ResultInput, TaskConfig, TaskHandle, TaskKind, TaskService,
    TaskStatus, MAX_FRAME, STATUS_OK, STATUS_REFUSED, TASK_PORT,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tunnel::{Addr, SocketAddr as PilotAddr};

use crate::support;
use support::registry;

const WAIT: Duration = Duration::from_secs(10);

async fn node(registry: &str, home: &Path) -> (Node, u32) {
    let n = support::bare_node(registry, home).await;
    let id = n.daemon.registered(WAIT).await.unwrap();
    (n, id)
}

fn config(home: &Path) -> TaskConfig {
    TaskConfig {
        enabled: Some(true),
        ..TaskConfig::new(home)
    }
}

async fn service(n: &Node, cfg: TaskConfig) -> (TaskService, mpsc::Receiver<Event>) {
    let (events, rx) = Events::channel();
    let s = TaskService::start(cfg, n.daemon.engine.clone(), n.daemon.link.clone(), events)
        .await
        .unwrap();
    (s, rx)
}

fn names(rx: &mut mpsc::Receiver<Event>) -> Vec<(&'static str, serde_json::Value)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push((e.name, e.data.unwrap_or_default()));
    }
    out
}

/// Sends raw bytes to `dst`'s task port and reads one reply frame (`None` if the service
/// closed without one).
async fn raw(engine: &EngineHandle, dst: u32, bytes: &[u8]) -> Option<(u32, Reply)> {
    let mut s = pilotd::local::dial(engine, PilotAddr::new(Addr::new(0, dst), TASK_PORT))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        // The service may refuse and close before taking everything.
        let _ = s.write_all(bytes).await;
        let mut h = [0u8; 8];
        s.read_exact(&mut h).await.ok()?;
        let kind = u32::from_be_bytes(h[..4].try_into().unwrap());
        let len = u32::from_be_bytes(h[4..].try_into().unwrap());
        assert!(len < 65536, "reply too large");
        let mut body = vec![0u8; len as usize];
        s.read_exact(&mut body).await.ok()?;
        Some((kind, serde_json::from_slice(&body).unwrap()))
    })
    .await
    .unwrap()
}

fn frame(kind: u32, v: serde_json::Value) -> Vec<u8> {
    encode_frame(kind, &serde_json::to_vec(&v).unwrap())
}

fn status(h: &TaskHandle, kind: TaskKind, id: &str) -> TaskStatus {
    h.get(kind, id).unwrap().status
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_accept_execute_and_results_reach_the_submitter() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb) = (dir.path().join("a"), dir.path().join("b"));
    let (a, na) = node(&reg, &ha).await;
    let (b, nb) = node(&reg, &hb).await;
    let (sa, mut ea) = service(&a, config(&ha)).await;
    let (sb, mut eb) = service(&b, config(&hb)).await;
    let (ta, tb) = (sa.handle(), sb.handle());

    let out = ta.submit(Addr::new(0, nb), "add 2 and 3").await.unwrap();
    assert!(out.accepted, "{out:?}");
    assert_eq!(out.status, STATUS_OK);
    assert_eq!(out.message, "Task received with status NEW");
    let id = out.task_id.clone();

    let got = tb.list(Some(TaskKind::Received));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task_id, id);
    assert_eq!(got[0].status, TaskStatus::New);
    assert_eq!(got[0].description, "add 2 and 3");
    assert_eq!(got[0].from, Addr::new(0, na).to_string());
    assert_eq!(tb.queue().len(), 1);
    assert_eq!(status(&ta, TaskKind::Submitted, &id), TaskStatus::New);
    assert!(hb
        .join("tasks/received")
        .join(format!("{id}.json"))
        .is_file());
    assert!(names(&mut eb)
        .iter()
        .any(|(n, d)| *n == "task.received" && d["task_id"] == id));

    let acc = tb.accept(&id).await.unwrap();
    assert!(acc.notified);
    assert_eq!(status(&ta, TaskKind::Submitted, &id), TaskStatus::Accepted);
    assert!(tb.accept(&id).await.is_err(), "accepting twice");

    let ex = tb.execute().await.unwrap();
    assert_eq!(
        (ex.task_id.as_str(), ex.status),
        (id.as_str(), TaskStatus::Executing)
    );
    assert_eq!(status(&ta, TaskKind::Submitted, &id), TaskStatus::Executing);
    assert!(tb.execute().await.is_err(), "nothing more to execute");

    let res = tb
        .send_results(&id, ResultInput::Text("5".into()))
        .await
        .unwrap();
    assert!(res.confirmed);
    assert_eq!(res.status, TaskStatus::Succeeded);
    assert_eq!(status(&tb, TaskKind::Received, &id), TaskStatus::Succeeded);
    let mine = ta.get(TaskKind::Submitted, &id).unwrap();
    assert_eq!(mine.status, TaskStatus::Succeeded);
    let path = ha.join("tasks/results").join(format!("{id}_result.txt"));
    assert_eq!(mine.result_file, path.display().to_string());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "5");
    let evs = names(&mut ea);
    assert!(evs
        .iter()
        .any(|(n, d)| *n == "task.result" && d["size"] == 1));
    assert!(evs
        .iter()
        .any(|(n, d)| *n == "task.status" && d["status"] == "SUCCEEDED"));
    // Results once only.
    assert!(tb
        .send_results(&id, ResultInput::Text("6".into()))
        .await
        .is_err());

    // A file result keeps only a safe base name.
    let id2 = ta
        .submit(Addr::new(0, nb), "a table")
        .await
        .unwrap()
        .task_id;
    tb.accept(&id2).await.unwrap();
    let r = tb
        .send_results(
            &id2,
            ResultInput::File {
                name: "out/table.csv".into(),
                data: b"a,b\n1,2\n".to_vec(),
            },
        )
        .await
        .unwrap();
    assert_eq!(r.filename.as_deref(), Some("table.csv"));
    let path = ha.join("tasks/results").join(format!("{id2}_table.csv"));
    assert_eq!(std::fs::read(&path).unwrap(), b"a,b\n1,2\n");
    // Source code is not a result.
    let id3 = ta.submit(Addr::new(0, nb), "code").await.unwrap().task_id;
    tb.accept(&id3).await.unwrap();
    let e = tb
        .send_results(
            &id3,
            ResultInput::File {
                name: "x.py".into(),
                data: b"print(1)".to_vec(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_argument");

    // Decline with a justification reaches the submitter.
    let id4 = ta
        .submit(Addr::new(0, nb), "mine bitcoin")
        .await
        .unwrap()
        .task_id;
    assert!(tb.decline(&id4, "").await.is_err());
    let d = tb.decline(&id4, "not on my hardware").await.unwrap();
    assert!(d.notified);
    let f = ta.get(TaskKind::Submitted, &id4).unwrap();
    assert_eq!(f.status, TaskStatus::Declined);
    assert_eq!(f.status_justification, "not on my hardware");
    assert!(!f.accepted_at.is_empty());
    assert_eq!(tb.queue().len(), 1, "only the accepted {id3} waits");

    sa.stop().await;
    sb.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_other_party_may_update_a_task() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb, hc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let (a, _na) = node(&reg, &ha).await;
    let (b, nb) = node(&reg, &hb).await;
    let (c, _nc) = node(&reg, &hc).await;
    let na = a.daemon.engine.node();
    let (sa, _) = service(&a, config(&ha)).await;
    let (sb, _) = service(&b, config(&hb)).await;
    let (sc, _) = service(&c, config(&hc)).await;
    let (ta, tb, tc) = (sa.handle(), sb.handle(), sc.handle());
    let t1 = ta.submit(Addr::new(0, nb), "from a").await.unwrap().task_id;
    let t2 = tc.submit(Addr::new(0, nb), "from c").await.unwrap().task_id;
    let (ae, ce) = (&a.daemon.engine, &c.daemon.engine);

    let update = |id: &str, st: &str| {
        frame(
            frame_type::STATUS_UPDATE,
            json!({"task_id": id, "status": st, "justification": "forged"}),
        )
    };
    // A third party cannot cancel A's task on B; A cannot cancel C's.
    let (k, r) = raw(ce, nb, &update(&t1, "CANCELLED")).await.unwrap();
    assert_eq!((k, r.status), (frame_type::STATUS_UPDATE, STATUS_REFUSED));
    assert_eq!(r.message, "unknown task");
    let (_, r) = raw(ae, nb, &update(&t2, "CANCELLED")).await.unwrap();
    assert_eq!(r.status, STATUS_REFUSED);
    // A submitter may only cancel.
    let (_, r) = raw(ae, nb, &update(&t1, "ACCEPTED")).await.unwrap();
    assert_eq!(r.status, STATUS_REFUSED);
    assert_eq!(status(&tb, TaskKind::Received, &t1), TaskStatus::New);
    assert_eq!(status(&tb, TaskKind::Received, &t2), TaskStatus::New);
    // Only B may report on A's submitted task, and send its results.
    let (_, r) = raw(ce, na, &update(&t1, "ACCEPTED")).await.unwrap();
    assert_eq!(r.status, STATUS_REFUSED);
    let res = frame(
        frame_type::SEND_RESULTS,
        json!({"task_id": t1, "result_type": "text", "result_text": "forged"}),
    );
    let (_, r) = raw(ce, na, &res).await.unwrap();
    assert_eq!(r.status, STATUS_REFUSED);
    assert_eq!(status(&ta, TaskKind::Submitted, &t1), TaskStatus::New);
    assert!(files_under(&ha.join("tasks/results")).is_empty());
    assert!(ta.stats().updates_refused >= 2);
    assert!(tb.stats().updates_refused >= 3);

    // B, the receiver, sends a result file with a hostile name: it lands in results/.
    tb.accept(&t1).await.unwrap();
    let res = frame(
        frame_type::SEND_RESULTS,
        json!({"task_id": t1, "result_type": "file", "filename": "../../../.evil.txt",
               "file_data": "aGk="}),
    );
    let (_, r) = raw(&b.daemon.engine, na, &res).await.unwrap();
    assert_eq!(r.status, STATUS_OK, "{r:?}");
    let saved = ha.join("tasks/results").join(format!("{t1}_evil.txt"));
    assert_eq!(std::fs::read(&saved).unwrap(), b"hi");
    assert_eq!(status(&ta, TaskKind::Submitted, &t1), TaskStatus::Completed);

    // The submitter withdraws its own task.
    let c2 = tc.cancel(&t2).await.unwrap();
    assert!(c2.notified);
    assert_eq!(status(&tb, TaskKind::Received, &t2), TaskStatus::Cancelled);

    for s in [sa, sb, sc] {
        s.stop().await;
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_and_oversize_frames_are_refused_and_service_goes_on() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb) = (dir.path().join("a"), dir.path().join("b"));
    let (a, _) = node(&reg, &ha).await;
    let (b, nb) = node(&reg, &hb).await;
    let (sa, _) = service(&a, config(&ha)).await;
    let (sb, _) = service(&b, config(&hb)).await;
    let (ta, tb) = (sa.handle(), sb.handle());
    let ae = &a.daemon.engine;
    let before = files_under(dir.path());

    for id in [
        "../../x",
        "../../../../tmp/x",
        "0123ABCD-ef01-2345-6789-abcdef012345",
        "",
    ] {
        let f = frame(
            frame_type::SUBMIT,
            json!({"task_id": id, "task_description": "pwn", "from_addr": "0:0000.0000.0001"}),
        );
        let (k, r) = raw(ae, nb, &f).await.unwrap();
        assert_eq!((k, r.status), (frame_type::SUBMIT, STATUS_REFUSED), "{id}");
        assert_eq!(r.message, "invalid task id");
    }
    assert!(tb.list(None).is_empty());
    assert_eq!(
        files_under(dir.path()).len(),
        before.len(),
        "no file was created"
    );
    assert!(!dir.path().join("x.json").exists() && !dir.path().join("x").exists());

    // Oversize: refused from the header, and the connection ends.
    let mut big = Vec::new();
    big.extend_from_slice(&frame_type::SEND_RESULTS.to_be_bytes());
    big.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
    big.extend_from_slice(&[b'{'; 1024]);
    let (k, r) = raw(ae, nb, &big).await.unwrap();
    assert_eq!((k, r.status), (frame_type::SEND_RESULTS, STATUS_REFUSED));
    assert!(r.message.contains("larger"), "{}", r.message);
    // A submission of more than its own cap (1 MiB), and an unknown type.
    let mut sub = frame_type::SUBMIT.to_be_bytes().to_vec();
    sub.extend_from_slice(&(2u32 << 20).to_be_bytes());
    assert_eq!(raw(ae, nb, &sub).await.unwrap().1.status, STATUS_REFUSED);
    let mut legacy = frame_type::RESULT.to_be_bytes().to_vec();
    legacy.extend_from_slice(&2u32.to_be_bytes());
    legacy.extend_from_slice(b"{}");
    assert_eq!(raw(ae, nb, &legacy).await.unwrap().1.status, STATUS_REFUSED);
    // Garbage JSON.
    let (_, r) = raw(ae, nb, &encode_frame(frame_type::SUBMIT, b"\xff{"))
        .await
        .unwrap();
    assert_eq!(r.status, STATUS_REFUSED);
    assert_eq!(tb.stats().bad_headers, 3);
    assert!(tb.stats().bad_bodies >= 5);

    // Still serving.
    let out = ta.submit(Addr::new(0, nb), "still there?").await.unwrap();
    assert!(out.accepted, "{out:?}");
    // A retried submission (same ID, same submitter) is taken once.
    let again = frame(
        frame_type::SUBMIT,
        json!({"task_id": out.task_id, "task_description": "still there?"}),
    );
    assert_eq!(raw(ae, nb, &again).await.unwrap().1.status, STATUS_OK);
    assert_eq!(tb.list(None).len(), 1);
    // The same ID with another description is someone else's.
    let other = frame(
        frame_type::SUBMIT,
        json!({"task_id": out.task_id, "task_description": "replace it"}),
    );
    assert_eq!(raw(ae, nb, &other).await.unwrap().1.status, STATUS_REFUSED);

    sa.stop().await;
    sb.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_state_survives_a_restart_and_the_switch_is_kept() {
    let reg = registry().await;
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb) = (dir.path().join("a"), dir.path().join("b"));
    let (a, _) = node(&reg, &ha).await;
    let (b, nb) = node(&reg, &hb).await;
    let (sa, _) = service(&a, config(&ha)).await;
    let (sb, _) = service(&b, config(&hb)).await;
    let ta = sa.handle();
    let t1 = ta.submit(Addr::new(0, nb), "first").await.unwrap().task_id;
    let t2 = ta.submit(Addr::new(0, nb), "second").await.unwrap().task_id;
    sb.handle().accept(&t1).await.unwrap();
    sb.stop().await;

    // Restarted with no explicit switch: the persisted "on" holds.
    let (sb, _) = service(
        &b,
        TaskConfig {
            enabled: None,
            ..TaskConfig::new(&hb)
        },
    )
    .await;
    let tb = sb.handle();
    assert!(tb.enabled());
    assert_eq!(status(&tb, TaskKind::Received, &t1), TaskStatus::Accepted);
    assert_eq!(status(&tb, TaskKind::Received, &t2), TaskStatus::New);
    let q: Vec<String> = tb.queue().into_iter().map(|e| e.task_id).collect();
    assert_eq!(q, vec![t1.clone(), t2.clone()], "arrival order kept");
    assert_eq!(tb.execute().await.unwrap().task_id, t1);
    tb.send_results(&t1, ResultInput::Text("done".into()))
        .await
        .unwrap();
    assert_eq!(status(&ta, TaskKind::Submitted, &t1), TaskStatus::Succeeded);

    // Switched off: submissions are refused with 400 and nothing is recorded on either side.
    tb.set_enabled(false).await.unwrap();
    let out = ta.submit(Addr::new(0, nb), "third").await.unwrap();
    assert!(!out.accepted);
    assert_eq!(out.status, STATUS_REFUSED);
    assert!(out.message.contains("disabled"), "{}", out.message);
    assert!(ta.get(TaskKind::Submitted, &out.task_id).is_none());
    assert_eq!(tb.list(Some(TaskKind::Received)).len(), 2);
    sb.stop().await;
    let (sb, _) = service(
        &b,
        TaskConfig {
            enabled: None,
            ..TaskConfig::new(&hb)
        },
    )
    .await;
    assert!(!sb.handle().enabled());

    sa.stop().await;
    sb.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polo_gate_and_the_accept_timeout() {
    let reg = Registry::open(
        Box::new(RedbStore::in_memory().unwrap()),
        RegistryConfig {
            register_per_minute: 0,
            requests_per_ip: 0,
            requests_per_node: 0,
            policy: pilot_registry::state::Policy {
                admin_token: Some("sesame".into()),
                beacon_token: None,
            },
            ..RegistryConfig::default()
        },
    )
    .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reg_addr = l.local_addr().unwrap().to_string();
    tokio::spawn(reg.serve(l, None, std::future::pending()));
    let dir = tempfile::tempdir().unwrap();
    let (ha, hb, hc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let (a, _) = node(&reg_addr, &ha).await;
    let (b, nb) = node(&reg_addr, &hb).await;
    let (c, nc) = node(&reg_addr, &hc).await;
    let mut admin = pilot_registry_client::Client::connect(&reg_addr)
        .await
        .unwrap();
    admin
        .call(&json!({"type": "set_polo_score", "node_id": nb, "polo_score": 5, "admin_token": "sesame"}))
        .await
        .unwrap();
    let (sa, _) = service(&a, config(&ha)).await;
    let (sb, _) = service(&b, config(&hb)).await;
    let quick = TaskConfig {
        new_timeout: Duration::from_secs(1),
        sweep_every: Duration::from_millis(200),
        ..config(&hc)
    };
    let (sc, mut ec) = service(&c, quick).await;
    let ta = sa.handle();

    // B's score (5) is above A's (0).
    let out = ta.submit(Addr::new(0, nb), "please").await.unwrap();
    assert!(!out.accepted);
    assert_eq!(out.message, "Polo score too low: submitter=0, receiver=5");
    assert!(sb.handle().list(None).is_empty());

    // C cancels a task left NEW past its timeout, and tells A.
    let id = ta
        .submit(Addr::new(0, nc), "ignored")
        .await
        .unwrap()
        .task_id;
    let deadline = tokio::time::Instant::now() + WAIT;
    while status(&ta, TaskKind::Submitted, &id) != TaskStatus::Cancelled {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not cancelled in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tc = sc.handle();
    assert_eq!(status(&tc, TaskKind::Received, &id), TaskStatus::Cancelled);
    assert_eq!(tc.accept(&id).await.unwrap_err().code(), "invalid_state");
    assert!(names(&mut ec)
        .iter()
        .any(|(n, d)| *n == "task.status" && d["status"] == "CANCELLED"));

    for s in [sa, sb, sc] {
        s.stop().await;
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}
