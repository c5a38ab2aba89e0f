//! The network module against the real kernel, each test in network
//! namespaces of its own (`cnt-<pid>-<n>`), removed on drop even after a
//! panic. The code under test runs in a thread that setns()es into the
//! namespace before it opens any socket, so the host's links are never
//! seen or touched.
//!
//! Container VNICs are plugged into stand-in containers: namespaces with
//! a sleeping child each, whose PID the code is given as Docker would give
//! a container's; they ping each other with busybox.
//!
//! This kernel has no GRE: the tunnel is a veth stand-in (everything else
//! is real), and one test checks that a real gretap fails cleanly.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ciao_launcher::network::{
    DeviceRole, GreTap, Link, NameSource, NetConfig, NetError, Netlink, NodeNetwork, TunnelMaker,
    VethStandIn, VnicRequest, device_name, format_mac, hard_reset, is_device_name, parse_alias,
};
use ciao_launcher::payloads::Reason;
use ciao_launcher::payloads::outgoing::TenantEvent;

const T_A: &str = "67d86208-0000-4465-9018-fe14087d415f";
const T_B: &str = "77d86208-0000-4465-9018-fe14087d4150";
const C_A: &str = "67d86208-b46c-4465-0000-fe14087d415f";
const C_B: &str = "77d86208-b46c-4465-0000-fe14087d4150";
const AGENT: &str = "4481631c-dce9-48d6-b83a-a717417072ce";

/// Fails at once, in one line, when the test cannot run here.
fn require() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "network_ns: needs root (network namespaces, netlink, /dev/net/tun)"
    );
    for tool in ["ip", "iptables"] {
        let ok = Command::new(tool)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "network_ns: `{tool}` is missing (Debian: iproute2 / iptables)"
        );
    }
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "network_ns: /dev/net/tun is missing (kernel tun driver)"
    );
}

static NEXT_NS: AtomicU32 = AtomicU32::new(0);

/// A private network namespace, deleted (with every link in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        require();
        let name = format!(
            "cnt-{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "network_ns: ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    /// `ip -n <ns> <args>`, which must succeed.
    fn ip(&self, args: &str) {
        self.ip_out(args);
    }

    /// `ip -n <ns> <args>`'s output; it must succeed.
    fn ip_out(&self, args: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace())
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A compute node: address-less-kind-accepted bridge `phys0` holding
    /// `ip`/24 (the discovery takes a bridge not named docker*/virbr*).
    fn compute_node(ip: &str) -> Netns {
        let ns = Netns::new();
        ns.ip("link add phys0 type bridge");
        ns.ip(&format!("addr add {ip}/24 dev phys0"));
        ns.ip("link set phys0 up");
        ns
    }

    /// Runs `f` on a thread inside the namespace; a panic there fails the
    /// test after the namespace is still deleted by drop.
    fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/run/netns/{}", self.name);
        let h = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// What the veth stand-in tunnel was asked to make.
type Made = Arc<Mutex<Vec<(String, Ipv4Addr, Ipv4Addr, u32)>>>;

/// The launcher's gretap stand-in (a veth pair, far end `tpr_<hex>`),
/// recording what it was asked to make.
#[derive(Debug, Default)]
struct VethTunnel {
    made: Made,
}

impl TunnelMaker for VethTunnel {
    fn create(
        &mut self,
        nl: &mut Netlink,
        name: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        key: u32,
    ) -> Result<(), NetError> {
        VethStandIn.create(nl, name, local, remote, key)?;
        self.made
            .lock()
            .expect("made")
            .push((name.to_string(), local, remote, key));
        Ok(())
    }
    fn kind(&self) -> &'static str {
        VethStandIn.kind()
    }
}

/// Counting names; optionally, when asked for a VNIC name, first creates
/// a foreign link of that very name (a clash that appears mid-create).
#[derive(Debug)]
struct TestNames {
    next: u32,
    clash_on_vnic: bool,
}

impl NameSource for TestNames {
    fn next(&mut self, role: DeviceRole) -> u32 {
        self.next += 1;
        if role == DeviceRole::Vnic && self.clash_on_vnic {
            let name = device_name(role, self.next);
            let ok = Command::new("ip")
                .args([
                    "link", "add", &name, "type", "veth", "peer", "name", "foreignp",
                ])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "could not make the foreign link {name}");
        }
        self.next
    }
}

fn config(made: &Made, start: u32, clash: bool) -> NetConfig {
    NetConfig {
        compute_nets: vec!["10.99.0.0/24".into()],
        mgmt_nets: vec!["10.99.0.0/24".into()],
        agent_uuid: AGENT.into(),
        tunnels: Box::new(VethTunnel { made: made.clone() }),
        names: Box::new(TestNames {
            next: start,
            clash_on_vnic: clash,
        }),
    }
}

