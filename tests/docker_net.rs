//! Tenant networking of containers through the real launcher and a real
//! private dockerd: `ciao-lc serve` and `ciao-launcher -network cn` run in
//! a network namespace the test creates (`dnt-<pid>-<n>`, a bridge `phys0`
//! as the compute link), removed on drop. The containers' own namespaces
//! are made by dockerd (network mode `none`); the launcher plugs a veth end
//! into each. The tunnel is the veth stand-in (no GRE in this kernel).
//! Pings and `ip` run inside the containers (`docker exec`, busybox). One
//! test adds a real test-guest VM on the same subnet.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SLEEPER: &str = "#cloud-config\nruncmd:\n  - [ sleep, \"600\" ]\n";

/// `docker exec <id> <args>`'s stdout; it must succeed.
fn exec_ok(engine: &Engine, id: &str, args: &[&str]) -> String {
    let mut all = vec!["exec", id];
    all.extend_from_slice(args);
    let out = engine.cli(&all);
    assert!(
        out.status.success(),
        "docker exec {id} {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// One ping from container `id` to `ip` (1 s timeout).
fn pings(engine: &Engine, id: &str, ip: &str) -> bool {
    engine
        .cli(&["exec", id, "busybox", "ping", "-c", "1", "-W", "1", ip])
        .status
        .success()
}

/// Pings until an answer, at most `tries` times (ARP may eat the first).
fn reaches(engine: &Engine, id: &str, ip: &str, tries: u32) -> bool {
    (0..tries).any(|_| pings(engine, id, ip))
}

/// Waits (bounded) until `done`.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "waited in vain for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node of these tests: containers of the private engine.
struct Node(TenantNode);

impl std::ops::Deref for Node {
    type Target = TenantNode;
    fn deref(&self) -> &TenantNode {
        &self.0
    }
}

impl Node {
    fn new(tag: u32) -> Node {
        require(&[(&["docker"], "docker.io")]);
        Node(TenantNode::new("dnt", tag))
    }

    /// A launcher with tenant networking and the veth stand-in tunnel.
    fn launcher(&self, engine: &Engine) -> Proc {
        self.launcher_tunnel(engine, "veth")
    }

    fn launcher_tunnel(&self, engine: &Engine, tunnel: &str) -> Proc {
        let socket = engine.socket.display().to_string();
        self.0.launcher(&[
            "--docker-socket",
            &socket,
            "--stop-timeout",
            "2",
            "--network",
            "cn",
            "--tunnel-kind",
            tunnel,
        ])
    }

    /// `ciao-lc start` flags for a sleeping container.
    fn sleeper(&self) -> Vec<String> {
        let ud = self.env.dir.join(format!("ud-{}", uuid::Uuid::new_v4()));
        std::fs::write(&ud, SLEEPER).expect("user data");
        ["--docker-image", IMAGE, "--mem-mb", "64", "--user-data"]
            .iter()
            .map(|s| s.to_string())
            .chain([ud.to_str().expect("path").to_string()])
            .collect()
    }

    /// A sleeping container; `net`: the networking flags of `ciao-lc start`.
    fn start_plain(&self, net: &[&str]) -> String {
        let what = self.sleeper();
        let mut args: Vec<&str> = vec!["start"];
        args.extend(what.iter().map(String::as_str));
        args.extend_from_slice(net);
        let out = self.env.lc_ok(&args);
        out.split_whitespace()
            .nth(1)
            .expect("instance id")
            .to_string()
    }

    fn start_tenant(&self, tenant: &str, conc: &str, ip: &str, mac: &str) -> String {
        let what = self.sleeper();
        let what: Vec<&str> = what.iter().map(String::as_str).collect();
        self.0.start(&what, tenant, conc, ip, mac)
    }

    fn events_n(&self, what: &str) -> usize {
        self.0.events(what).len()
    }
}

/// `eth0` of container `id`, read with `ip` inside it.
fn assert_eth0(engine: &Engine, id: &str, ip: &str, mac: &str) {
    let link = exec_ok(engine, id, &["busybox", "ip", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains(&format!("link/ether {mac}")), "{link}");
    assert!(link.contains("UP"), "{link}");
    let addr = exec_ok(engine, id, &["busybox", "ip", "-4", "addr", "show", "eth0"]);
    assert!(addr.contains(&format!("inet {ip}/24")), "{addr}");
    let route = exec_ok(engine, id, &["busybox", "ip", "route"]);
    assert!(
        route
            .lines()
            .any(|l| l.starts_with("default via 172.16.0.1 dev eth0")),
        "{route}"
    );
}

#[test]
fn containers_ping_over_the_tenant_bridge_across_restart_kill9_and_dockerd_restart() {
    let engine = private_engine();
    let node = Node::new(0);
    let launcher = node.launcher(&engine);

    let a1 = node.start_tenant(T_A, C_A, "172.16.0.2", "02:00:ac:10:00:02");
    let a2 = node.start_tenant(T_A, C_A, "172.16.0.3", "02:00:ac:10:00:03");
    // Another tenant, same CIDR: its own bridge.
    let b1 = node.start_tenant(T_B, C_B, "172.16.0.4", "02:00:ac:10:00:14");
    node.env.wait_list("three running", |l| {
        [&a1, &a2, &b1]
            .iter()
            .all(|i| state_of(l, i) == Some("running"))
    });
    node.wait_events("Tenant Added", 2);
    assert_eq!(node.events_n("Tenant Added"), 2, "one per subnet");
    let links = node.ns.our_links();
    assert_eq!(count(&links, "sbr_"), 2, "{links:?}");
    assert_eq!(count(&links, "svn_"), 3, "{links:?}");
    assert_eq!(
        count(&links, "svp_"),
        0,
        "container ends are inside: {links:?}"
    );
    assert_eq!(node.ns.forward_rules(), 2);

    assert_eth0(&engine, &a1, "172.16.0.2", "02:00:ac:10:00:02");
    assert_eth0(&engine, &a2, "172.16.0.3", "02:00:ac:10:00:03");
    // B has its network (so its isolation below is not for want of one).
    assert_eth0(&engine, &b1, "172.16.0.4", "02:00:ac:10:00:14");
    let resolv = exec_ok(&engine, &a1, &["cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 172.16.0.1"), "{resolv}");
    assert!(reaches(&engine, &a1, "172.16.0.3", 5), "a1 → a2");
    assert!(reaches(&engine, &a2, "172.16.0.2", 5), "a2 → a1");
    assert!(!pings(&engine, &b1, "172.16.0.2"), "tenant B reached A");
    assert!(!pings(&engine, &b1, "172.16.0.3"), "tenant B reached A");

    // STOP + RESTART: same MAC and address, pings again; no new event.
    node.env.lc_ok(&["stop", &a2]);
    node.env
        .wait_list("a2 exited", |l| state_of(l, &a2) == Some("exited"));
    wait_until("a2's pair gone with its namespace", || {
        count(&node.ns.our_links(), "svn_") == 2
    });
    node.env.lc_ok(&["restart", &a2]);
    node.env
        .wait_list("a2 running", |l| state_of(l, &a2) == Some("running"));
    node.env.wait_log_line(&[&a2, "plugged in as eth0"], WAIT);
    assert_eth0(&engine, &a2, "172.16.0.3", "02:00:ac:10:00:03");
    assert!(reaches(&engine, &a1, "172.16.0.3", 5), "a1 → restarted a2");
    assert_eq!(node.events_n("Tenant Added"), 2);

    // kill -9 of the launcher, then a new one: still on the network.
    let links = node.ns.our_links();
    assert_eq!(count(&links, "svn_"), 3, "a2 has a new pair: {links:?}");
    let old = node.env.peer().expect("connected");
    launcher.kill9();
    // Meanwhile b1 is restarted behind the launcher's back: it runs in a
    // new namespace without its NIC, which the new launcher notices.
    let out = engine.cli(&["restart", "-t", "0", &b1]);
    assert!(
        out.status.success(),
        "docker restart: {}",
        text(&out.stderr)
    );
    let launcher = node.launcher(&engine);
    node.env.wait_reconnected(&old);
    node.env
        .wait_list("recovered", |l| state_of(l, &a1) == Some("running"));
    assert!(reaches(&engine, &a1, "172.16.0.3", 5), "after the kill -9");
    assert!(reaches(&engine, &a2, "172.16.0.2", 5), "after the kill -9");
    node.env
        .wait_log_line(&[&b1, "running without its tenant NIC"], WAIT);
    node.env.wait_log_line(&[&b1, "plugged in as eth0"], WAIT);
    assert_eth0(&engine, &b1, "172.16.0.4", "02:00:ac:10:00:14");
    let now = node.ns.our_links();
    assert_eq!(
        now.iter()
            .filter(|l| !l.starts_with("svn_"))
            .collect::<Vec<_>>(),
        links
            .iter()
            .filter(|l| !l.starts_with("svn_"))
            .collect::<Vec<_>>(),
        "bridges and tunnels re-learned, not made again"
    );
    assert_eq!(count(&now, "svn_"), 3, "{now:?}");
    assert_eq!(node.events_n("Tenant Added"), 2, "none sent again");

    // dockerd restarts under the running launcher (--live-restore keeps
    // the containers and their namespaces).
    engine.stop_keeping_containers();
    engine.start_again();
    node.env
        .wait_log_line(&["docker engine reachable again"], WAIT);
    assert!(
        reaches(&engine, &a1, "172.16.0.3", 5),
        "after dockerd's restart"
    );

    // DELETE: TenantRemoved after each subnet's last; nothing left.
    for id in [&a1, &a2, &b1] {
        node.env.lc_ok(&["delete", id]);
    }
    node.env.wait_list("all gone", |l| l.is_empty());
    node.wait_events("Tenant Removed", 2);
    assert_eq!(node.events_n("Tenant Removed"), 2);
    wait_until("no device of ours", || node.ns.our_links().is_empty());
    assert_eq!(node.ns.forward_rules(), 0);
    for id in [&a1, &a2, &b1] {
        assert!(!engine.cli(&["inspect", id]).status.success(), "{id}");
    }
    drop(launcher);
}

#[test]
fn bad_container_networking_is_invalid_data_and_creates_nothing() {
    let engine = engine();
    let node = Node::new(1);
    let _launcher = node.launcher(&engine);
    let bad_mac = node.start_tenant(T_A, C_A, "172.16.0.2", "02:00:ac:10:00");
    node.env
        .wait_log_line(&[&bad_mac, "StartFailure", "invalid_data"], WAIT);
    // A MAC but no subnet and no private ip.
    let no_ip = node.start_plain(&["--tenant", T_A, "--vnic-mac", "02:00:ac:10:00:05"]);
    node.env
        .wait_log_line(&[&no_ip, "StartFailure", "invalid_data"], WAIT);
    node.ns.assert_nothing_of_ours("after bad input");
    for id in [&bad_mac, &no_ip] {
        assert!(!engine.cli(&["inspect", id]).status.success(), "{id}");
    }
    assert_eq!(node.events_n("Tenant Added"), 0);
}

/// The test guest's image name in the node's image directory.
const GUEST: &str = "7e57a9e0-0c1a-4000-8000-000000000004";
const BOOT: Duration = Duration::from_secs(300);

#[test]
fn a_container_and_a_vm_of_one_subnet_ping_each_other() {
    require_qemu();
    let engine = engine();
    let node = Node::new(2);
    node.env.install_guest(GUEST);
    let _launcher = node.launcher(&engine);

    let c1 = node.start_tenant(T_A, C_A, "172.16.0.2", "02:00:ac:10:00:02");
    // The VM takes its address, then pings the container until it answers.
    let ud = node.env.dir.join("ud-vm");
    std::fs::write(
        &ud,
        "#cloud-config\nruncmd:\n  - ip addr add 172.16.0.3/24 dev eth0\n  - \
         i=0; until ping -c 1 -W 1 172.16.0.2 >/dev/null; do i=$((i+1)); \
         [ $i -lt 90 ] || { echo VM-NO-ANSWER; exit 0; }; done; echo VM-ANSWERED\n",
    )
    .expect("user data");
    let vm = node.env.lc_ok(&[
        "start",
        "--image",
        GUEST,
        "--legacy",
        "--mem-mb",
        "64",
        "--user-data",
        ud.to_str().expect("path"),
        "--tenant",
        T_A,
        "--subnet",
        SUBNET,
        "--private-ip",
        "172.16.0.3",
        "--vnic-mac",
        "02:00:ac:10:00:03",
        "--concentrator-uuid",
        C_A,
        "--concentrator-ip",
        "10.9.0.200",
    ]);
    let vm = vm
        .split_whitespace()
        .nth(1)
        .expect("instance id")
        .to_string();
    let c = node.env.wait_console(&vm, "VM-", BOOT);
    assert!(
        c.contains("VM-ANSWERED"),
        "the VM did not reach the container:\n{c}"
    );
    assert!(reaches(&engine, &c1, "172.16.0.3", 10), "container → VM");
    // One bridge for both: one TenantAdded.
    assert_eq!(node.events_n("Tenant Added"), 1);
    assert_eq!(count(&node.ns.our_links(), "sbr_"), 1);
    for id in [&c1, &vm] {
        node.env.lc_ok(&["delete", id]);
    }
    node.env.wait_list("all gone", |l| l.is_empty());
    node.wait_events("Tenant Removed", 1);
    wait_until("no device of ours", || node.ns.our_links().is_empty());
    assert_eq!(node.ns.forward_rules(), 0);
}

#[test]
fn a_network_refusal_after_the_container_started_fails_the_start_and_leaves_nothing() {
    let engine = engine();
    let node = Node::new(3);
    // The real gretap: this kernel has no GRE, so the plug fails at the
    // tunnel, after the container was started and the bridge made.
    let _launcher = node.launcher_tunnel(&engine, "gretap");
    let id = node.start_tenant(T_A, C_A, "172.16.0.2", "02:00:ac:10:00:02");
    let line = node
        .env
        .wait_log_line(&[&id, "StartFailure", "network_failure"], WAIT);
    assert!(line.contains("GRE"), "{line}");
    node.env
        .wait_list("failed START gone", |l| state_of(l, &id).is_none());
    wait_until("its container removed", || {
        !engine.cli(&["inspect", &id]).status.success()
    });
    node.ns.assert_nothing_of_ours("rolled back");
    assert_eq!(node.events_n("Tenant Added"), 0);
    assert_eq!(node.env.instance_dirs(), 0);
}

#[test]
fn a_restart_that_cannot_plug_the_nic_leaves_the_container_stopped() {
    let engine = engine();
    let node = Node::new(4);
    let _launcher = node.launcher(&engine);
    let id = node.start_tenant(T_A, C_A, "172.16.0.2", "02:00:ac:10:00:02");
    node.env.wait_log_line(&[&id, "plugged in as eth0"], WAIT);
    node.env.lc_ok(&["stop", &id]);
    node.env
        .wait_list("exited", |l| state_of(l, &id) == Some("exited"));
    // The subnet's bridge removed behind the launcher's back: the next
    // plug fails when it enslaves the new pair.
    let bridge = node
        .ns
        .our_links()
        .into_iter()
        .find(|l| l.starts_with("sbr_"))
        .expect("the subnet's bridge");
    node.ns.ip(&["link", "del", &bridge]);
    node.env.lc_ok(&["restart", &id]);
    let line = node
        .env
        .wait_log_line(&["RestartFailure", &id, "network_failure"], WAIT);
    assert!(line.contains("RestartFailure"), "{line}");
    // One outcome: not restarted, the container ended again.
    node.env
        .wait_list("exited again", |l| state_of(l, &id) == Some("exited"));
    let running = engine.cli(&["inspect", "-f", "{{.State.Running}}", &id]);
    assert_eq!(
        text(&running.stdout).trim(),
        "false",
        "container still running"
    );
    assert!(!node.env.log().contains(&format!("{id} restarted")));
    node.env.lc_ok(&["delete", &id]);
    node.env
        .wait_list("deleted", |l| state_of(l, &id).is_none());
}
