//! Buyers race for seats with timed holds. A hold that is paid for becomes
//! a sale; one that is not expires at its TTL, and the seat goes to the next
//! buyer who was waiting for it.
//!
//! Run against a local server:
//!   cargo run --release -- serve              # in one terminal
//!   cargo run --example ticket_hold           # in another

use std::time::Duration;

use latchkey_client::protocol::{Create, Data, MultiOp, WatchEventKind};
use latchkey_client::recipes::{Hold, HoldToken};
use latchkey_client::{Client, ClientError, ClientOptions, CreateOptions};

/// Short, so the demo does not take ten minutes.
const HOLD_TTL: Duration = Duration::from_secs(2);
const SEATS: [&str; 3] = ["seat-1A", "seat-1B", "seat-1C"];

/// Pays for a held seat: the sale is recorded and the hold ended in one
/// multi, which fails if the hold is no longer the one the token names.
async fn pay(
    payments: &Client,
    base: &str,
    seat: &str,
    buyer: &str,
    token: HoldToken,
) -> Result<(), ClientError> {
    let hold = format!("{base}/holds/{seat}");
    payments
        .multi(vec![
            MultiOp::Check {
                path: hold.clone(),
                version: None,
                czxid: Some(token.0),
            },
            MultiOp::Create(Create {
                path: format!("{base}/sold/{seat}"),
                data: Data::from(buyer),
                ..Create::default()
            }),
            MultiOp::Delete {
                path: hold,
                version: None,
                czxid: Some(token.0),
            },
        ])
        .await?;
    println!("{buyer} paid: {seat} is sold to {buyer}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let server = std::env::var("LATCHKEY_SERVER").unwrap_or_else(|_| "127.0.0.1:7878".into());
    let base = format!("/demo/tickets-{}", std::process::id());
    let connect = || Client::connect(ClientOptions::new(server.clone()));
    let payments = connect().await?;
    payments
        .create(
            &format!("{base}/sold"),
            "",
            CreateOptions::persistent().make_parents(),
        )
        .await?;

    // Five buyers, three seats: each buyer holds the first seat it can.
    let mut buyers = Vec::new();
    for n in 1..=5 {
        buyers.push((format!("buyer-{n}"), connect().await?));
    }
    let mut holds = Vec::new();
    let mut waiting = Vec::new();
    for (buyer, client) in &buyers {
        let mut got = None;
        for seat in SEATS {
            let path = format!("{base}/holds/{seat}");
            match Hold::take(client, &path, HOLD_TTL, buyer.as_str()).await {
                Ok(token) => {
                    println!("{buyer} holds {seat} (token {}) for {HOLD_TTL:?}", token.0);
                    got = Some((seat, token));
                    break;
                }
                Err(ClientError::Held { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        match got {
            Some(hold) => holds.push((buyer.clone(), hold)),
            None => {
                println!("{buyer}: every seat is held; waiting for one to come free");
                waiting.push(buyer.clone());
            }
        }
    }

    // The first two pay; the third walks away and its hold runs out.
    for (buyer, (seat, token)) in holds.iter().take(2) {
        pay(&payments, &base, seat, buyer, *token).await?;
    }
    let Some((quitter, (seat, _))) = holds.get(2) else {
        return Ok(());
    };
    println!("{quitter} leaves without paying for {seat}");

    // The next buyer waits for that hold to end, then takes the seat.
    let next = waiting.first().cloned().unwrap_or_default();
    let client = &buyers
        .iter()
        .find(|(b, _)| *b == next)
        .map(|(_, c)| c.clone())
        .unwrap_or_else(|| payments.clone());
    let hold_path = format!("{base}/holds/{seat}");
    let (stat, gone) = client.exists_watch(&hold_path).await?;
    if stat.is_some() {
        let event = gone.await?;
        assert_eq!(event.kind, WatchEventKind::NodeDeleted);
        println!("the hold on {seat} expired");
    }
    let token = Hold::take(client, &hold_path, HOLD_TTL, next.as_str()).await?;
    println!("{next} holds {seat} (token {})", token.0);
    pay(&payments, &base, seat, &next, token).await?;

    // Every seat sold once, to the buyer who held it when paying.
    let (sold, _) = payments.children(&format!("{base}/sold")).await?;
    println!("sold: {}", sold.join(", "));
    assert_eq!(sold.len(), SEATS.len());
    for (_, client) in &buyers {
        client.close().await?;
    }
    payments.close().await?;
    Ok(())
}