fn vm(instance: &str, tenant: &str, conc: &str, conc_ip: &str, ip: &str) -> VnicRequest {
    VnicRequest {
        instance_uuid: instance.into(),
        tenant_uuid: tenant.into(),
        vnic_uuid: format!("{instance}-vnic"),
        vnic_mac: "02:00:c0:a8:08:02".into(),
        network_node: false,
        subnet: "192.168.8.0/21".into(),
        concentrator_uuid: conc.into(),
        concentrator_ip: conc_ip.into(),
        private_ip: ip.into(),
        container: false,
    }
}

fn links() -> Vec<Link> {
    Netlink::open().expect("netlink").links().expect("links")
}

/// Links that are ours by name or alias.
fn ours(links: &[Link]) -> Vec<String> {
    links
        .iter()
        .filter(|l| {
            parse_alias(&l.alias).is_some()
                || [
                    DeviceRole::Bridge,
                    DeviceRole::Tunnel,
                    DeviceRole::Vnic,
                    DeviceRole::CnciVnic,
                ]
                .iter()
                .any(|r| is_device_name(*r, &l.name))
        })
        .map(|l| format!("{} ({:?}, {:?})", l.name, l.kind, l.alias))
        .collect()
}

fn forward_rules() -> String {
    let out = Command::new("iptables")
        .args(["-w", "-S", "FORWARD"])
        .output()
        .expect("iptables");
    // An empty listing must not pass for "no rule of ours".
    assert!(
        out.status.success(),
        "iptables -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn event(tenant: &str, conc: &str, conc_ip: &str) -> TenantEvent {
    TenantEvent {
        agent_uuid: AGENT.into(),
        agent_ip: "10.99.0.11".into(),
        tenant_uuid: tenant.into(),
        tenant_subnet: "192.168.8.0/21".into(),
        concentrator_uuid: conc.into(),
        concentrator_ip: conc_ip.into(),
        subnet_key: 567488,
    }
}

#[test]
fn one_bridge_per_subnet_events_once_and_clean_teardown() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.run(|| {
        let made = Made::default();
        let mut net = NodeNetwork::init(config(&made, 0x100, false)).expect("init");
        assert_eq!(net.node_networks().len(), 1);
        assert_eq!(net.node_networks()[0].ip, "10.99.0.11");

        let a1 = vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2");
        let a2 = vm("a2", T_A, C_A, "10.99.0.21", "192.168.8.3");
        let g1 = net.create_vnic(&a1).expect("a1");
        assert_eq!(g1.tenant_added, Some(event(T_A, C_A, "10.99.0.21")));
        assert_eq!(g1.fds.len(), 1);
        assert_eq!(format_mac(&g1.mac), "02:00:c0:a8:08:02");
        assert!(!g1.vhost, "this kernel has no /dev/vhost-net");
        assert_eq!(g1.gateway, Some(Ipv4Addr::new(192, 168, 8, 1)));
        let g2 = net.create_vnic(&a2).expect("a2");
        assert_eq!(g2.tenant_added, None, "second VNIC of the subnet: no event");
        assert_eq!(
            made.lock().expect("made").clone(),
            vec![(
                "sgt_102".to_string(),
                Ipv4Addr::new(10, 99, 0, 11),
                Ipv4Addr::new(10, 99, 0, 21),
                567488
            )]
        );

        let all = links();
        let bridges: Vec<&Link> = all.iter().filter(|l| l.name.starts_with("sbr_")).collect();
        assert_eq!(bridges.len(), 1, "{:?}", ours(&all));
        let bridge = bridges[0];
        assert_eq!(bridge.kind.as_deref(), Some("bridge"));
        assert!(
            bridge.alias.starts_with("br_67d86208-0000"),
            "{}",
            bridge.alias
        );
        let tunnel: Vec<&Link> = all.iter().filter(|l| l.name.starts_with("sgt_")).collect();
        assert_eq!(tunnel.len(), 1);
        assert_eq!(tunnel[0].master, Some(bridge.index));
        assert_eq!(tunnel[0].alias, bridge.alias.replacen("br_", "gre_", 1));
        for (g, ip) in [(&g1, "192.168.8.2"), (&g2, "192.168.8.3")] {
            let tap = all.iter().find(|l| l.name == g.name).expect("tap");
            assert_eq!(tap.kind.as_deref(), Some("tun"));
            assert_eq!(tap.master, Some(bridge.index));
            assert!(tap.is_up);
            assert_eq!(
                tap.alias,
                format!("{}##{ip}", bridge.alias.replacen("br_", "vnic_", 1))
            );
        }
        // The fd QEMU gets works: a broadcast frame written to it reaches
        // the bridge (its receive counter moves; bounded wait).
        let frame: Vec<u8> = [[0xff; 6], [0x02, 0, 0xc0, 0xa8, 8, 2]]
            .concat()
            .into_iter()
            .chain([0x88, 0xb5])
            .chain([0u8; 46])
            .collect();
        let rx_before = bridge.rx_packets;
        std::io::Write::write_all(
            &mut std::fs::File::from(g1.fds[0].try_clone().expect("dup")),
            &frame,
        )
        .expect("write to the tap fd");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = links()
                .into_iter()
                .find(|l| l.index == bridge.index)
                .expect("bridge");
            if now.rx_packets > rx_before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "frame never reached the bridge"
            );
            std::thread::yield_now();
        }
        assert!(
            forward_rules().contains(&format!("-A FORWARD -i {} -j ACCEPT", bridge.name)),
            "{}",
            forward_rules()
        );

        // Tenant B, same CIDR, its own concentrator: its own bridge + tunnel.
        let b1 = vm("b1", T_B, C_B, "10.99.0.22", "192.168.8.2");
        let gb = net.create_vnic(&b1).expect("b1");
        assert_eq!(gb.tenant_added, Some(event(T_B, C_B, "10.99.0.22")));
        assert_eq!(net.subnet_count(), 2);
        let all = links();
        assert_eq!(all.iter().filter(|l| l.name.starts_with("sbr_")).count(), 2);
        let tb = all.iter().find(|l| l.name == gb.name).expect("b tap");
        assert_ne!(
            tb.master,
            Some(bridge.index),
            "tenant B must not share A's bridge"
        );
        drop((g1, g2, gb));

        assert_eq!(net.delete_vnic(&a1).expect("del a1"), None);
        assert_eq!(
            net.delete_vnic(&a2).expect("del a2"),
            Some(event(T_A, C_A, "10.99.0.21"))
        );
        assert_eq!(net.delete_vnic(&a2).expect("again"), None, "idempotent");
        assert_eq!(
            net.delete_vnic(&b1).expect("del b1"),
            Some(event(T_B, C_B, "10.99.0.22"))
        );
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(!forward_rules().contains("sbr_"), "{}", forward_rules());
    });
}

