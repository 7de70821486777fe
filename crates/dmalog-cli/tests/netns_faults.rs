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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::migrate::{
    assert_device_ready_for_a_retry, gen_certs, json, migrated, spawn_piped, text, tls_args,
    Destination, Reaped,
};
use common::{ServerProcess, TempDir};
use netns::{Host, Network, Relay, Shape, Watch};

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
/// `--timeout-ms` where a dead peer must be noticed from the connection, not waited out.
const LONG_TIMEOUT_MS: u64 = 30_000;
const MAX_ROUNDS: u32 = 30;

const DMALOG: &str = env!("CARGO_BIN_EXE_dmalog");

/// Runs `test` on a network of `hosts` destination hosts, or says why it is skipped.
fn with_network(test: &str, hosts: usize, test_body: impl FnOnce(&Network)) {
    match Network::new(hosts, SHAPE) {
        Ok(net) => test_body(&net),
        Err(why) => {
            netns::say_skipped(test, &format!("network namespaces unavailable here: {why}"))
        }
    }
}

/// SIGKILL to `pid` (a child of this process, reaped by its owner).
fn kill(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
}

/// How the stream is secured.
enum Security {
    /// Certificates for the destination hosts' addresses (TLS, as a user would migrate).
    Tls {
        certs: PathBuf,
        _dir: TempDir,
    },
    Plaintext,
}

impl Security {
    fn tls(net: &Network) -> Self {
        let dir = TempDir::new("netns-certs");
        let names: Vec<String> = net.hosts.iter().map(|h| h.address.to_string()).collect();
        let certs = gen_certs(&dir.0, "certs", &names);
        Security::Tls { certs, _dir: dir }
    }

    fn args(&self, role: &str) -> Vec<PathBuf> {
        match self {
            Security::Tls { certs, .. } => tls_args(certs, role),
            Security::Plaintext => vec!["--insecure-plaintext".into()],
        }
    }
}

/// A `dmalog migrate destination` in `host`'s namespace, listening on its loopback (the
/// relay in front of it is what the source reaches).
fn destination(host: &Host, device: &Path, security: &Security, timeout_ms: u64) -> Destination {
    let mut command = host.ns.command(DMALOG);
    command
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
        .args(security.args("server"));
    Destination::spawn(command)
}

/// Where `destination` listens, inside its host's namespace.
fn listening(destination: &Destination) -> SocketAddr {
    destination.address.parse().unwrap()
}

/// A relay in `host`'s namespace in front of `destination`, adding [`DELAY`].
fn relay(host: &Host, destination: &Destination, watch: Watch) -> Relay {
    Relay::start(host, listening(destination), DELAY, watch)
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
    let mut command = net.source.command(DMALOG);
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
    Reaped::new(spawn_piped(&mut command))
}

