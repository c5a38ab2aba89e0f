//! netnode: the compute-node half of a tenant VM's START and DELETE, run
//! with the real `gretap` tunnels inside a node VM (tests/gre_nodes.rs).
//!
//! What the launcher does for a VM on a compute node, minus QEMU:
//! 1. `NodeNetwork::init` with the node's compute CIDR (production
//!    [`NetConfig::new`]: `GreTap` tunnels, random names);
//! 2. per instance, `create_vnic` with the START networking fields: this
//!    makes (once per tenant subnet) the bridge `sbr_…`, the keyed gretap
//!    `sgt_…` to the concentrator and the FORWARD rule, then the
//!    persistent tap `svn_…` on the bridge;
//! 3. the instance itself is a stand-in: no VM reads the tap, so a veth
//!    pair `<veth>h`/`<veth>` is made, `<veth>` gets the VNIC's MAC and the
//!    `h` end is enslaved to the same bridge; the caller moves `<veth>` into a network namespace of its own
//!    (the "instance") and gives it `ip`;
//! 4. prints one `NETNODE-VNIC` line per instance (tap, bridge, tunnel,
//!    gateway, the TenantAdded key and agent_ip when the subnet is new),
//!    then `NETNODE-READY`, and blocks until a line arrives on stdin (or
//!    stdin closes): the caller's tests run meanwhile;
//! 5. per instance, `delete_vnic` (a `NETNODE-DELETED` line, with the
//!    TenantRemoved key after a subnet's last VNIC) and the veth pair goes;
//!    finally `NETNODE-LEFT` names any `sbr_`/`sgt_`/`svn_` link still
//!    there (none expected) and `NETNODE-DONE`.
//!
//! Usage:
//!   netnode --compute CIDR [--agent UUID] SPEC...
//!   SPEC = instance=UUID,tenant=UUID,subnet=CIDR,cnci=UUID,cnci_ip=IP,
//!          ip=IP,mac=MAC,vnic=UUID,veth=NAME   (comma separated, any order)
//! Exit status 0 when every step worked, 1 otherwise (the reason is printed).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;

use ciao_launcher::network::{
    DeviceRole, Link, NetConfig, NetError, Netlink, NodeNetwork, VnicGranted, VnicRequest,
    is_device_name,
};

/// One instance of the command line.
#[derive(Debug)]
struct Instance {
    req: VnicRequest,
    /// Base name of the veth pair (at most 14 bytes: `h` is appended).
    veth: String,
}

#[derive(Debug)]
enum Error {
    Usage(String),
    Net(String, NetError),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "usage: {m}"),
            Error::Net(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

fn parse_spec(spec: &str) -> Result<Instance, Error> {
    let mut kv = BTreeMap::new();
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("{part:?} in {spec:?} is not key=value")))?;
        kv.insert(k.trim(), v.trim().to_string());
    }
    let mut take = |k: &str| {
        kv.remove(k)
            .ok_or_else(|| Error::Usage(format!("{spec:?} lacks {k}=")))
    };
    let inst = Instance {
        req: VnicRequest {
            instance_uuid: take("instance")?,
            tenant_uuid: take("tenant")?,
            vnic_uuid: take("vnic")?,
            vnic_mac: take("mac")?,
            network_node: false,
            container: false,
            subnet: take("subnet")?,
            concentrator_uuid: take("cnci")?,
            concentrator_ip: take("cnci_ip")?,
            private_ip: take("ip")?,
        },
        veth: take("veth")?,
    };
    if let Some(k) = kv.keys().next() {
        return Err(Error::Usage(format!("unknown key {k}= in {spec:?}")));
    }
    if inst.veth.is_empty() || inst.veth.len() > 14 {
        return Err(Error::Usage(format!(
            "veth={:?}: 1 to 14 bytes (the host end gets an 'h')",
            inst.veth
        )));
    }
    Ok(inst)
}

fn net(what: &str) -> impl FnOnce(NetError) -> Error + '_ {
    move |e| Error::Net(what.to_string(), e)
}

fn link(links: &[Link], index: u32) -> Option<&Link> {
    links.iter().find(|l| l.index == index)
}