#[test]
fn relearn_after_restart_and_delete_still_cleans_up() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.run(|| {
        let made = Made::default();
        let a1 = vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2");
        let a2 = vm("a2", T_A, C_A, "10.99.0.21", "192.168.8.3");
        {
            let mut net = NodeNetwork::init(config(&made, 0x200, false)).expect("init");
            assert!(net.create_vnic(&a1).expect("a1").tenant_added.is_some());
            drop(net.create_vnic(&a2).expect("a2"));
        }
        let before = ours(&links());
        assert_eq!(before.len(), 4, "{before:?}");
        // "Restart": a new object in the same namespace, names from elsewhere.
        let mut net = NodeNetwork::init(config(&made, 0x300, false)).expect("re-init");
        assert_eq!(net.subnet_count(), 1);
        assert_eq!(ours(&links()), before, "init changes nothing");
        let a3 = vm("a3", T_A, C_A, "10.99.0.21", "192.168.8.4");
        let g3 = net.create_vnic(&a3).expect("a3");
        assert_eq!(g3.tenant_added, None, "bridge re-learned: no TenantAdded");
        let g3_name = g3.name.clone();
        // The re-learned VNIC of a1 gets a fresh fd on its persistent tap.
        let again = net.create_vnic(&a1).expect("a1 again");
        assert_eq!(again.fds.len(), 1);
        assert_eq!(again.tenant_added, None);
        // Another instance with a1's address is refused.
        let mut imposter = a1.clone();
        imposter.instance_uuid = "zz".into();
        let e = net.create_vnic(&imposter).expect_err("taken");
        assert_eq!(e.reason(), Reason::NetworkFailure);
        // ... and its DELETE (its START was refused) leaves a1's VNIC alone.
        let n = ours(&links()).len();
        assert_eq!(net.delete_vnic(&imposter).expect("imposter's delete"), None);
        assert_eq!(
            ours(&links()).len(),
            n,
            "the imposter's DELETE removed a1's VNIC"
        );
        drop((g3, again));
        // A tap removed behind our back is not re-created by name (it would
        // be on no bridge): the VM's next start is refused instead.
        let tap = links()
            .into_iter()
            .find(|l| l.name == g3_name)
            .expect("a3's tap");
        Netlink::open()
            .expect("netlink")
            .delete_link(tap.index)
            .expect("delete a3's tap");
        let e = net.create_vnic(&a3).expect_err("tap gone");
        assert_eq!(e.reason(), Reason::NetworkFailure);
        assert!(
            !links().iter().any(|l| l.name == g3_name),
            "a tap was made again"
        );
        assert_eq!(net.delete_vnic(&a1).expect("d1"), None);
        assert_eq!(net.delete_vnic(&a3).expect("d3"), None);
        assert!(net.delete_vnic(&a2).expect("d2").is_some());
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(!forward_rules().contains("sbr_"));
    });
}

