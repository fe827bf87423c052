//! A TCP proxy that misbehaves on demand, placed between a replica and Redis, NATS or the
//! upstream.
//!
//! ```ignore
//! let redis = TestRedis::start().await;
//! let link = FaultProxy::start(redis.addr()).await;   // point the replica at link.addr()
//! link.set(Fault::Latency(50 * MS));                  // every chunk, each way, 50 ms late
//! link.cut();                                         // close everything, refuse new clients
//! link.restore();                                     // pass again
//! ```
//!
//! A fault applies at once to the connections already open and to every new one. Dropping the
//! proxy closes its listener and ends every connection task; each connection holds at most one
//! [`CHUNK`] per direction in memory.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Bytes read from one side before they are written to the other: the most one direction of one
/// connection holds in memory.
pub const CHUNK: usize = 16 * 1024;

/// Longest wait for the connection to the target of a newly accepted client; past it the client
/// is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause after a failed accept before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// How the proxy treats traffic; switched at runtime with [`FaultProxy::set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes (the default).
    Pass,
    /// Hold every chunk this long before forwarding it, in each direction.
    Latency(Duration),
    /// Accept, read nothing and forward nothing: connections stay open and silent. Bytes already
    /// sent wait in the kernel's buffers and flow again when the fault is lifted.
    BlackHole,
    /// Reset every connection (SO_LINGER 0, then close: an RST to both sides), and every new
    /// client as soon as it is accepted.
    Reset,
    /// Close each connection (FIN to both sides) once this many bytes have passed through it,
    /// both directions together, counted from its start.
    CloseAfter(u64),
    /// Close every connection, and every new client as soon as it is accepted.
    Cut,
}

/// A running proxy in front of one target address.
pub struct FaultProxy {
    addr: SocketAddr,
    faults: watch::Sender<Fault>,
    /// The accept loop, which owns every connection task: aborting it ends them all.
    accept: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// Listens on an ephemeral loopback port and forwards to `target`, passing traffic until told
    /// otherwise.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("fault proxy local_addr");
        let (faults, _) = watch::channel(Fault::Pass);
        let accept = tokio::spawn(accept_loop(listener, target, faults.subscribe()));
        FaultProxy {
            addr,
            faults,
            accept,
        }
    }

    /// Where clients connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the behaviour for open and new connections alike.
    pub fn set(&self, fault: Fault) {
        self.faults.send_replace(fault);
    }

    /// The current behaviour.
    pub fn fault(&self) -> Fault {
        *self.faults.borrow()
    }

    /// [`Fault::Cut`]: closes every connection and every new client.
    pub fn cut(&self) {
        self.set(Fault::Cut);
    }

    /// [`Fault::Pass`] again.
    pub fn restore(&self) {
        self.set(Fault::Pass);
    }
}

// --------------------------------------------------------------- connections ----

async fn accept_loop(listener: TcpListener, target: SocketAddr, faults: watch::Receiver<Fault>) {
    // Dropped with this task, which aborts every connection still running.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    connections.spawn(connection(client, target, faults.clone()));
                }
                Err(error) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "fault proxy: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reaps finished connections so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// How a connection is ended by a fault.
enum Ending {
    /// FIN to both sides.
    Close,
    /// RST to both sides.
    Reset,
}

/// Resolves when the fault calls for ending every connection (or the proxy is gone).
async fn ending(mut faults: watch::Receiver<Fault>) -> Ending {
    loop {
        match *faults.borrow_and_update() {
            Fault::Cut => return Ending::Close,
            Fault::Reset => return Ending::Reset,
            _ => {}
        }
        if faults.changed().await.is_err() {
            return Ending::Close;
        }
    }
}

/// Waits while the fault is [`Fault::BlackHole`]; an error once the proxy is gone.
async fn while_black_holed(faults: &mut watch::Receiver<Fault>) -> io::Result<()> {
    faults
        .wait_for(|fault| *fault != Fault::BlackHole)
        .await
        .map(|_| ())
        .map_err(|_| io::Error::other("the fault proxy stopped"))
}

async fn connection(mut client: TcpStream, target: SocketAddr, faults: watch::Receiver<Fault>) {
    // A black-holed client is accepted and never answered; the target is not even dialled.
    let dial = async {
        while_black_holed(&mut faults.clone()).await?;
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
            .await
            .map_err(|_| io::Error::other("connecting to the target timed out"))?
    };
    let dialled = tokio::select! {
        dialled = dial => dialled,
        why = ending(faults.clone()) => {
            end(&client, None, why);
            return;
        }
    };
    let Ok(mut upstream) = dialled else {
        return;
    };
    let why = {
        let forwarded = AtomicU64::new(0);
        let (client_read, client_write) = client.split();
        let (target_read, target_write) = upstream.split();
        // Whatever ends one direction with an error ends the other: no half-open leftovers.
        let forwarding = async {
            tokio::try_join!(
                pump(client_read, target_write, faults.clone(), &forwarded),
                pump(target_read, client_write, faults.clone(), &forwarded),
            )
        };
        tokio::select! {
            _ = forwarding => Ending::Close,
            why = ending(faults.clone()) => why,
        }
    };
    end(&client, Some(&upstream), why);
}

/// Prepares the sockets for `why`; the caller's dropping them then sends the FIN or RST.
fn end(client: &TcpStream, upstream: Option<&TcpStream>, why: Ending) {
    if let Ending::Reset = why {
        for stream in std::iter::once(client).chain(upstream) {
            let _ = stream.set_zero_linger();
        }
    }
}

/// Copies `from` to `to` chunk by chunk under the current fault; `forwarded` counts the bytes of
/// both directions of this connection for [`Fault::CloseAfter`].
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut faults: watch::Receiver<Fault>,
    forwarded: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        while_black_holed(&mut faults).await?;
        let read = tokio::select! {
            read = from.read(&mut buf) => read?,
            // Re-checks the fault (a black hole stops reading at once).
            changed = faults.changed() => {
                changed.map_err(|_| io::Error::other("the fault proxy stopped"))?;
                continue;
            }
        };
        if read == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // A chunk read just before a black hole is held, not delivered.
        while_black_holed(&mut faults).await?;
        let fault = *faults.borrow();
        match fault {
            Fault::Latency(delay) => {
                tokio::time::sleep(delay).await;
                to.write_all(&buf[..read]).await?;
            }
            Fault::CloseAfter(limit) => {
                let before = forwarded.fetch_add(read as u64, Ordering::SeqCst);
                let allowed = limit.saturating_sub(before).min(read as u64) as usize;
                to.write_all(&buf[..allowed]).await?;
                if before + read as u64 >= limit {
                    return Err(io::Error::other("closed after the byte limit"));
                }
            }
            _ => {
                forwarded.fetch_add(read as u64, Ordering::SeqCst);
                to.write_all(&buf[..read]).await?;
            }
        }
    }
}
