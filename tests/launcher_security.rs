//! Certificates and names, with the real binaries on 127.0.0.1: what
//! `ciao-lc certs` writes into the scheduler certificate, a 2018 launcher
//! refusing a scheduler whose certificate does not name the address dialled
//! (and connecting with `--verify-hostname=false`, or a certificate that
//! names it), and our own expired certificate reported at start-up. Every
//! process is started here and stopped by PID; every wait is bounded.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

mod common;

use ciao_launcher::ssntp::Role;
use ciao_launcher::ssntp::certgen::{self, CertSpec};
use ciao_launcher::ssntp::tls;
use common::*;

/// `ciao-lc certs --dir DIR ARGS…`: its stdout, and the scheduler
/// certificate's (IP, DNS) SANs.
fn certs(dir: &Path, args: &[&str]) -> (String, Vec<std::net::IpAddr>, Vec<String>) {
    let out = Command::new(LC)
        .arg("certs")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("ciao-lc certs");
    assert!(out.status.success(), "{out:?}");
    let ca = tls::load_ca(&dir.join("CAcert.pem")).expect("CA file");
    let id = tls::load_identity(&dir.join("cert-Scheduler.pem")).expect("scheduler file");
    assert_eq!(id.chain[0], ca[0], "the scheduler's certificate is the CA");
    let (ips, dns) = tls::cert_sans(&ca[0]).expect("SANs");
    (text(&out.stdout), ips, dns)
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .expect("gethostname")
        .into_string()
        .expect("UTF-8 host name")
}

#[test]
fn certs_name_the_scheduler_by_default() {
    let env = Env::new();
    let base = env.dir.join("c");
    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();

    let (out, ips, dns) = certs(&base.join("default"), &[]);
    assert_eq!(ips, [loopback]);
    assert_eq!(dns[0], "localhost");
    let host = host_name();
    if host != "localhost" && !host.contains('_') {
        assert!(dns.contains(&host), "{dns:?} lacks {host}");
    }
    assert!(
        out.contains("the scheduler certificate names DNS:localhost")
            && out.contains("IP:127.0.0.1"),
        "{out}"
    );

    let (_, ips, dns) = certs(
        &base.join("explicit"),
        &["--host", "sched.example", "--ip", "10.1.2.3", "--ip", "::1"],
    );
    assert_eq!(
        ips,
        [
            "10.1.2.3".parse::<std::net::IpAddr>().expect("ip"),
            "::1".parse().expect("ip")
        ]
    );
    assert_eq!(dns, ["sched.example"]);

    let (_, ips, _) = certs(&base.join("all"), &["--all-addresses"]);
    assert_eq!(ips[0], loopback);
    assert!(
        ips[1..].iter().all(|ip| !ip.is_loopback()),
        "only non-loopback addresses are added: {ips:?}"
    );

    let (out, ips, dns) = certs(&base.join("none"), &["--no-san"]);
    assert!(ips.is_empty() && dns.is_empty(), "{ips:?} {dns:?}");
    assert!(out.contains("names no host"), "{out}");
    let refused = Command::new(LC)
        .args(["certs", "--no-san", "--host", "x", "--dir"])
        .arg(base.join("both"))
        .output()
        .expect("ciao-lc certs");
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
}