#[test]
fn bad_input_creates_nothing() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.run(|| {
        let made = Made::default();
        let mut net = NodeNetwork::init(config(&made, 0x400, false)).expect("init");
        let good = vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2");
        for (field, bad) in [
            (
                "mac",
                VnicRequest {
                    vnic_mac: "zz".into(),
                    ..good.clone()
                },
            ),
            (
                "subnet",
                VnicRequest {
                    subnet: "192.168.8.0".into(),
                    ..good.clone()
                },
            ),
            (
                "conc ip",
                VnicRequest {
                    concentrator_ip: "x".into(),
                    ..good.clone()
                },
            ),
            (
                "private ip",
                VnicRequest {
                    private_ip: "1.2.3".into(),
                    ..good.clone()
                },
            ),
        ] {
            let e = net.create_vnic(&bad).expect_err(field);
            assert_eq!(e.reason(), Reason::InvalidData, "{field}: {e}");
        }
        let key0 = VnicRequest {
            subnet: "0.0.0.0/24".into(),
            ..good.clone()
        };
        let e = net.create_vnic(&key0).expect_err("key 0");
        assert_eq!(e.reason(), Reason::NetworkFailure, "{e}");
        let no_tenant = VnicRequest {
            tenant_uuid: " ".into(),
            ..good.clone()
        };
        assert_eq!(
            net.create_vnic(&no_tenant).expect_err("tenant").reason(),
            Reason::NetworkFailure
        );
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(made.lock().expect("made").is_empty());
        // And a good one still works afterwards.
        assert!(net.create_vnic(&good).expect("good").tenant_added.is_some());
    });
}

#[test]
fn foreign_link_taking_the_name_mid_create_rolls_everything_back() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.run(|| {
        let made = Made::default();
        let mut net = NodeNetwork::init(config(&made, 0x500, true)).expect("init");
        let before: Vec<String> = links().into_iter().map(|l| l.name).collect();
        let e = net
            .create_vnic(&vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2"))
            .expect_err("clash");
        assert_eq!(e.reason(), Reason::NetworkFailure, "{e}");
        assert!(e.to_string().contains("svn_503"), "{e}");
        assert_eq!(
            made.lock().expect("made").len(),
            1,
            "the tunnel was made first"
        );
        let mut after: Vec<String> = links().into_iter().map(|l| l.name).collect();
        // Only the foreign pair is new; bridge, tunnel and rule are gone.
        after.retain(|n| !before.contains(n));
        after.sort();
        assert_eq!(after, ["foreignp", "svn_503"]);
        assert_eq!(ours(&links()).len(), 1, "{:?}", ours(&links())); // the foreign svn_503, no alias
        assert!(!forward_rules().contains("sbr_"), "{}", forward_rules());
        assert_eq!(net.subnet_count(), 0);
    });
}

#[test]
fn hard_reset_removes_ours_and_leaves_foreign_links() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.ip("link add uplink type veth peer name uplinkp");
    ns.ip("link set uplink alias rack-3-uplink");
    // A foreign veth carrying a bridge-shaped alias: wrong kind, not ours.
    ns.ip("link add lookalike type veth peer name lookalikep");
    ns.run(|| {
        let made = Made::default();
        let mut net = NodeNetwork::init(config(&made, 0x600, false)).expect("init");
        drop(
            net.create_vnic(&vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2"))
                .expect("a1"),
        );
        let bridge_alias = links()
            .into_iter()
            .find(|l| l.name.starts_with("sbr_"))
            .expect("bridge")
            .alias;
        let mut nl = Netlink::open().expect("nl");
        let look = nl
            .link_by_name("lookalike")
            .expect("ls")
            .expect("lookalike");
        nl.set_alias(look.index, &bridge_alias).expect("alias");
        let deleted = hard_reset("veth").expect("reset");
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        let left = links();
        for name in ["uplink", "uplinkp", "lookalike", "phys0"] {
            assert!(left.iter().any(|l| l.name == name), "{name} was deleted");
        }
        assert!(
            !left
                .iter()
                .any(|l| l.name.starts_with("sbr_") || l.name.starts_with("svn_"))
        );
        assert!(!forward_rules().contains("sbr_"), "{}", forward_rules());
    });
}

