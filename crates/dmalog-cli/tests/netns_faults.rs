//! `dmalog migrate source` and `dmalog migrate destination` across a real (virtual)
//! network: the source in one network namespace, each destination in another, joined by
//! veth pairs shaped with tbf, 1% of packets dropped each way (iptables' statistic match),
//! and 10 ms of delay each way added by a relay in the destination's namespace (the
//! kernels here have no netem). With those, a migration converges and verifies; when the
//! link is cut, the destination is killed or the source is killed, the surviving side says
//! why within its timeout, the source VM runs on (vCPUs and device RUNNING, logging off)
//! and migrates to the next destination, which verifies.
//!
//! Needs root and iproute2; skipped with a message elsewhere. Every wait on a child is
//! bounded by a hang guard: the test fails instead of hanging.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{ServerProcess, TempDir};
use netns::{Host, Network, Relay, Shape};

/// A hang guard, not a speed check.
const HANG_GUARD: Duration = Duration::from_secs(180);
/// One-way delay each relay adds.
const DELAY: Duration = Duration::from_millis(10);
/// Each link's rate: 64 MiB of guest memory take about 1.5 s.
const SHAPE: Shape = Shape {
    rate_mbit: 400,
    loss: true,
};
const GUEST_MIB: u64 = 64;
/// Share of guest memory holding data (not zero) before the migration: zero pages cross
/// the link as flags, and a guest of them would be over in a few frames.
const PREFILL_PCT: u64 = 50;
/// Bytes of that data.
const FILL_BYTES: u64 = (GUEST_MIB << 20) / 100 * PREFILL_PCT;
/// Both sides' `--timeout-ms` where the link is cut: a silent peer is found out after
/// this. Generous against the other side's honest work (the destination hashes the guest
/// between End and Ready, slowly on a loaded machine), as short as that allows.
const CUT_TIMEOUT_MS: u64 = 5_000;
const CUT_TIMEOUT_TEXT: &str = "within 5000 ms";
const MAX_ROUNDS: u32 = 30;

fn dmalog() -> &'static str {
    env!("CARGO_BIN_EXE_dmalog")
}

/// The network, or `None` after saying why the test is skipped.
fn network(test: &str, hosts: usize) -> Option<Network> {
    match Network::new(hosts, SHAPE) {
        Ok(net) => Some(net),
        Err(why) => {
            netns::say_skipped(test, &format!("network namespaces unavailable here: {why}"));
            None
        }
    }
}

/// A child killed and reaped on drop, even when the test fails half-way.
struct Reaped(Option<Child>);

impl Reaped {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }

    /// Waits for it to exit (failing the test past the hang guard).
    fn wait(mut self, what: &str) -> Output {
        let mut child = self.0.take().unwrap();
        let deadline = Instant::now() + HANG_GUARD;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what}: still running after {HANG_GUARD:?} (a hang)");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGKILL to `pid` (a child of this process, reaped by its owner).
fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
}

/// Certificates for the destination hosts' addresses (TLS, as a user would migrate).
fn certs(dir: &Path, net: &Network) -> PathBuf {
    let certs = dir.join("certs");
    let mut command = Command::new(dmalog());
    command.args(["migrate", "gen-certs", "--dir"]).arg(&certs);
    for host in &net.hosts {
        command.args(["--server-name", &host.address.to_string()]);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    certs
}

/// How the stream is secured.
enum Security<'a> {
    Tls(&'a Path),
    Plaintext,
}

impl Security<'_> {
    fn args(&self, role: &str) -> Vec<String> {
        match self {
            Security::Tls(certs) => [
                ("--tls-ca", "ca.pem".to_string()),
                ("--tls-cert", format!("{role}.pem")),
                ("--tls-key", format!("{role}-key.pem")),
            ]
            .into_iter()
            .flat_map(|(flag, file)| [flag.to_string(), certs.join(file).display().to_string()])
            .collect(),
            Security::Plaintext => vec!["--insecure-plaintext".into()],
        }
    }
}

