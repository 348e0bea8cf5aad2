//! Several processes as one timely cluster: every process runs the same pipeline with the same
//! number of worker threads, and the workers of all processes form one dataflow (device state
//! sharded over all of them by the device route, Kafka partitions spread over all of them).
//!
//! The connections are made here rather than by timely's own start-up, which retries forever
//! and prints to stdout: process `i` connects to every process before it and accepts one
//! connection from every process after it (timely's handshake: the connecting process sends
//! its index as a big-endian `u64`), waiting at most `connect_timeout` and logging which
//! processes it still waits for. The sockets then go to timely's
//! `initialize_networking_from_sockets`.

use std::any::Any;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use timely::communication::allocator::AllocatorBuilder;
use timely::communication::allocator::ProcessBuilder;
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;

/// Where this process stands in a cluster of processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// This process's index, `0 .. addresses.len()`.
    pub process: usize,
    /// `host:port` of every process, in index order (the same list in every process).
    pub addresses: Vec<String>,
    /// How long start-up waits for the other processes.
    pub connect_timeout: Duration,
}

/// Why the cluster could not be formed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The options do not describe a cluster.
    #[error("{0}")]
    Invalid(String),
    /// Some processes did not connect in time.
    #[error(
        "process {process}: processes {missing:?} did not connect within {timeout:?} (is each one started with the same --peers?)"
    )]
    Missing {
        /// This process.
        process: usize,
        /// The processes that never connected.
        missing: Vec<usize>,
        /// How long it waited.
        timeout: Duration,
    },
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

impl Cluster {
    /// A cluster description, checked: at least one address, `process` among them.
    pub fn new(
        process: usize,
        addresses: Vec<String>,
        connect_timeout: Duration,
    ) -> Result<Cluster, ClusterError> {
        if addresses.is_empty() {
            return Err(ClusterError::Invalid(
                "a cluster needs the address of every process".into(),
            ));
        }
        if process >= addresses.len() {
            return Err(ClusterError::Invalid(format!(
                "process index {process} is not below the number of processes ({})",
                addresses.len()
            )));
        }
        Ok(Cluster { process, addresses, connect_timeout })
    }

    /// The number of processes.
    pub fn processes(&self) -> usize {
        self.addresses.len()
    }

    /// One socket per other process (`None` at this process's own index).
    fn sockets(&self) -> Result<Vec<Option<TcpStream>>, ClusterError> {
        let deadline = Instant::now() + self.connect_timeout;
        let me = self.process;
        let listener = TcpListener::bind(&self.addresses[me])
            .map_err(io(format!("cannot listen on {}", self.addresses[me])))?;
        listener.set_nonblocking(true).map_err(io("listener"))?;
        let mut sockets: Vec<Option<TcpStream>> = (0..self.processes()).map(|_| None).collect();
        let mut last_report = Instant::now();
        loop {
            // Connect to the processes before this one.
            for (index, address) in self.addresses.iter().enumerate().take(me) {
                if sockets[index].is_some() {
                    continue;
                }
                let Some(target) = address.to_socket_addrs().ok().and_then(|mut all| all.next())
                else {
                    continue;
                };
                if let Ok(mut stream) =
                    TcpStream::connect_timeout(&target, Duration::from_millis(500))
                {
                    stream.set_nodelay(true).map_err(io("nodelay"))?;
                    stream
                        .write_all(&(me as u64).to_be_bytes())
                        .map_err(io(format!("handshake with process {index}")))?;
                    tracing::info!(process = me, peer = index, %address, "connected to a peer");
                    sockets[index] = Some(stream);
                }
            }
            // Accept the processes after this one.
            loop {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).map_err(io("accepted socket"))?;
                        stream.set_nodelay(true).map_err(io("nodelay"))?;
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .map_err(io("accepted socket"))?;
                        let mut index = [0_u8; 8];
                        if stream.read_exact(&mut index).is_err() {
                            continue;
                        }
                        stream.set_read_timeout(None).map_err(io("accepted socket"))?;
                        let index = u64::from_be_bytes(index) as usize;
                        if index <= me || index >= self.processes() {
                            tracing::warn!(
                                process = me,
                                claimed = index,
                                "a connection claimed an impossible process index; closed"
                            );
                            continue;
                        }
                        tracing::info!(process = me, peer = index, "a peer connected");
                        sockets[index] = Some(stream);
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(error) => return Err(io("accepting peers")(error)),
                }
            }
            let missing: Vec<usize> = (0..self.processes())
                .filter(|index| *index != me && sockets[*index].is_none())
                .collect();
            if missing.is_empty() {
                return Ok(sockets);
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Missing {
                    process: me,
                    missing,
                    timeout: self.connect_timeout,
                });
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                let waiting: Vec<&str> =
                    missing.iter().map(|index| self.addresses[*index].as_str()).collect();
                tracing::info!(process = me, missing = ?missing, addresses = ?waiting, "waiting for peers");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Connects the cluster and returns timely's allocators for `threads` workers in this
    /// process, and the guard of its network threads.
    pub(crate) fn allocators(
        &self,
        threads: usize,
    ) -> Result<(Vec<AllocatorBuilder>, Box<dyn Any + Send>), ClusterError> {
        let sockets = self.sockets()?;
        let hooks = timely::communication::Hooks::default();
        let process_allocators =
            ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
        let (builders, guard) = initialize_networking_from_sockets(
            process_allocators,
            sockets,
            self.process,
            threads,
            hooks,
        )
        .map_err(io("starting the cluster's network threads"))?;
        Ok((builders.into_iter().map(AllocatorBuilder::Tcp).collect(), Box::new(guard)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_description_is_checked() {
        assert!(Cluster::new(0, Vec::new(), Duration::from_secs(1)).is_err());
        assert!(Cluster::new(2, vec!["a:1".into(), "b:2".into()], Duration::from_secs(1)).is_err());
        let cluster = Cluster::new(1, vec!["a:1".into(), "b:2".into()], Duration::from_secs(1))
            .expect("valid");
        assert_eq!(cluster.processes(), 2);
    }

    #[test]
    fn a_missing_peer_is_named_after_the_timeout() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let cluster = Cluster::new(
            0,
            vec![format!("127.0.0.1:{port}"), "127.0.0.1:9".into()],
            Duration::from_millis(300),
        )
        .expect("valid");
        match cluster.sockets() {
            Err(ClusterError::Missing { missing, .. }) => assert_eq!(missing, vec![1]),
            other => panic!("expected the missing peer, got {other:?}"),
        }
    }
}
