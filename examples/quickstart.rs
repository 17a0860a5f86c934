//! The README's client example: a session, an ephemeral sequential node
//! under a container parent, a watch, and the session's status.
//!
//! Run against a local server:
//!   cargo run --release -- serve            # in one terminal
//!   cargo run --example quickstart          # in another

use std::time::Duration;

use latchkey_client::{Client, ClientError, ClientOptions, CreateOptions};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let server = std::env::var("LATCHKEY_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    let client =
        Client::connect(ClientOptions::new(server).session_timeout(Duration::from_secs(10)))
            .await?;

    // Join a queue: an ephemeral sequential node under a container parent.
    // The parent is created if missing and vanishes with its last child.
    let me = client
        .create(
            "/locks/order-42/lock-",
            "worker-1",
            CreateOptions::ephemeral().sequential().make_parents(),
        )
        .await?;
    println!("queued as {} (fencing token {})", me.path, me.stat.czxid);

    // Who is ahead of us? Watch only the node just before ours.
    let (mut queue, _) = client.children("/locks/order-42").await?;
    queue.sort();
    let mine = me.path.rsplit('/').next().unwrap_or_default();
    match queue.iter().position(|name| name == mine) {
        Some(0) | None => println!("first in line: the lock is ours"),
        Some(i) => {
            let ahead = format!("/locks/order-42/{}", queue[i - 1]);
            let (stat, gone) = client.exists_watch(&ahead).await?;
            if stat.is_some() {
                println!("waiting for {ahead}");
                let event = gone.await?;
                println!("{} {}", event.kind, event.path);
            }
        }
    }

    // Where the session stands, and the client's conservative lease end.
    let status = *client.session_status().borrow();
    let left = status
        .lease_end
        .saturating_duration_since(tokio::time::Instant::now());
    println!(
        "session {} is {:?}; lease good for {left:?} more",
        status.session_id, status.state
    );

    // Deletes our ephemeral node at once; the container parent follows.
    client.close().await?;
    Ok(())
}