/// A `dmalog migrate destination` in `host`'s namespace, listening on its loopback (the
/// relay in front of it is what the source reaches).
struct Destination {
    child: Reaped,
    /// Where it listens, inside the host's namespace.
    listening: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Destination {
    fn start(host: &Host, device: &Path, security: &Security, timeout_ms: u64) -> Self {
        let mut child = host
            .ns
            .command(dmalog())
            .args([
                "migrate",
                "destination",
                "--json",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--memory-mib", &GUEST_MIB.to_string()])
            .args(["--timeout-ms", &timeout_ms.to_string(), "--socket"])
            .arg(device)
            .args(security.args("server"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap());
        let child = Reaped(Some(child));
        let (address_tx, address_rx) = mpsc::channel();
        let (stderr_tx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let mut line = String::new();
            while lines.read_line(&mut line).unwrap_or(0) > 0 {
                match line.trim().strip_prefix("waiting for a migration on ") {
                    Some(address) => {
                        let _ = address_tx.send(address.parse::<SocketAddr>().unwrap());
                    }
                    None => rest.push_str(&line),
                }
                line.clear();
            }
            let _ = stderr_tx.send(rest);
        });
        let listening = address_rx
            .recv_timeout(HANG_GUARD)
            .expect("the destination listens");
        Destination {
            child,
            listening,
            stderr,
        }
    }

    /// Its exit, stdout and stderr.
    fn wait(self) -> (Output, String) {
        let out = self.child.wait("dmalog migrate destination");
        let stderr = self.stderr.recv_timeout(HANG_GUARD).unwrap_or_default();
        (out, stderr)
    }
}

/// `dmalog migrate source` in the source namespace, a 64 MiB guest (half of it filled)
/// whose workloads dirty about 1 MB/s each (so that it converges on a 50 MB/s link even on
/// a loaded machine), trying `destinations` in turn.
fn source(
    net: &Network,
    device: &Path,
    destinations: &[SocketAddr],
    security: &Security,
    timeout_ms: u64,
) -> Reaped {
    let mut command = net.source.command(dmalog());
    command
        .args(["migrate", "source", "--json"])
        .args(["--memory-mib", &GUEST_MIB.to_string()])
        .args(["--device-wss-mib", "8", "--device-rate-mbps", "1"])
        .args(["--vcpu-wss-mib", "4", "--vcpu-rate-mbps", "1"])
        .args([
            "--max-downtime-ms",
            "200",
            "--max-rounds",
            &MAX_ROUNDS.to_string(),
        ])
        // No pacing in the process: the link's tbf is the cap.
        .args(["--link-mbps", "100000"])
        .args(["--prefill-pct", &PREFILL_PCT.to_string()])
        .args(["--timeout-ms", &timeout_ms.to_string()]);
    for destination in destinations {
        command.args(["--connect", &destination.to_string()]);
    }
    command.arg("--socket").arg(device);
    command.args(security.args("client"));
    Reaped(Some(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

/// The source exited as after a verified migration: 0, or 3 (verified over the downtime
/// budget: a loaded machine; the budget is not what these tests check).
fn assert_source_migrated(out: &Output, stderr: &str) {
    assert!(matches!(out.status.code(), Some(0 | 3)), "{stderr}");
}

fn json(out: &Output, stderr: &str) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
        panic!(
            "stdout is not one JSON object ({err}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The source's report verified, converged (stopped before the round limit), and its
/// rounds after round 0 found pages dirtied by both the vCPUs and the device (the VM ran
/// during this attempt).
fn assert_verified_and_running(report: &serde_json::Value) {
    assert_eq!(report["verified"], true, "{report:#}");
    let rounds = report["rounds"].as_array().expect("rounds");
    // Round 0, pre-copy rounds 1..=last, the final round: forced at last == MAX_ROUNDS.
    let last_pre_copy = rounds.len() - 2;
    assert!(
        last_pre_copy < MAX_ROUNDS as usize,
        "converged before the round limit: {report:#}"
    );
    let sum = |key: &str| -> u64 {
        rounds[1..]
            .iter()
            .map(|r| r[key].as_u64().unwrap() + r["pages_both"].as_u64().unwrap())
            .sum()
    };
    assert!(sum("pages_cpu") > 0, "the vCPUs dirtied memory: {report:#}");
    assert!(
        sum("pages_device") > 0,
        "the device dirtied memory: {report:#}"
    );
}

/// The source's record of a failed attempt: the error contains `why`, and right after it
/// the VM ran on here (device RUNNING, vCPUs running, dirty logging off on both sources).
fn assert_failed_and_vm_runs_on(attempt: &serde_json::Value, why: &str) {
    assert_eq!(attempt["ok"], false, "{attempt:#}");
    let error = attempt["error"].as_str().expect("an error");
    assert!(error.contains(why), "{why:?} not in {error:?}");
    let vm = &attempt["vm_after_failure"];
    assert_eq!(vm["device_state"], "RUNNING", "{attempt:#}");
    assert_eq!(vm["vcpus_running"], true, "{attempt:#}");
    assert_eq!(vm["device_dirty_logging"], false, "{attempt:#}");
    assert_eq!(vm["cpu_dirty_logging"], false, "{attempt:#}");
}

/// The destination failed, said `why`, printed no report, and its device was not resumed
/// with the source's state (dma-engine's workload registers are still the defaults; the
/// source's device had them set).
fn assert_destination_failed_unresumed(
    out: &Output,
    stderr: &str,
    device: &ServerProcess,
    why: &str,
) {
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(why), "{why:?} not in {stderr}");
    assert!(stderr.contains("not resumed"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut client = device.connect();
    assert_eq!(client.read_u64(0, common::reg::WL_BASE).unwrap(), 0);
    assert_eq!(client.read_u64(0, common::reg::WL_CTRL).unwrap(), 0);
}

fn assert_destination_verified(out: &Output, stderr: &str) {
    assert!(out.status.success(), "{stderr}");
    assert_eq!(json(out, stderr)["verified"], true, "{stderr}");
}

#[test]
fn with_rate_loss_and_delay_a_migration_converges_and_verifies() {
    let Some(net) = network(
        "with_rate_loss_and_delay_a_migration_converges_and_verifies",
        1,
    ) else {
        return;
    };
    let dir = TempDir::new("netns-ok");
    let certs = certs(&dir.0, &net);
    let tls = Security::Tls(&certs);
    let (src_dev, dst_dev) = (ServerProcess::start("soft"), ServerProcess::start("soft"));
    let host = &net.hosts[0];
    let dst = Destination::start(host, &dst_dev.socket, &tls, 10_000);
    let relay = Relay::start(host, dst.listening, DELAY, netns::forward_all());
    let out = source(&net, &src_dev.socket, &[relay.address], &tls, 10_000).wait("source");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_source_migrated(&out, &stderr);
    let (dst_out, dst_stderr) = dst.wait();
    let report = json(&out, &stderr);
    assert_verified_and_running(&report);
    assert_eq!(
        report["attempts"].as_array().unwrap().len(),
        1,
        "{report:#}"
    );
    assert_eq!(report["attempts"][0]["ok"], true, "{report:#}");
    assert_destination_verified(&dst_out, &dst_stderr);
    // The network did what it says: all of it through the delaying relay, the rate cap
    // reached, packets dropped.
    eprintln!(
        "{} rounds, downtime {:.1} ms, total {:.0} ms, {} bytes; {} packets dropped, tbf held back {} times",
        report["rounds"].as_array().unwrap().len(),
        report["downtime_ms"].as_f64().unwrap(),
        report["total_ms"].as_f64().unwrap(),
        report["bytes_sent"],
        net.dropped_packets(),
        net.shaped_events()
    );
    assert!(relay.forwarded.load(Ordering::SeqCst) >= FILL_BYTES);
    assert!(net.shaped_events() > 0, "tbf never held a packet back");
    match &net.loss_unavailable {
        None => assert!(net.dropped_packets() > 0, "no packet was dropped"),
        Some(why) => netns::say_skipped("the 1% packet loss of the netns tests", why),
    }
}

#[test]
fn the_link_cut_after_the_stop_fails_both_sides_in_time_and_the_vm_migrates_elsewhere() {
    let Some(net) = network(
        "the_link_cut_after_the_stop_fails_both_sides_in_time_and_the_vm_migrates_elsewhere",
        2,
    ) else {
        return;
    };
    let (src_dev, dst_dev, other_dev) = (
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
    );
    // Plaintext, so that the relay can find the End frame: the link goes down once the
    // source has stopped the guest and sent everything, before the destination has it.
    let plain = Security::Plaintext;
    let first = Destination::start(&net.hosts[0], &dst_dev.socket, &plain, CUT_TIMEOUT_MS);
    let cut = Relay::start(
        &net.hosts[0],
        first.listening,
        DELAY,
        netns::at_end_frame(net.hosts[0].cutter()),
    );
    let second = Destination::start(&net.hosts[1], &other_dev.socket, &plain, CUT_TIMEOUT_MS);
    let relay = Relay::start(&net.hosts[1], second.listening, DELAY, netns::forward_all());
    let out = source(
        &net,
        &src_dev.socket,
        &[cut.address, relay.address],
        &plain,
        CUT_TIMEOUT_MS,
    )
    .wait("source");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Before waiting for the destinations: a source that failed never reached them.
    assert_source_migrated(&out, &stderr);
    let (first_out, first_stderr) = first.wait();
    let (second_out, second_stderr) = second.wait();
    let report = json(&out, &stderr);
    let attempts = report["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{report:#}");
    eprintln!("first attempt: {:#}", attempts[0]);
    assert_failed_and_vm_runs_on(&attempts[0], CUT_TIMEOUT_TEXT);
    assert_eq!(attempts[1]["ok"], true, "{report:#}");
    assert_verified_and_running(&report);
    assert_destination_failed_unresumed(&first_out, &first_stderr, &dst_dev, CUT_TIMEOUT_TEXT);
    assert_destination_verified(&second_out, &second_stderr);
}

#[test]
fn a_destination_killed_mid_stream_fails_the_attempt_and_the_vm_migrates_elsewhere() {
    let Some(net) = network(
        "a_destination_killed_mid_stream_fails_the_attempt_and_the_vm_migrates_elsewhere",
        2,
    ) else {
        return;
    };
    let dir = TempDir::new("netns-kill-dst");
    let certs = certs(&dir.0, &net);
    let tls = Security::Tls(&certs);
    let (src_dev, dst_dev, other_dev) = (
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
    );
    let first = Destination::start(&net.hosts[0], &dst_dev.socket, &tls, 30_000);
    let victim = first.child.pid();
    let killing = Relay::start(
        &net.hosts[0],
        first.listening,
        DELAY,
        netns::after_bytes(8 << 20, move || kill(victim)),
    );
    let second = Destination::start(&net.hosts[1], &other_dev.socket, &tls, 30_000);
    let relay = Relay::start(&net.hosts[1], second.listening, DELAY, netns::forward_all());
    // A long timeout: the source must notice the dead peer from the connection, not wait.
    let out = source(
        &net,
        &src_dev.socket,
        &[killing.address, relay.address],
        &tls,
        30_000,
    )
    .wait("source");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_source_migrated(&out, &stderr);
    let (first_out, _) = first.wait();
    let (second_out, second_stderr) = second.wait();
    assert!(
        first_out.status.code().is_none(),
        "the first destination was killed"
    );
    let report = json(&out, &stderr);
    let attempts = report["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{report:#}");
    eprintln!("first attempt: {:#}", attempts[0]);
    assert_failed_and_vm_runs_on(&attempts[0], "the destination closed the connection");
    assert_eq!(attempts[1]["ok"], true, "{report:#}");
    assert_verified_and_running(&report);
    assert_destination_verified(&second_out, &second_stderr);
}

/// The source device is RUNNING with logging off (a new migration could START).
fn assert_device_ready_for_a_retry(server: &ServerProcess) {
    let mut client = server.connect();
    assert_eq!(
        dmalog::MigrationDevice::device_state(&mut client).unwrap(),
        dmalog::uapi::DeviceState::Running
    );
    let mut bitmap = [0u64; 1];
    assert_eq!(
        dmalog::DirtyTracker::report(
            &mut client,
            dmalog::IovaRange::new(0, 4096).unwrap(),
            4096,
            &mut bitmap
        )
        .unwrap_err()
        .errno(),
        libc::EINVAL,
        "logging is off"
    );
}

#[test]
fn a_source_killed_mid_stream_fails_the_destination_unresumed_and_a_new_migration_verifies() {
    let Some(net) = network(
        "a_source_killed_mid_stream_fails_the_destination_unresumed_and_a_new_migration_verifies",
        1,
    ) else {
        return;
    };
    // Plaintext, so that the relay can follow the frames.
    let plain = Security::Plaintext;
    let (src_dev, dst_dev) = (ServerProcess::start("soft"), ServerProcess::start("soft"));
    let host = &net.hosts[0];
    let first = Destination::start(host, &dst_dev.socket, &plain, 30_000);
    let victim = Arc::new(AtomicU32::new(0));
    let mut syncs = 0;
    let killing = Relay::start(
        host,
        first.listening,
        DELAY,
        // At the end of the second round (its Sync frame): the destination has every page
        // once and the device's pre-copy state (sent after round 0's pages), all it would
        // need to resume a stale guest.
        netns::on_frame(
            move |kind, _| {
                syncs += u32::from(kind == 9);
                syncs == 2
            },
            {
                let victim = Arc::clone(&victim);
                move || kill(victim.load(Ordering::SeqCst))
            },
        ),
    );
    let doomed = source(&net, &src_dev.socket, &[killing.address], &plain, 30_000);
    victim.store(doomed.pid(), Ordering::SeqCst);
    let doomed_out = doomed.wait("the killed source");
    assert!(doomed_out.status.code().is_none(), "the source was killed");
    // A long timeout: the destination must notice the dead peer from the connection.
    let (out, stderr) = first.wait();
    assert_destination_failed_unresumed(
        &out,
        &stderr,
        &dst_dev,
        "the source closed the connection",
    );
    // The source's device server ran on when its VMM died.
    assert_device_ready_for_a_retry(&src_dev);

    // A new source VM on the same device, to a new destination on the device the first
    // one left half-loaded (over TLS, as a user would).
    let dir = TempDir::new("netns-kill-src");
    let certs = certs(&dir.0, &net);
    let tls = Security::Tls(&certs);
    let second = Destination::start(host, &dst_dev.socket, &tls, 30_000);
    let relay = Relay::start(host, second.listening, DELAY, netns::forward_all());
    let out = source(&net, &src_dev.socket, &[relay.address], &tls, 30_000).wait("source");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_source_migrated(&out, &stderr);
    let (second_out, second_stderr) = second.wait();
    assert_verified_and_running(&json(&out, &stderr));
    assert_destination_verified(&second_out, &second_stderr);
}

/// The link cut on the way back, at the destination's `frame`-th frame (0: the first):
/// the source, the first destination and its device server, the second destination (a
/// fallback) and its relay, and what each process did.
struct CutOnTheWayBack {
    source: Output,
    stderr: String,
    first: (Output, String),
    first_device: ServerProcess,
    second: Destination,
    second_relay: Relay,
    /// Kept for `second` (it reads its device after the migration).
    _devices: [ServerProcess; 2],
}

fn cut_on_the_way_back(net: &Network, frame: u64) -> CutOnTheWayBack {
    let (src_dev, dst_dev, other_dev) = (
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
    );
    let plain = Security::Plaintext;
    let first = Destination::start(&net.hosts[0], &dst_dev.socket, &plain, CUT_TIMEOUT_MS);
    let cut = Relay::watching_both(
        &net.hosts[0],
        first.listening,
        DELAY,
        netns::forward_all(),
        netns::at_frame(move |_, index| index == frame, net.hosts[0].cutter()),
    );
    let second = Destination::start(&net.hosts[1], &other_dev.socket, &plain, CUT_TIMEOUT_MS);
    let second_relay = Relay::start(&net.hosts[1], second.listening, DELAY, netns::forward_all());
    let source = source(
        net,
        &src_dev.socket,
        &[cut.address, second_relay.address],
        &plain,
        CUT_TIMEOUT_MS,
    )
    .wait("source");
    let stderr = String::from_utf8_lossy(&source.stderr).into_owned();
    let first = first.wait();
    CutOnTheWayBack {
        source,
        stderr,
        first,
        first_device: dst_dev,
        second,
        second_relay,
        _devices: [src_dev, other_dev],
    }
}

#[test]
fn the_link_cut_before_the_destination_may_resume_leaves_the_guest_only_at_the_source() {
    let Some(net) = network(
        "the_link_cut_before_the_destination_may_resume_leaves_the_guest_only_at_the_source",
        2,
    ) else {
        return;
    };
    // The destination's first frame back: it has every page and the device state, and
    // has not resumed.
    let run = cut_on_the_way_back(&net, 0);
    assert_source_migrated(&run.source, &run.stderr);
    let report = json(&run.source, &run.stderr);
    let attempts = report["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{report:#}");
    assert_failed_and_vm_runs_on(&attempts[0], CUT_TIMEOUT_TEXT);
    assert_verified_and_running(&report);
    let (out, stderr) = &run.first;
    assert_destination_failed_unresumed(out, stderr, &run.first_device, CUT_TIMEOUT_TEXT);
    let (second_out, second_stderr) = run.second.wait();
    assert_destination_verified(&second_out, &second_stderr);
}

#[test]
fn the_link_cut_after_the_destination_was_told_to_resume_leaves_the_guest_only_there() {
    let Some(net) = network(
        "the_link_cut_after_the_destination_was_told_to_resume_leaves_the_guest_only_there",
        2,
    ) else {
        return;
    };
    // The destination's second frame back: its confirmation that it resumed.
    let run = cut_on_the_way_back(&net, 1);
    // The guest runs at the destination (its device RUNNING with the source's state), and
    // only there. The destination never hears the source's verdict on the hashes, and
    // says so.
    let (out, stderr) = &run.first;
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed here: it runs here"), "{stderr}");
    let mut client = run.first_device.connect();
    assert_eq!(
        dmalog::MigrationDevice::device_state(&mut client).unwrap(),
        dmalog::uapi::DeviceState::Running
    );
    assert_ne!(client.read_u64(0, common::reg::WL_BASE).unwrap(), 0);
    drop(client);
    assert!(!run.source.status.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains("did not confirm") && run.stderr.contains("stays paused"),
        "{}",
        run.stderr
    );
    let report = json(&run.source, &run.stderr);
    let attempts = report["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "no second destination: {report:#}");
    let vm = &attempts[0]["vm_after_failure"];
    assert_eq!(vm["vcpus_running"], false, "{report:#}");
    assert_ne!(vm["device_state"], "RUNNING", "{report:#}");
    assert_eq!(run.second_relay.forwarded.load(Ordering::SeqCst), 0);
    drop(run.second);
}