#[test]
fn cnci_vnic_is_a_macvtap_with_the_given_mac() {
    let ns = Netns::compute_node("10.99.0.21");
    ns.run(|| {
        let made = Made::default();
        let mut net = NodeNetwork::init(config(&made, 0x700, false)).expect("init");
        let req = VnicRequest {
            instance_uuid: "cnci1".into(),
            tenant_uuid: T_A.into(),
            vnic_uuid: "vu-1".into(),
            vnic_mac: "02:00:0a:63:00:15".into(),
            network_node: true,
            ..VnicRequest::default()
        };
        let g = net.create_vnic(&req).expect("cnci");
        assert_eq!(g.tenant_added, None);
        assert_eq!(g.fds.len(), 4);
        let all = links();
        let m = all.iter().find(|l| l.name == g.name).expect("macvtap");
        assert!(m.name.starts_with("svc_"));
        assert_eq!(m.kind.as_deref(), Some("macvtap"));
        assert_eq!(m.mac, "02:00:0a:63:00:15");
        assert_eq!(m.alias, format!("cncivnic_{T_A}_vu-1"));
        assert!(m.is_up);
        drop(g);
        let e = net
            .create_vnic(&VnicRequest {
                vnic_mac: "02:00".into(),
                ..req.clone()
            })
            .expect_err("bad mac");
        assert_eq!(e.reason(), Reason::InvalidData);
        assert_eq!(net.delete_vnic(&req).expect("delete"), None);
        assert_eq!(net.delete_vnic(&req).expect("again"), None);
        assert_eq!(ours(&links()), Vec::<String>::new());
    });
}

#[test]
fn real_gretap_fails_cleanly_without_kernel_gre() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.run(|| {
        let mut cfg = config(&Made::default(), 0x800, false);
        cfg.tunnels = Box::new(GreTap);
        let mut net = NodeNetwork::init(cfg).expect("init");
        let e = net
            .create_vnic(&vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2"))
            .expect_err("no GRE here");
        assert!(matches!(e, NetError::Unsupported(_)), "{e:?}");
        assert_eq!(e.reason(), Reason::NetworkFailure);
        assert!(e.to_string().contains("no GRE tunnel support"), "{e}");
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(!forward_rules().contains("sbr_"));
    });
}

#[test]
fn namespace_is_removed_even_after_a_panic() {
    let ns = Netns::compute_node("10.99.0.11");
    let name = ns.name.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        ns.run(|| {
            let made = Made::default();
            let mut net = NodeNetwork::init(config(&made, 0x900, false)).expect("init");
            drop(net.create_vnic(&vm("a1", T_A, C_A, "10.99.0.21", "192.168.8.2")));
            panic!("deliberate");
        })
    }));
    assert!(r.is_err(), "the closure panicked");
    assert!(
        !std::path::Path::new(&format!("/run/netns/{name}")).exists(),
        "namespace {name} left behind"
    );
}

#[test]
fn instance_threads_sharing_the_lock_get_one_added_and_one_removed() {
    let ns = Netns::compute_node("10.99.0.11");
    ns.run(|| {
        let made = Made::default();
        let net = Arc::new(Mutex::new(
            NodeNetwork::init(config(&made, 0xa00, false)).expect("init"),
        ));
        let reqs: Vec<VnicRequest> = (2..6)
            .map(|i| {
                vm(
                    &format!("i{i}"),
                    T_A,
                    C_A,
                    "10.99.0.21",
                    &format!("192.168.8.{i}"),
                )
            })
            .collect();
        // Threads spawned here inherit this thread's namespace.
        let run_all = |delete: bool| -> usize {
            let (tx, rx) = crossbeam_channel::unbounded();
            for r in reqs.clone() {
                let (net, tx) = (net.clone(), tx.clone());
                std::thread::spawn(move || {
                    let mut n = net.lock().expect("lock");
                    let event = if delete {
                        n.delete_vnic(&r).expect("delete").is_some()
                    } else {
                        n.create_vnic(&r).expect("create").tenant_added.is_some()
                    };
                    let _ = tx.send(event);
                });
            }
            (0..reqs.len())
                .map(|_| {
                    rx.recv_timeout(std::time::Duration::from_secs(30))
                        .expect("an instance thread finished in time")
                })
                .filter(|e| *e)
                .count()
        };
        assert_eq!(run_all(false), 1, "exactly one TenantAdded");
        assert_eq!(made.lock().expect("made").len(), 1, "one tunnel");
        assert_eq!(
            links()
                .iter()
                .filter(|l| l.name.starts_with("svn_"))
                .count(),
            4
        );
        assert_eq!(run_all(true), 1, "exactly one TenantRemoved");
        assert_eq!(ours(&links()), Vec::<String>::new());
    });
}

