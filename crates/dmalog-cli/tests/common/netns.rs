//! A real (virtual) network for tests across hosts: a source network namespace joined to
//! one or more destination namespaces by veth pairs, each link shaped with `tc tbf`, 1% of
//! its packets dropped with iptables' `statistic` match, and a relay in the destination's
//! namespace that delays each direction (the kernels here have no netem) and injects
//! faults at a chosen point of the stream.
//!
//! Names are unique per process and per network (tests run in parallel, and in other
//! worktrees at the same time); everything is removed on drop, and namespaces left by a
//! test process that was killed are removed by the next one.

#![allow(dead_code)]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Every name this file makes starts with this (and the pid of the test process).
const PREFIX: &str = "dlnf";
/// How long a relay waits for its one connection, and any of its reads or writes: a hang
/// guard, not a speed check.
const RELAY_GUARD: Duration = Duration::from_secs(120);

/// Runs `program args`; its stderr as the error when it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("{program}: {err}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("{program}: {err}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    fn add(name: String) -> Result<Self, String> {
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME args`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run("ip", &[&["-n", &self.name], args].concat())
    }

    /// `ip netns exec NAME program args` (the program replaces `ip`: its pid is the
    /// child's).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<(), String> {
        run(
            "ip",
            &[&["netns", "exec", &self.name, program], args].concat(),
        )
    }

    /// A command that runs `program` in this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name])
            .arg(program.as_ref());
        command
    }

    /// Runs `f` on a thread inside this namespace: sockets it creates belong to it.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|err| panic!("{path}: {err}"));
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap_or_else(|err| panic!("setns {path}: {err}"));
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Its veth ends go with it (and the peers in other namespaces with them).
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Why a link drops no packets, or `None` when it drops 1% each way.
pub type LossUnavailable = Option<String>;

/// A destination host: its namespace and address, and the veth end on the source's side.
pub struct Host {
    pub ns: Netns,
    pub address: Ipv4Addr,
    /// The source-side veth of this host's link, in the source namespace.
    pub source_veth: String,
    source_ns: String,
}

impl Host {
    /// Cuts this host's link (the source's veth end down): packets go nowhere, no
    /// connection is told.
    pub fn cut(&self) -> Result<(), String> {
        run(
            "ip",
            &[
                "-n",
                &self.source_ns,
                "link",
                "set",
                &self.source_veth,
                "down",
            ],
        )
    }

    /// A function that cuts this host's link, for a relay's trigger.
    pub fn cutter(&self) -> impl Fn() + Send + 'static {
        let (ns, veth) = (self.source_ns.clone(), self.source_veth.clone());
        move || run("ip", &["-n", &ns, "link", "set", &veth, "down"]).expect("cutting the link")
    }
}

/// The source namespace and its destination hosts. Host `k` (from 1) is 10.0.k.2, its
/// link's source end 10.0.k.1.
pub struct Network {
    pub hosts: Vec<Host>,
    pub source: Netns,
    /// `None`: every link drops 1% of its packets each way.
    pub loss_unavailable: LossUnavailable,
}

/// How each link is shaped.
#[derive(Clone, Copy)]
pub struct Shape {
    /// tbf rate, Mbit/s, each way.
    pub rate_mbit: u32,
    /// Whether 1% of packets are dropped each way (when iptables is there).
    pub loss: bool,
}

/// Whether namespaces can be made here: `None` if so, else why not.
fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    if let Err(err) = output("ip", &["-V"]) {
        return Some(format!("no `ip` command (iproute2): {err}"));
    }
    None
}

/// Removes namespaces this file made in test processes that are gone (killed before
/// their drops ran).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}

impl Network {
    /// A source namespace with `hosts` destination namespaces, each joined to it by its own
    /// shaped veth pair. `Err` says why namespaces cannot be made here (the test skips).
    pub fn new(hosts: usize, shape: Shape) -> Result<Network, String> {
        if let Some(why) = unavailable() {
            return Err(why);
        }
        remove_stale();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // At most 15 bytes for a link name: "dlnf" + pid (7) + "x" + n + host + side.
        let tag = format!("{PREFIX}{}x{n}", std::process::id());
        let source = Netns::add(format!("{tag}s"))?;
        let iptables = output("iptables", &["--version"]).is_ok();
        let mut loss_unavailable =
            (!shape.loss)
                .then(|| "not asked for".to_string())
                .or_else(|| {
                    (!iptables).then(|| {
                        "iptables is not installed (`apt-get install iptables`; \
                     ./scripts/test.sh installs it when run as root)"
                            .to_string()
                    })
                });
        let mut made = Vec::new();
        for k in 1..=hosts {
            let ns = Netns::add(format!("{tag}h{k}"))?;
            let (a, b) = (format!("{tag}{k}a"), format!("{tag}{k}b"));
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &a,
                    "netns",
                    &source.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &b,
                    "netns",
                    &ns.name,
                ],
            )?;
            let address = Ipv4Addr::new(10, 0, k as u8, 2);
            source.ip(&["addr", "add", &format!("10.0.{k}.1/24"), "dev", &a])?;
            ns.ip(&["addr", "add", &format!("{address}/24"), "dev", &b])?;
            for (side, dev) in [(&source, &a), (&ns, &b)] {
                // One MTU-sized packet per skb: the 1% drop is of packets, as on a wire,
                // not of 64 KiB GSO bundles.
                side.ip(&["link", "set", dev, "gso_max_segs", "1", "up"])?;
                let rate = format!("{}mbit", shape.rate_mbit);
                run(
                    "tc",
                    &[
                        "-n", &side.name, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate,
                        "burst", "64kb", "latency", "50ms",
                    ],
                )?;
                if loss_unavailable.is_none() {
                    if let Err(err) = side.exec(
                        "iptables",
                        &[
                            "-A",
                            "OUTPUT",
                            "-o",
                            dev,
                            "-m",
                            "statistic",
                            "--mode",
                            "random",
                            "--probability",
                            "0.01",
                            "-j",
                            "DROP",
                        ],
                    ) {
                        loss_unavailable = Some(err);
                    }
                }
            }
            made.push(Host {
                ns,
                address,
                source_veth: a,
                source_ns: source.name.clone(),
            });
        }
        Ok(Network {
            hosts: made,
            source,
            loss_unavailable,
        })
    }

    /// Packets the loss rules dropped on every link, both ways.
    pub fn dropped_packets(&self) -> u64 {
        std::iter::once(&self.source)
            .chain(self.hosts.iter().map(|h| &h.ns))
            .filter_map(|ns| {
                output(
                    "ip",
                    &[
                        "netns", "exec", &ns.name, "iptables", "-L", "OUTPUT", "-v", "-n", "-x",
                    ],
                )
                .ok()
            })
            .flat_map(|listing| {
                listing
                    .lines()
                    .filter(|line| line.contains("DROP") && line.contains("statistic"))
                    .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Times tbf held packets back (its "overlimits") on the source ends: the rate cap
    /// was reached.
    pub fn shaped_events(&self) -> u64 {
        self.hosts
            .iter()
            .filter_map(|host| {
                output(
                    "tc",
                    &[
                        "-n",
                        &self.source.name,
                        "-s",
                        "qdisc",
                        "show",
                        "dev",
                        &host.source_veth,
                    ],
                )
                .ok()
            })
            .filter_map(|stats| {
                let at = stats.find("overlimits ")? + "overlimits ".len();
                stats[at..].split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

// Drop order matters little: deleting a namespace tears down its veth ends, and the
// peers with them.
impl Drop for Network {
    fn drop(&mut self) {
        self.hosts.clear();
    }
}

/// Says on the terminal (libtest captures only `print!`) that `what` did not run, and why.
pub fn say_skipped(what: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {why}");
}

/// What a relay does with the source's bytes: `None` forwards the chunk; `Some(n)`
/// forwards its first `n` bytes and nothing after (the connection is held open, silent).
pub type Watch = Box<dyn FnMut(&[u8]) -> Option<usize> + Send>;

/// Forwards everything.
pub fn forward_all() -> Watch {
    Box::new(|_| None)
}

/// Runs `action` once `after_bytes` have come from the source, and forwards everything.
pub fn after_bytes(after_bytes: u64, action: impl FnOnce() + Send + 'static) -> Watch {
    let mut seen = 0u64;
    let mut action = Some(action);
    Box::new(move |chunk| {
        seen += chunk.len() as u64;
        if seen >= after_bytes {
            if let Some(action) = action.take() {
                action();
            }
        }
        None
    })
}

/// Finds the source's End frame in a plaintext migration stream (frame header: kind at
/// byte 6, payload length at bytes 8..12): runs `action` and holds everything from the
/// End frame on.
pub fn at_end_frame(action: impl FnOnce() + Send + 'static) -> Watch {
    let mut header = Vec::with_capacity(16);
    let mut payload_left = 0u64;
    let mut action = Some(action);
    Box::new(move |chunk| {
        let mut at = 0usize;
        // Where the current header began in this chunk (0: in an earlier one).
        let mut header_start = 0usize;
        while at < chunk.len() {
            if payload_left > 0 {
                let skip = payload_left.min((chunk.len() - at) as u64);
                payload_left -= skip;
                at += skip as usize;
                continue;
            }
            if header.is_empty() {
                header_start = at;
            }
            header.push(chunk[at]);
            at += 1;
            if header.len() == 16 {
                let kind = header[6];
                payload_left = u64::from(u32::from_le_bytes(header[8..12].try_into().unwrap()));
                header.clear();
                if kind == 4 {
                    if let Some(action) = action.take() {
                        action();
                    }
                    return Some(header_start);
                }
            }
        }
        None
    })
}

/// A relay in a host's namespace: listens on the host's address, forwards one connection
/// to `upstream` (in the same namespace) with `delay` added each way, and applies a watch
/// to the source's bytes. Stops (closing both sockets) on drop.
pub struct Relay {
    /// Where the source connects.
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Bytes forwarded from the source.
    pub forwarded: Arc<AtomicU64>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Relay {
    pub fn start(host: &Host, upstream: SocketAddr, delay: Duration, watch: Watch) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (address_tx, address_rx) = mpsc::channel();
        let listen = SocketAddr::from((host.address, 0));
        let (stop2, forwarded2) = (Arc::clone(&stop), Arc::clone(&forwarded));
        // Detached: it ends when stopped or when both connections end.
        drop(host.ns.within(move || {
            let listener = TcpListener::bind(listen).expect("relay bind");
            address_tx.send(listener.local_addr().unwrap()).unwrap();
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + RELAY_GUARD;
            let source = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {
                        if stop2.load(Ordering::SeqCst) || Instant::now() > deadline {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(err) => panic!("relay accept: {err}"),
                }
            };
            source.set_nonblocking(false).unwrap();
            let Ok(destination) = TcpStream::connect(upstream) else {
                return;
            };
            for s in [&source, &destination] {
                s.set_nodelay(true).unwrap();
            }
            let spawn_pump =
                |from: &TcpStream, to: &TcpStream, watch: Watch, count: Option<Arc<AtomicU64>>| {
                    let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                    let stop = Arc::clone(&stop2);
                    std::thread::spawn(move || pump(from, to, delay, watch, count, stop))
                };
            spawn_pump(&source, &destination, watch, Some(forwarded2));
            spawn_pump(&destination, &source, forward_all(), None);
        }));
        let address = address_rx
            .recv_timeout(RELAY_GUARD)
            .expect("the relay listens");
        Relay {
            address,
            stop,
            forwarded,
        }
    }
}

/// One direction: reads `from`, holds each chunk `delay`, writes it to `to`. The end of
/// `from` is passed on (FIN); a failed write resets `from` (as a dead host's kernel would).
fn pump(
    from: TcpStream,
    to: TcpStream,
    delay: Duration,
    mut watch: Watch,
    count: Option<Arc<AtomicU64>>,
    stop: Arc<AtomicBool>,
) {
    // Bounded: at most 64 chunks (4 MiB) in flight.
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(64);
    let writer = {
        let (from, mut to, stop) = (
            from.try_clone().unwrap(),
            to.try_clone().unwrap(),
            Arc::clone(&stop),
        );
        to.set_write_timeout(Some(RELAY_GUARD)).unwrap();
        std::thread::spawn(move || {
            for (due, chunk) in rx {
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if stop.load(Ordering::SeqCst) || to.write_all(&chunk).is_err() {
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                if let Some(count) = &count {
                    count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let mut from = from;
    from.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let deadline = Instant::now() + RELAY_GUARD;
    let mut held = false;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        if held {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                continue
            }
            Err(_) => break,
        };
        let keep = match watch(&buf[..n]) {
            None => n,
            Some(keep) => {
                held = true;
                keep
            }
        };
        if keep > 0
            && tx
                .send((Instant::now() + delay, buf[..keep].to_vec()))
                .is_err()
        {
            break;
        }
    }
    if held {
        // Both sockets stay open (silent) until the relay is stopped; the writer (its
        // channel still open) sends nothing more.
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        return;
    }
    drop(tx);
    let _ = writer.join();
}
