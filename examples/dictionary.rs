//! Build once, read many: three replicas of one dictionary, a stampede of callers, one build.
//!
//! Run with:
//!
//! ```sh
//! cargo run --example dictionary                                   # in-process memory backend
//! cargo run --example dictionary -- --redis redis://127.0.0.1:6379/
//! cargo run --example dictionary -- --redis redis://127.0.0.1:6379/ --nats nats://127.0.0.1:4222
//! cargo run --example dictionary -- --nats-kv nats://127.0.0.1:4222  # NATS only (2.11+, JetStream)
//! cargo run --no-default-features --example dictionary            # the library alone: no server
//! ```
//!
//! A library user takes `corral = { version = "...", default-features = false }` and adds the
//! features of the backends it uses (`redis`, `nats`); the memory backend needs none.
//!
//! With `--redis` or `--nats-kv`, start it several times at once: the processes coalesce with each
//! other too, and only one of them prints that it built the report.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use corral::{Backend, BusConfig, Dictionary, DictionaryConfig, Expiry, StoreConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let backend = match (flag("--redis"), flag("--nats"), flag("--nats-kv")) {
        (None, _, Some(nats)) => Backend::nats_kv(nats),
        (None, _, None) => Backend::memory(),
        (Some(redis), None, _) => Backend::redis(redis),
        (Some(redis), Some(nats), _) => Backend::new(
            StoreConfig::Redis { url: redis },
            BusConfig::Nats { url: nats },
        ),
    };

    let config = DictionaryConfig::new("reports", Expiry::Absolute(Duration::from_secs(30)));
    let mut replicas: Vec<Dictionary<String, String>> = Vec::new();
    for _ in 0..3 {
        replicas.push(Dictionary::open(config.clone(), &backend).await?);
    }

    let builds = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for i in 0..300 {
        let replica = replicas[i % 3].clone();
        let builds = builds.clone();
        callers.push(tokio::spawn(async move {
            let build = move || {
                let builds = builds.clone();
                async move {
                    builds.fetch_add(1, Ordering::SeqCst);
                    println!("building the report (slow)...");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Ok::<_, String>("quarterly report".to_string())
                }
            };
            replica
                .build_or_retrieve(&"2024-q1".to_string(), build, Duration::from_secs(5))
                .await
        }));
    }
    let mut answered = 0;
    for caller in callers {
        caller.await??;
        answered += 1;
    }
    println!(
        "{answered} callers answered, {} build(s) in this process",
        builds.load(Ordering::SeqCst)
    );
    println!(
        "status: {:?}",
        replicas[0].status(&"2024-q1".to_string()).await?
    );
    for replica in &replicas {
        replica.close().await;
    }
    Ok(())
}