/// Starts `ciao-launcher` with the given certificate files; its standard
/// error (logging included) goes to `log`.
fn launcher(env: &Env, cert: &Path, server: &str, log: &Path, extra: &[&str]) -> Child {
    let log = std::fs::File::create(log).expect("log");
    Command::new(LAUNCHER)
        .arg("-cacert")
        .arg(env.certs().join("CAcert.pem"))
        .arg("-cert")
        .arg(cert)
        .arg(format!("-server={server}"))
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .args(["-simulation", "--disk-limit=false", "--stats-interval", "1"])
        .args(["-logtostderr"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("launcher")
}

/// The exit status of a launcher expected to stop by itself (bounded).
fn exit_code(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the launcher did not exit within {WAIT:?}");
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// An environment whose certificates were made with `ciao-lc certs ARGS`.
fn env_with_certs(args: &[&str]) -> Env {
    let env = Env::new();
    std::fs::remove_dir_all(env.certs()).expect("remove default certs");
    certs(&env.certs(), args);
    env
}

#[test]
fn launcher_2018_refuses_a_scheduler_that_its_certificate_does_not_name() {
    let env = env_with_certs(&["--no-san"]);
    let (_serve, addr) = env.serve("127.0.0.1:0", "2018");
    let log = env.dir.join("refused.log");
    let cert = env.certs().join("cert-CNAgent.pem");
    let mut child = launcher(
        &env,
        &cert,
        &addr.to_string(),
        &log,
        &["--protocol=2018", "-v=2"],
    );
    assert_eq!(exit_code(&mut child), Some(4), "security failure");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains(&format!(
            "{addr}: the server's certificate is not valid for name \"127.0.0.1\""
        )) && text.contains("it has no subject alternative names"),
        "{text}"
    );
    // Refused once, not retried (retries are logged at -v 1 and up).
    assert!(!text.contains("retrying in"), "{text}");

    // A certificate naming only other hosts: DNS case (dialled by name).
    let env = env_with_certs(&["--host", "sched.example", "--ip", "127.0.0.1"]);
    let (_serve, addr) = env.serve("127.0.0.1:0", "2018");
    let cert = env.certs().join("cert-CNAgent.pem");
    let server = format!("localhost:{}", addr.port());
    let mut child = launcher(&env, &cert, &server, &log, &["-protocol=2018"]);
    assert_eq!(exit_code(&mut child), Some(4));
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("not valid for name \"localhost\"")
            && text.contains("its subject alternative names are DNS:sched.example, IP:127.0.0.1"),
        "{text}"
    );
}

#[test]
fn launcher_2018_accepts_a_scheduler_its_certificate_names() {
    // Default certificates: localhost, 127.0.0.1 and the host name.
    for dial in ["127.0.0.1", "localhost"] {
        let env = Env::new();
        let (_serve, addr) = env.serve("127.0.0.1:0", "2018");
        let log = env.dir.join("launcher.log");
        let cert = env.certs().join("cert-CNAgent.pem");
        let server = format!("{dial}:{}", addr.port());
        let child = launcher(&env, &cert, &server, &log, &["--protocol", "2018"]);
        env.wait_connected();
        stop(child);
    }
}

#[test]
fn verify_hostname_false_connects_with_a_warning() {
    let env = env_with_certs(&["--no-san"]);
    let (serve, addr) = env.serve("127.0.0.1:0", "2018");
    let log = env.dir.join("launcher.log");
    let cert = env.certs().join("cert-CNAgent.pem");
    let child = launcher(
        &env,
        &cert,
        &addr.to_string(),
        &log,
        &["-protocol=2018", "-verify-hostname=false"],
    );
    env.wait_connected();
    stop(child);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.lines().any(|l| l.starts_with('W')
            && l.contains("--verify-hostname=false: the scheduler's certificate is not checked")),
        "{text}"
    );

    // The 2016 profile does not check by default, and checks when asked.
    drop(serve);
    let (_serve, addr) = env.serve("127.0.0.1:0", "2016");
    let child = launcher(&env, &cert, &addr.to_string(), &log, &["-protocol=2016"]);
    env.wait_connected();
    stop(child);
    let mut child = launcher(&env, &cert, &addr.to_string(), &log, &["-verify-hostname"]);
    assert_eq!(exit_code(&mut child), Some(4));
}

#[test]
fn expired_own_certificate_is_reported_at_start() {
    let env = Env::new();
    let dir = env.dir.join("expired");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut spec = CertSpec::new(Role::SCHEDULER);
    spec.is_ca = true;
    let (ca, ca_cert) = certgen::self_signed_ca(&spec).expect("CA");
    let day = Duration::from_secs(86400);
    let mut spec = CertSpec::new(Role::AGENT);
    spec.not_before = SystemTime::now() - 30 * day;
    spec.not_after = SystemTime::now() - 2 * day;
    let expired = certgen::issue(&ca, &spec).expect("expired agent");
    std::fs::write(dir.join("CAcert.pem"), &ca_cert.cert_pem).expect("write");
    let cert = dir.join("cert-CNAgent.pem");
    std::fs::write(&cert, expired.combined_pem()).expect("write");

    let log = env.dir.join("expired.log");
    let child = Command::new(LAUNCHER)
        .arg("-cacert")
        .arg(dir.join("CAcert.pem"))
        .arg("-cert")
        .arg(&cert)
        .arg("-server=127.0.0.1:1")
        .arg("--data-dir")
        .arg(env.dir.join("data"))
        .args(["-simulation", "-logtostderr"])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn();
    let mut child = child.expect("launcher");
    assert_eq!(exit_code(&mut child), Some(3), "certificates unusable");
    let text = std::fs::read_to_string(&log).expect("log");
    let want = format!("{} expired on ", cert.display());
    // glog shape: the severity letter opens the line.
    assert!(
        text.lines()
            .any(|l| l.starts_with('E') && l.contains(&want)),
        "{text}"
    );
}

#[test]
fn serve_refuses_an_expired_scheduler_certificate() {
    let env = Env::new();
    let dir = env.dir.join("expired-ca");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let day = Duration::from_secs(86400);
    let mut spec = CertSpec::new(Role::SCHEDULER);
    spec.not_before = SystemTime::now() - 30 * day;
    spec.not_after = SystemTime::now() - day;
    let (_, ca_cert) = certgen::self_signed_ca(&spec).expect("CA");
    std::fs::write(dir.join("CAcert.pem"), &ca_cert.cert_pem).expect("write");
    std::fs::write(dir.join("cert-Scheduler.pem"), ca_cert.combined_pem()).expect("write");
    let mut child = Command::new(LC)
        .args(["serve", "--listen", "127.0.0.1:0", "--certs"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    assert_eq!(exit_code(&mut child), Some(3));
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        e.read_to_string(&mut err).expect("stderr");
    }
    assert!(err.contains("cert-Scheduler.pem expired on "), "{err}");
}