/// Step 3 and the `NETNODE-VNIC` line of one granted VNIC.
fn attach_instance(nl: &mut Netlink, inst: &Instance, g: &VnicGranted) -> Result<(), Error> {
    let links = nl.links().map_err(net("list links"))?;
    let tap = links
        .iter()
        .find(|l| l.name == g.name)
        .ok_or_else(|| Error::Usage(format!("tap {} not in the link list", g.name)))?;
    let bridge = tap
        .master
        .and_then(|m| link(&links, m))
        .ok_or_else(|| Error::Usage(format!("tap {} is on no bridge", g.name)))?;
    let tunnel = links
        .iter()
        .find(|l| l.master == Some(bridge.index) && l.kind.as_deref() == Some("gretap"))
        .map_or("none", |l| l.name.as_str());
    let host = format!("{}h", inst.veth);
    nl.create_veth(&host, &inst.veth)
        .map_err(net("create the instance's veth"))?;
    let h = nl
        .link_by_name(&host)
        .map_err(net("find the veth"))?
        .ok_or_else(|| Error::Usage(format!("veth {host} vanished")))?;
    // The instance end carries the VNIC's MAC, as the VM's NIC would.
    let peer = nl
        .link_by_name(&inst.veth)
        .map_err(net("find the veth"))?
        .ok_or_else(|| Error::Usage(format!("veth {} vanished", inst.veth)))?;
    nl.set_mac(peer.index, g.mac)
        .map_err(net("set the instance MAC"))?;
    nl.set_master(h.index, bridge.index)
        .map_err(net("enslave the veth"))?;
    nl.set_up(h.index).map_err(net("set the veth up"))?;
    let added = g.tenant_added.as_ref().map_or_else(
        || "none".to_string(),
        |t| format!("key={},agent_ip={}", t.subnet_key, t.agent_ip),
    );
    println!(
        "NETNODE-VNIC instance={} tenant={} ip={} tap={} bridge={} tunnel={tunnel} \
         gateway={} veth={} tenant_added={added}",
        inst.req.instance_uuid,
        inst.req.tenant_uuid,
        inst.req.private_ip,
        g.name,
        bridge.name,
        g.gateway
            .map_or_else(|| "none".to_string(), |a| a.to_string()),
        inst.veth,
    );
    Ok(())
}

fn run(args: &[String]) -> Result<(), Error> {
    let mut compute = None;
    let mut agent = "0c1a0000-0000-4000-8000-00000000a9e7".to_string();
    let mut specs = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--compute" => compute = it.next().cloned(),
            "--agent" => {
                agent = it
                    .next()
                    .cloned()
                    .ok_or_else(|| Error::Usage("--agent needs a UUID".into()))?
            }
            s => specs.push(parse_spec(s)?),
        }
    }
    let compute = compute.ok_or_else(|| Error::Usage("--compute CIDR is required".into()))?;
    if specs.is_empty() {
        return Err(Error::Usage("no instance SPEC given".into()));
    }

    // Step 1: compute and management network are the same one here.
    let cfg = NetConfig::new(vec![compute.clone()], vec![compute], &agent);
    let mut node = NodeNetwork::init(cfg).map_err(net("init"))?;
    println!("NETNODE-INIT agent_ip={}", node.agent_ip());
    let mut nl = Netlink::open().map_err(net("open rtnetlink"))?;

    // Steps 2-4.
    for inst in &specs {
        let g = node
            .create_vnic(&inst.req)
            .map_err(net(&inst.req.instance_uuid))?;
        attach_instance(&mut nl, inst, &g)?;
        // The tap stays (persistent); a VM would hold this fd.
        drop(g.fds);
    }
    println!("NETNODE-READY subnets={}", node.subnet_count());
    let mut line = String::new();
    // Any line, or EOF, ends the wait; a read error too (logged).
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("netnode: reading stdin: {e}");
    }

    // Step 5.
    for inst in &specs {
        let removed = node
            .delete_vnic(&inst.req)
            .map_err(net(&inst.req.instance_uuid))?;
        if let Some(h) = nl
            .link_by_name(&format!("{}h", inst.veth))
            .map_err(net("find the veth"))?
        {
            nl.delete_link(h.index).map_err(net("delete the veth"))?;
        }
        println!(
            "NETNODE-DELETED instance={} tenant_removed={}",
            inst.req.instance_uuid,
            removed.map_or_else(|| "none".to_string(), |t| format!("key={}", t.subnet_key))
        );
    }
    let left: Vec<String> = nl
        .links()
        .map_err(net("list links"))?
        .into_iter()
        .filter(|l| {
            [DeviceRole::Bridge, DeviceRole::Tunnel, DeviceRole::Vnic]
                .into_iter()
                .any(|r| is_device_name(r, &l.name))
        })
        .map(|l| l.name)
        .collect();
    println!("NETNODE-LEFT [{}]", left.join(" "));
    println!("NETNODE-DONE subnets={}", node.subnet_count());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("NETNODE-ERROR {e}");
            ExitCode::FAILURE
        }
    }
}