// ---- Container VNICs -------------------------------------------------
//
// A "container" here is a namespace of its own with a sleeping child in
// it: the child's PID plays the part of the PID Docker inspect reports.

/// A stand-in container: `ip netns exec <ns> sleep`, killed (by its PID)
/// and its namespace deleted on drop or `stop`.
struct FakeContainer {
    ns: Netns,
    child: std::process::Child,
}

impl FakeContainer {
    fn start() -> FakeContainer {
        let ok = Command::new("busybox")
            .arg("true")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "network_ns: `busybox` is missing (Debian: busybox-static)"
        );
        let ns = Netns::new();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "600"])
            .spawn()
            .expect("spawn the sleeping child");
        let c = FakeContainer { ns, child };
        // `ip netns exec` enters the namespace, then execs sleep: once the
        // child is sleep, it is inside (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let comm = format!("/proc/{}/comm", c.pid());
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
            assert!(
                std::time::Instant::now() < deadline,
                "the fake container never started"
            );
            std::thread::yield_now();
        }
        c
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Names of the links inside.
    fn link_names(&self) -> Vec<String> {
        self.ns
            .ip_out("-o link show")
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// One ping from inside to `ip` (1 s timeout).
    fn pings(&self, ip: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns.name,
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                ip,
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Pings `ip` until it answers, at most `tries` times (the first frames
    /// may go to ARP).
    fn reaches(&self, ip: &str, tries: u32) -> bool {
        (0..tries).any(|_| self.pings(ip))
    }

    /// The container stops: its process ends and its namespace dies (with
    /// the veth in it).
    fn stop(self) {
        drop(self);
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // self.ns is dropped after this: `ip netns del`.
    }
}

fn container(instance: &str, tenant: &str, conc: &str, ip: &str, mac: &str) -> VnicRequest {
    VnicRequest {
        vnic_mac: mac.into(),
        container: true,
        ..vm(instance, tenant, conc, "10.99.0.21", ip)
    }
}

/// `eth0` inside `c` is the tenant NIC of `ip` with `mac`, read with `ip`.
fn assert_eth0(c: &FakeContainer, ip: &str, mac: &str) {
    let link = c.ns.ip_out("link show eth0");
    assert!(link.contains(" mtu 1400 "), "{link}");
    assert!(link.contains(&format!("link/ether {mac} ")), "{link}");
    assert!(link.contains(",UP,") || link.contains("<UP,"), "{link}");
    let addr = c.ns.ip_out("-4 -o addr show dev eth0");
    assert!(addr.contains(&format!("inet {ip}/21 ")), "{addr}");
    let route = c.ns.ip_out("-4 route show default");
    assert_eq!(
        route.split_whitespace().take(5).collect::<Vec<_>>(),
        ["default", "via", "192.168.8.1", "dev", "eth0"],
        "{route}"
    );
}

const MAC1: &str = "02:00:c0:a8:08:02";
const MAC2: &str = "02:00:c0:a8:08:03";
const MAC3: &str = "02:00:c0:a8:08:04";

#[test]
fn containers_of_a_subnet_ping_each_other_and_not_the_other_tenant() {
    let node = Netns::compute_node("10.99.0.11");
    let (c1, c2, c3) = (
        FakeContainer::start(),
        FakeContainer::start(),
        FakeContainer::start(),
    );
    let (p1, p2, p3) = (c1.pid(), c2.pid(), c3.pid());
    let a1 = container("a1", T_A, C_A, "192.168.8.2", MAC1);
    let a2 = container("a2", T_A, C_A, "192.168.8.3", MAC2);
    let b1 = container("b1", T_B, C_B, "192.168.8.4", MAC3);
    let (r1, r2, rb) = (a1.clone(), a2.clone(), b1.clone());
    let made = Made::default();
    let made_in = made.clone();
    let net = node.run(move || {
        let mut net = NodeNetwork::init(config(&made_in, 0xb00, false)).expect("init");
        let g1 = net.plug_container_vnic(&r1, p1).expect("a1");
        assert_eq!(g1.tenant_added, Some(event(T_A, C_A, "10.99.0.21")));
        assert_eq!(g1.gateway, Ipv4Addr::new(192, 168, 8, 1));
        assert_eq!((g1.ip, g1.prefix), (Ipv4Addr::new(192, 168, 8, 2), 21));
        let g2 = net.plug_container_vnic(&r2, p2).expect("a2");
        assert_eq!(g2.tenant_added, None, "second VNIC of the subnet");
        let gb = net.plug_container_vnic(&rb, p3).expect("b1");
        assert!(gb.tenant_added.is_some(), "tenant B: its own bridge");
        let all = links();
        let bridge_of = |name: &str| {
            all.iter()
                .find(|l| l.name == name)
                .and_then(|l| l.master)
                .expect("host end on a bridge")
        };
        assert_eq!(bridge_of(&g1.name), bridge_of(&g2.name));
        assert_ne!(bridge_of(&g1.name), bridge_of(&gb.name));
        for g in [&g1, &g2] {
            let host = all.iter().find(|l| l.name == g.name).expect("host end");
            assert_eq!(host.kind.as_deref(), Some("veth"));
            assert!(host.is_up);
            assert!(
                host.alias.starts_with("vnic_67d86208-0000"),
                "{}",
                host.alias
            );
            assert!(
                host.alias.ends_with(&format!("##{}", g.ip)),
                "{}",
                host.alias
            );
        }
        // The container ends left this namespace.
        assert!(
            !all.iter().any(|l| l.name.starts_with("svp_")),
            "{:?}",
            ours(&all)
        );
        net
    });
    assert_eth0(&c1, "192.168.8.2", MAC1);
    assert_eth0(&c2, "192.168.8.3", MAC2);
    assert_eq!(c1.link_names(), ["lo", "eth0"]);
    let host_mtu = node.ip_out("-o link show");
    assert_eq!(
        host_mtu
            .lines()
            .filter(|l| l.contains(": svn_") && l.contains(" mtu 1400 "))
            .count(),
        3,
        "{host_mtu}"
    );
    assert!(c1.reaches("192.168.8.3", 5), "a1 cannot reach a2");
    assert!(c2.reaches("192.168.8.2", 5), "a2 cannot reach a1");
    assert!(!c3.pings("192.168.8.2"), "tenant B reached tenant A");
    assert!(!c3.pings("192.168.8.3"), "tenant B reached tenant A");
    assert!(!c1.pings("192.168.8.4"), "tenant A reached tenant B");
    // has_nic sees the NIC; a container without one is told apart.
    let ns1 = ciao_launcher::network::ContainerNetns::of_pid(p1).expect("ns of c1");
    assert!(ns1.has_nic([2, 0, 0xc0, 0xa8, 8, 2]).expect("has_nic"));
    assert!(!ns1.has_nic([2, 0, 0xc0, 0xa8, 8, 9]).expect("has_nic"));

    let removed = node.run(move || {
        let mut net = net;
        let d1 = net.delete_vnic(&a1).expect("d1");
        let d2 = net.delete_vnic(&a2).expect("d2");
        let again = net.delete_vnic(&a2).expect("d2 again");
        let db = net.delete_vnic(&b1).expect("db");
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(!forward_rules().contains("sbr_"), "{}", forward_rules());
        [d1.is_some(), d2.is_some(), again.is_some(), db.is_some()]
    });
    assert_eq!(
        removed,
        [false, true, false, true],
        "TenantRemoved after the last"
    );
    assert_eq!(c1.link_names(), ["lo"], "eth0 left in the container");
    assert_eq!(made.lock().expect("made").len(), 2, "one tunnel per subnet");
}

#[test]
fn container_stop_restart_and_launcher_restart_keep_mac_ip_and_reach() {
    let node = Netns::compute_node("10.99.0.11");
    let (c1, c2) = (FakeContainer::start(), FakeContainer::start());
    let a1 = container("a1", T_A, C_A, "192.168.8.2", MAC1);
    let a2 = container("a2", T_A, C_A, "192.168.8.3", MAC2);
    let made = Made::default();
    {
        let (r1, r2, p1, p2, m) = (a1.clone(), a2.clone(), c1.pid(), c2.pid(), made.clone());
        node.run(move || {
            let mut net = NodeNetwork::init(config(&m, 0xc00, false)).expect("init");
            assert!(
                net.plug_container_vnic(&r1, p1)
                    .expect("a1")
                    .tenant_added
                    .is_some()
            );
            net.plug_container_vnic(&r2, p2).expect("a2");
            // The "launcher" ends here (its object is dropped, nothing
            // is removed: as a kill -9).
        });
    }
    assert!(c1.reaches("192.168.8.3", 5));
    // a2 stops: its namespace dies, and the pair with it.
    c2.stop();
    // The launcher restarts: the running container's host end is
    // re-learned by its alias; the stopped one is claimed without a device.
    let c2 = FakeContainer::start();
    let (r1, r2, p2, m) = (a1.clone(), a2.clone(), c2.pid(), made.clone());
    let net = node.run(move || {
        let mut net = NodeNetwork::init(config(&m, 0xd00, false)).expect("re-init");
        assert_eq!(net.subnet_count(), 1);
        assert!(net.claim_vnic(&r1));
        assert!(net.claim_vnic(&r2), "a stopped container's VNIC is claimed");
        // Another instance cannot take a2's address meanwhile.
        let mut imposter = r2.clone();
        imposter.instance_uuid = "zz".into();
        let e = net.plug_container_vnic(&imposter, p2).expect_err("taken");
        assert_eq!(e.reason(), Reason::NetworkFailure);
        // RESTART of a2: a new pair, same MAC and address, no TenantAdded.
        let g = net.plug_container_vnic(&r2, p2).expect("a2 again");
        assert_eq!(g.tenant_added, None);
        net
    });
    assert_eth0(&c2, "192.168.8.3", MAC2);
    assert!(c2.reaches("192.168.8.2", 5), "restarted a2 cannot reach a1");
    assert!(c1.reaches("192.168.8.3", 5), "a1 cannot reach restarted a2");
    // a2 stops once more, and is deleted while stopped; then a1.
    c2.stop();
    let removed = node.run(move || {
        let mut net = net;
        let d2 = net.delete_vnic(&a2).expect("d2").is_some();
        let left = ours(&links()).len();
        let d1 = net.delete_vnic(&a1).expect("d1").is_some();
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(!forward_rules().contains("sbr_"));
        (d2, left, d1)
    });
    // After a2: bridge, tunnel, a1's host end (a2's may still be going).
    assert!(!removed.0 && removed.1 >= 3 && removed.2, "{removed:?}");
    assert_eq!(made.lock().expect("made").len(), 1, "the tunnel was kept");
}

#[test]
fn container_bad_input_and_a_failure_mid_create_leave_nothing() {
    let node = Netns::compute_node("10.99.0.11");
    let c = FakeContainer::start();
    // The container already has an eth0: configuring inside fails after
    // bridge, tunnel, rule and pair were made and the peer moved in.
    c.ns.ip("link add eth0 type bridge");
    let pid = c.pid();
    let good = container("a1", T_A, C_A, "192.168.8.2", MAC1);
    let made = Made::default();
    let m = made.clone();
    let g = good.clone();
    let net = node.run(move || {
        let mut net = NodeNetwork::init(config(&m, 0xe00, false)).expect("init");
        for (what, bad) in [
            (
                "no private ip",
                VnicRequest {
                    private_ip: String::new(),
                    ..g.clone()
                },
            ),
            (
                "bad mac",
                VnicRequest {
                    vnic_mac: "02:00:c0:a8:08".into(),
                    ..g.clone()
                },
            ),
        ] {
            let e = net.plug_container_vnic(&bad, pid).expect_err(what);
            assert_eq!(e.reason(), Reason::InvalidData, "{what}: {e}");
        }
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(m.lock().expect("made").is_empty());
        let e = net.plug_container_vnic(&g, pid).expect_err("eth0 taken");
        assert_eq!(e.reason(), Reason::NetworkFailure, "{e}");
        assert!(e.to_string().contains("eth0"), "{e}");
        assert_eq!(
            m.lock().expect("made").len(),
            1,
            "it got as far as the tunnel"
        );
        assert_eq!(ours(&links()), Vec::<String>::new());
        assert!(!forward_rules().contains("sbr_"), "{}", forward_rules());
        assert_eq!(net.subnet_count(), 0);
        // A process that is gone: refused before anything is made.
        let e = net
            .plug_container_vnic(&g, u32::MAX)
            .expect_err("no such process");
        assert_eq!(e.reason(), Reason::NetworkFailure);
        assert_eq!(ours(&links()), Vec::<String>::new());
        net
    });
    // Inside: the foreign eth0 and lo only (the moved peer went with its
    // host end).
    let mut inside = c.link_names();
    inside.sort();
    assert_eq!(inside, ["eth0", "lo"]);
    // Clean state: with the name free the same request works.
    c.ns.ip("link del eth0");
    node.run(move || {
        let mut net = net;
        let g = net.plug_container_vnic(&good, pid).expect("plug");
        assert!(g.tenant_added.is_some());
        assert!(net.delete_vnic(&good).expect("delete").is_some());
        assert_eq!(ours(&links()), Vec::<String>::new());
    });
}