/// The source's exit after a verified migration: 0, or 3 (verified over the downtime
/// budget: a loaded machine; the budget is not what these tests check); its report.
fn assert_source_migrated(out: &Output) -> serde_json::Value {
    assert!(migrated(out), "{}", text(out));
    json(out)
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
    (out, stderr): &(Output, String),
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

fn assert_destination_verified(destination: Destination) {
    let (out, stderr) = destination.wait();
    assert!(out.status.success(), "{stderr}");
    assert_eq!(json(&out)["verified"], true, "{stderr}");
}

/// One migration from `src_dev` to a new destination on `host` (on `dst_dev`) through a
/// relay that forwards all: it verifies on both sides with the VM running during it.
/// Returns the source's report and the relay.
fn migrate_once(
    net: &Network,
    host: &Host,
    (src_dev, dst_dev): (&ServerProcess, &ServerProcess),
    security: &Security,
    timeout_ms: u64,
) -> (serde_json::Value, Relay) {
    let dst = destination(host, &dst_dev.socket, security, timeout_ms);
    let relay = relay(host, &dst, netns::forward_all());
    let out = source(net, &src_dev.socket, &[relay.address], security, timeout_ms).wait("source");
    let report = assert_source_migrated(&out);
    assert_verified_and_running(&report);
    assert_destination_verified(dst);
    (report, relay)
}

#[test]
fn with_rate_loss_and_delay_a_migration_converges_and_verifies() {
    with_network(
        "with_rate_loss_and_delay_a_migration_converges_and_verifies",
        1,
        |net| {
            let tls = Security::tls(net);
            let devices = (&ServerProcess::start("soft"), &ServerProcess::start("soft"));
            let (report, relay) = migrate_once(net, &net.hosts[0], devices, &tls, 10_000);
            assert_eq!(
                report["attempts"].as_array().unwrap().len(),
                1,
                "{report:#}"
            );
            assert_eq!(report["attempts"][0]["ok"], true, "{report:#}");
            // The network did what it says: all of it through the delaying relay, the rate
            // cap reached, packets dropped.
            eprintln!(
                "{} rounds, downtime {:.1} ms, link round trip {:.1} ms, total {:.0} ms, {} bytes; {} packets dropped, tbf held back {} times",
                report["rounds"].as_array().unwrap().len(),
                report["downtime_ms"].as_f64().unwrap(),
                report["link_rtt_ms"].as_f64().unwrap_or(f64::NAN),
                report["total_ms"].as_f64().unwrap(),
                report["bytes_sent"],
                net.dropped_packets(),
                net.shaped_events()
            );
            assert!(relay.forwarded.load(Ordering::SeqCst) >= FILL_BYTES);
            // The source timed the link's round trip (its predicted downtime counts two):
            // at least the relay's delay each way.
            let link_rtt_ms = report["link_rtt_ms"].as_f64().unwrap();
            assert!(
                link_rtt_ms >= 2.0 * DELAY.as_secs_f64() * 1e3,
                "link round trip {link_rtt_ms} ms, {DELAY:?} each way"
            );
            assert!(net.shaped_events() > 0, "tbf never held a packet back");
            match &net.loss_unavailable {
                None => assert!(net.dropped_packets() > 0, "no packet was dropped"),
                Some(why) => netns::say_skipped("the 1% packet loss of the netns tests", why),
            }
        },
    );
}

/// A source with two destinations, one on each host: the first behind the relay
/// `first_relay` makes (its faults), the second behind a relay that forwards all. The
/// source has run to its end; the destinations have not been waited for.
struct Failover {
    source: Output,
    first: Destination,
    first_device: ServerProcess,
    second: Destination,
    second_relay: Relay,
    /// Kept for the destinations (they read their devices after the migration) and for
    /// the first's connection.
    _kept: (Relay, [ServerProcess; 2]),
}

fn failover(
    net: &Network,
    security: &Security,
    timeout_ms: u64,
    first_relay: impl FnOnce(&Host, &Destination) -> Relay,
) -> Failover {
    let (src_dev, dst_dev, other_dev) = (
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
        ServerProcess::start("soft"),
    );
    let first = destination(&net.hosts[0], &dst_dev.socket, security, timeout_ms);
    let cut = first_relay(&net.hosts[0], &first);
    let second = destination(&net.hosts[1], &other_dev.socket, security, timeout_ms);
    let second_relay = relay(&net.hosts[1], &second, netns::forward_all());
    let source = source(
        net,
        &src_dev.socket,
        &[cut.address, second_relay.address],
        security,
        timeout_ms,
    )
    .wait("source");
    Failover {
        source,
        first,
        first_device: dst_dev,
        second,
        second_relay,
        _kept: (cut, [src_dev, other_dev]),
    }
}

impl Failover {
    /// The source migrated on its second attempt, to the second destination, which
    /// verified; the first attempt failed with `why` and the VM ran on after it. Returns
    /// the first destination's exit and stderr, and its device server.
    fn assert_failed_over(self, why: &str) -> ((Output, String), ServerProcess) {
        // Before waiting for the destinations: a source that failed never reached them.
        let report = assert_source_migrated(&self.source);
        let first = self.first.wait();
        let attempts = report["attempts"].as_array().expect("attempts");
        assert_eq!(attempts.len(), 2, "{report:#}");
        eprintln!("first attempt: {:#}", attempts[0]);
        assert_failed_and_vm_runs_on(&attempts[0], why);
        assert_eq!(attempts[1]["ok"], true, "{report:#}");
        assert_verified_and_running(&report);
        assert_destination_verified(self.second);
        (first, self.first_device)
    }
}

#[test]
fn the_link_cut_after_the_stop_fails_both_sides_in_time_and_the_vm_migrates_elsewhere() {
    with_network(
        "the_link_cut_after_the_stop_fails_both_sides_in_time_and_the_vm_migrates_elsewhere",
        2,
        |net| {
            // Plaintext, so that the relay can find the End frame: the link goes down once
            // the source has stopped the guest and sent everything, before the destination
            // has it.
            let run = failover(net, &Security::Plaintext, CUT_TIMEOUT_MS, |host, first| {
                relay(host, first, netns::at_end_frame(host.cutter()))
            });
            let (first, device) = run.assert_failed_over(CUT_TIMEOUT_TEXT);
            assert_destination_failed_unresumed(&first, &device, CUT_TIMEOUT_TEXT);
        },
    );
}

#[test]
fn a_destination_killed_mid_stream_fails_the_attempt_and_the_vm_migrates_elsewhere() {
    with_network(
        "a_destination_killed_mid_stream_fails_the_attempt_and_the_vm_migrates_elsewhere",
        2,
        |net| {
            // A long timeout: the source must notice the dead peer from the connection, not
            // wait.
            let tls = Security::tls(net);
            let run = failover(net, &tls, LONG_TIMEOUT_MS, |host, first| {
                let victim = first.child.pid();
                relay(
                    host,
                    first,
                    netns::after_bytes(8 << 20, move || kill(victim)),
                )
            });
            let ((first_out, _), _) =
                run.assert_failed_over("the destination closed the connection");
            assert!(
                first_out.status.code().is_none(),
                "the first destination was killed"
            );
        },
    );
}

#[test]
fn a_source_killed_mid_stream_fails_the_destination_unresumed_and_a_new_migration_verifies() {
    with_network(
        "a_source_killed_mid_stream_fails_the_destination_unresumed_and_a_new_migration_verifies",
        1,
        |net| {
            // Plaintext, so that the relay can follow the frames.
            let plain = Security::Plaintext;
            let (src_dev, dst_dev) = (ServerProcess::start("soft"), ServerProcess::start("soft"));
            let host = &net.hosts[0];
            let first = destination(host, &dst_dev.socket, &plain, LONG_TIMEOUT_MS);
            let victim = Arc::new(AtomicU32::new(0));
            let mut syncs = 0;
            let killing = relay(
                host,
                &first,
                // At the end of the second round (its Sync frame): the destination has every
                // page once and the device's pre-copy state (sent after round 0's pages), all
                // it would need to resume a stale guest.
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
            let doomed = source(
                net,
                &src_dev.socket,
                &[killing.address],
                &plain,
                LONG_TIMEOUT_MS,
            );
            victim.store(doomed.pid(), Ordering::SeqCst);
            let doomed_out = doomed.wait("the killed source");
            assert!(doomed_out.status.code().is_none(), "the source was killed");
            // A long timeout: the destination must notice the dead peer from the connection.
            assert_destination_failed_unresumed(
                &first.wait(),
                &dst_dev,
                "the source closed the connection",
            );
            // The source's device server ran on when its VMM died.
            assert_device_ready_for_a_retry(&src_dev);

            // A new source VM on the same device, to a new destination on the device the
            // first one left half-loaded (over TLS, as a user would).
            let tls = Security::tls(net);
            migrate_once(net, host, (&src_dev, &dst_dev), &tls, LONG_TIMEOUT_MS);
        },
    );
}

/// The destination's first frames back: the Pongs of the source's link timing.
const PONGS: u64 = dmalog_migrate::engine::LINK_PINGS;

/// The link cut on the way back, at the destination's `frame`-th frame after its Pongs
/// (0: Ready).
fn cut_on_the_way_back(net: &Network, frame: u64) -> Failover {
    let frame = PONGS + frame;
    failover(net, &Security::Plaintext, CUT_TIMEOUT_MS, |host, first| {
        Relay::watching_both(
            host,
            listening(first),
            DELAY,
            netns::forward_all(),
            netns::at_frame(move |_, index| index == frame, host.cutter()),
        )
    })
}

#[test]
fn the_link_cut_before_the_destination_may_resume_leaves_the_guest_only_at_the_source() {
    with_network(
        "the_link_cut_before_the_destination_may_resume_leaves_the_guest_only_at_the_source",
        2,
        |net| {
            // The destination's first frame back: it has every page and the device state,
            // and has not resumed.
            let (first, device) = cut_on_the_way_back(net, 0).assert_failed_over(CUT_TIMEOUT_TEXT);
            assert_destination_failed_unresumed(&first, &device, CUT_TIMEOUT_TEXT);
        },
    );
}

#[test]
fn the_link_cut_after_the_destination_was_told_to_resume_leaves_the_guest_only_there() {
    with_network(
        "the_link_cut_after_the_destination_was_told_to_resume_leaves_the_guest_only_there",
        2,
        |net| {
            // The destination's second frame back: its confirmation that it resumed.
            let run = cut_on_the_way_back(net, 1);
            let stderr = String::from_utf8_lossy(&run.source.stderr).into_owned();
            // The guest runs at the destination (its device RUNNING with the source's
            // state), and only there. The destination never hears the source's verdict on
            // the hashes, and says so.
            let (out, first_stderr) = run.first.wait();
            assert!(!out.status.success(), "{first_stderr}");
            assert!(
                first_stderr.contains("resumed here: it runs here"),
                "{first_stderr}"
            );
            let mut client = run.first_device.connect();
            assert_eq!(
                dmalog::MigrationDevice::device_state(&mut client).unwrap(),
                dmalog::uapi::DeviceState::Running
            );
            assert_ne!(client.read_u64(0, common::reg::WL_BASE).unwrap(), 0);
            drop(client);
            assert!(!run.source.status.success(), "{stderr}");
            assert!(
                stderr.contains("did not confirm") && stderr.contains("stays paused"),
                "{stderr}"
            );
            let report = json(&run.source);
            let attempts = report["attempts"].as_array().expect("attempts");
            assert_eq!(attempts.len(), 1, "no second destination: {report:#}");
            let vm = &attempts[0]["vm_after_failure"];
            assert_eq!(vm["vcpus_running"], false, "{report:#}");
            assert_ne!(vm["device_state"], "RUNNING", "{report:#}");
            assert_eq!(run.second_relay.forwarded.load(Ordering::SeqCst), 0);
            drop(run.second);
        },
    );
}
