//! The node tree end to end, through real sockets: sequential names,
//! versions, multi, containers, TTLs and watch ordering.

mod common;

use std::time::Duration;

use common::{connect, start_server, within};
use futures_util::FutureExt;
use latchkey_client::protocol::{
    node_name, Create, Data, MultiOp, MultiResult, NodeKind, WatchEventKind,
};
use latchkey_client::{ClientError, CreateOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_names_strictly_increase_and_never_repeat_after_deletes() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    client
        .create("/q", "", CreateOptions::persistent())
        .await
        .unwrap();
    let mut names = Vec::new();
    for round in 0..3 {
        let mut created = Vec::new();
        for _ in 0..4 {
            let node = client
                .create("/q/job-", "", CreateOptions::persistent().sequential())
                .await
                .unwrap();
            created.push(node.path);
        }
        // Delete all but, in the first round, nothing survives: the counter
        // must still not reuse a name.
        for path in &created {
            if round < 2 {
                client.delete(path, None).await.unwrap();
            }
        }
        names.extend(created.iter().map(|p| node_name(p).to_string()));
    }
    assert!(
        names.iter().all(|n| n.starts_with("job-") && n.len() == 14),
        "{names:?}"
    );
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_version_gets_bad_version() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let created = client
        .create("/cfg", "v0", CreateOptions::persistent())
        .await
        .unwrap();
    assert_eq!(created.stat.version, 0);
    let stat = client.set("/cfg", "v1", Some(0)).await.unwrap();
    assert_eq!(stat.version, 1);
    let err = client.set("/cfg", "v2", Some(0)).await.unwrap_err();
    assert!(matches!(err, ClientError::BadVersion { .. }), "{err}");
    let err = client.delete("/cfg", Some(0)).await.unwrap_err();
    assert!(matches!(err, ClientError::BadVersion { .. }), "{err}");
    assert_eq!(client.get("/cfg").await.unwrap().0, b"v1");
    client.delete("/cfg", Some(1)).await.unwrap();
    assert_eq!(client.exists("/cfg").await.unwrap(), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_case_the_caller_must_handle() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    assert!(matches!(
        client.get("/missing").await,
        Err(ClientError::NoNode { .. })
    ));
    client
        .create("/p", "", CreateOptions::persistent())
        .await
        .unwrap();
    assert!(matches!(
        client.create("/p", "", CreateOptions::persistent()).await,
        Err(ClientError::NodeExists { .. })
    ));
    client
        .create("/p/c", "", CreateOptions::persistent())
        .await
        .unwrap();
    assert!(matches!(
        client.delete("/p", None).await,
        Err(ClientError::NotEmpty { .. })
    ));
    client
        .create("/eph", "", CreateOptions::ephemeral())
        .await
        .unwrap();
    assert!(matches!(
        client
            .create("/eph/c", "", CreateOptions::persistent())
            .await,
        Err(ClientError::NoChildrenForEphemerals { .. })
    ));
    assert!(matches!(
        client.get("/a//b").await,
        Err(ClientError::InvalidPath { .. })
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_is_all_or_nothing() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let create = |path: &str| {
        MultiOp::Create(Create {
            path: path.into(),
            data: Data::from("x"),
            ..Create::default()
        })
    };
    let err = client
        .multi(vec![
            create("/m"),
            create("/m/a"),
            MultiOp::Check {
                path: "/nowhere".into(),
                version: Some(0),
                czxid: None,
            },
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::NoNode { .. }), "{err}");
    assert!(
        err.to_string().contains('2'),
        "the failing step is named: {err}"
    );
    assert_eq!(client.exists("/m").await.unwrap(), None, "nothing applied");

    let results = client
        .multi(vec![
            create("/m"),
            create("/m/a"),
            MultiOp::Set {
                path: "/m".into(),
                data: Data::from("y"),
                version: Some(0),
                czxid: None,
            },
            MultiOp::Check {
                path: "/m".into(),
                version: Some(1),
                czxid: None,
            },
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert!(matches!(&results[1], MultiResult::Created { path, .. } if path == "/m/a"));
    assert_eq!(results[3], MultiResult::Checked);
    assert_eq!(client.get("/m").await.unwrap().0, b"y");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_parents_vanish_with_their_last_child() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let lock = client
        .create(
            "/locks/order-42/lock-",
            "",
            CreateOptions::ephemeral().sequential().make_parents(),
        )
        .await
        .unwrap();
    let (stat, parent_gone) = client.exists_watch("/locks/order-42").await.unwrap();
    assert_eq!(stat.unwrap().kind, NodeKind::Container);
    client.delete(&lock.path, None).await.unwrap();
    let event = within("the container's removal", parent_gone)
        .await
        .unwrap();
    assert_eq!(event.kind, WatchEventKind::NodeDeleted);
    assert_eq!(client.exists("/locks/order-42").await.unwrap(), None);
    // Its container parent had that one child and goes too.
    let (stat, locks_gone) = client.exists_watch("/locks").await.unwrap();
    if stat.is_some() {
        within("the grandparent's removal", locks_gone)
            .await
            .unwrap();
    }
    assert_eq!(client.exists("/locks").await.unwrap(), None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_nodes_expire_and_a_set_renews_them() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let created = client
        .create(
            "/hold/seat-1",
            "buyer-7",
            CreateOptions::persistent()
                .ttl(Duration::from_millis(400))
                .make_parents(),
        )
        .await
        .unwrap();
    assert_eq!(created.stat.ttl_ms, Some(400));
    let (_, gone) = client.exists_watch("/hold/seat-1").await.unwrap();
    let event = within("the TTL expiry", gone).await.unwrap();
    assert_eq!(event.kind, WatchEventKind::NodeDeleted);
    assert!(matches!(
        client.get("/hold/seat-1").await,
        Err(ClientError::NoNode { .. })
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_event_arrives_before_any_later_reply_reflecting_the_change() {
    let server = start_server().await;
    let watcher = connect(server.addr()).await;
    let writer = connect(server.addr()).await;
    writer
        .create("/x", "1", CreateOptions::persistent())
        .await
        .unwrap();
    for round in 0..50u32 {
        let (_, _, changed) = watcher.get_watch("/x").await.unwrap();
        let value = (round + 2).to_string();
        writer.set("/x", value.as_str(), None).await.unwrap();
        // The watcher's next read reflects the set, so the event must have
        // been delivered already.
        let (data, _) = watcher.get("/x").await.unwrap();
        assert_eq!(data, value.as_bytes());
        let event = changed
            .now_or_never()
            .expect("the event was delivered before the reply")
            .unwrap();
        assert_eq!(event.kind, WatchEventKind::NodeDataChanged);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_are_one_shot_and_report_children_and_creation() {
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let (stat, created) = client.exists_watch("/w").await.unwrap();
    assert!(stat.is_none());
    client
        .create("/w", "", CreateOptions::persistent())
        .await
        .unwrap();
    assert_eq!(
        within("created", created).await.unwrap().kind,
        WatchEventKind::NodeCreated
    );

    let (_, _, children) = client.children_watch("/w").await.unwrap();
    client
        .create("/w/a", "", CreateOptions::persistent())
        .await
        .unwrap();
    let event = within("children changed", children).await.unwrap();
    assert_eq!(event.kind, WatchEventKind::NodeChildrenChanged);
    assert_eq!(event.path, "/w");

    // Fired once: a second change without re-arming reaches nobody, shown by
    // a fresh watch seeing only the change after it.
    client
        .create("/w/b", "", CreateOptions::persistent())
        .await
        .unwrap();
    let (_, _, again) = client.children_watch("/w").await.unwrap();
    client.delete("/w/a", None).await.unwrap();
    let event = within("the second change", again).await.unwrap();
    assert_eq!(event.kind, WatchEventKind::NodeChildrenChanged);
    server.stop().await;
}

/// A listing comes in pages of at most the server's page size, from any
/// client; our client reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_come_in_pages_and_the_client_reads_every_one() {
    use latchkey_client::protocol::{ErrorCode, OpResult};
    let server = start_server().await;
    let client = connect(server.addr()).await;
    let total = 2_500usize;
    let ops: Vec<MultiOp> = (0..total)
        .map(|i| {
            MultiOp::Create(Create {
                path: format!("/many/n{i:05}"),
                make_parents: true,
                ..Create::default()
            })
        })
        .collect();
    for chunk in ops.chunks(1_000) {
        client.multi(chunk.to_vec()).await.unwrap();
    }
    let (children, stat) = client.children("/many").await.unwrap();
    assert_eq!(children.len(), total);
    assert!(children.windows(2).all(|w| w[0] < w[1]), "sorted");
    assert_eq!(stat.num_children, 2_500);

    let mut raw = common::Raw::session(server.addr()).await;
    let page = |reply: latchkey_client::protocol::Reply| match reply.result {
        Ok(OpResult::Children { children, more, .. }) => (children, more),
        other => panic!("a listing answered {other:?}"),
    };
    let (first, more) = page(
        raw.request(1, serde_json::json!({"children": {"path": "/many"}}))
            .await,
    );
    assert_eq!((first.len(), more), (1_000, true), "the server's page size");
    let (next, more) = page(
        raw.request(
            2,
            serde_json::json!({"children": {"path": "/many", "after": first[999], "limit": 5}}),
        )
        .await,
    );
    assert_eq!(next, ["n01000", "n01001", "n01002", "n01003", "n01004"]);
    assert!(more);
    let (last, more) = page(
        raw.request(
            3,
            serde_json::json!({"children": {"path": "/many", "after": "n02497"}}),
        )
        .await,
    );
    assert_eq!(
        (last, more),
        (vec!["n02498".into(), "n02499".into()], false)
    );
    let reply = raw
        .request(
            4,
            serde_json::json!({"children": {"path": "/many", "limit": 0}}),
        )
        .await;
    assert_eq!(
        reply.result.map_err(|e| e.code),
        Err(ErrorCode::InvalidArgument)
    );
    server.stop().await;
}
