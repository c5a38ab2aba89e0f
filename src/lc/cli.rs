//! `ciao-lc`'s command line: one subcommand per thing it does.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::ssntp::Profile;

/// The operator's companion for ciao-launcher: certificates, an embedded SSNTP
/// scheduler, and commands to drive launchers through it.
#[derive(Debug, Parser)]
#[command(name = "ciao-lc", version = crate::build_info::VERSION)]
pub struct LcCli {
    #[command(subcommand)]
    pub command: LcCommand,
}

/// Where a client command finds `ciao-lc serve`.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Certificate directory of the running `ciao-lc serve` (its control socket lives there).
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub certs: PathBuf,
    /// The launcher to address (node UUID); default: the only connected one.
    #[arg(long, value_name = "UUID")]
    pub node: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum LcCommand {
    /// Create a CA (the scheduler's certificate, as ciao makes it) and launcher certificates.
    Certs {
        /// Directory to write into (created; existing files are never overwritten).
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// Organisation name in the certificates' subject.
        #[arg(long, value_name = "NAME", default_value = "ciao")]
        org: String,
        /// A DNS name for the scheduler certificate (repeatable). With --host or --ip, only the names given are written, not the defaults (localhost, 127.0.0.1 and this machine's host name).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// An IP address for the scheduler certificate (repeatable; launchers without -server dial these first). Replaces the defaults, as --host does.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
        /// Also name this machine's non-loopback addresses (link-local IPv6 ones excepted) in the scheduler certificate, for launchers on other machines.
        #[arg(long)]
        all_addresses: bool,
        /// Write the scheduler certificate without subject alternative names, as ciao-deploy's launcher certificates and 2016 setups look. Launchers that check the scheduler's name (the 2018 profile by default, Go's ciao master launcher always) refuse such a scheduler.
        #[arg(long, conflicts_with_all = ["hosts", "ips", "all_addresses"])]
        no_san: bool,
    },
    /// Run the embedded SSNTP scheduler and its control socket; print every connection and frame.
    Serve {
        /// Certificate directory made by "ciao-lc certs"; the control socket is created in it.
        #[arg(long, value_name = "DIR", default_value = "certs")]
        certs: PathBuf,
        /// Address to listen on.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8888")]
        listen: SocketAddr,
        /// Protocol profile of the launchers: 2016 or 2018.
        #[arg(long, value_name = "PROFILE", default_value = "2016")]
        protocol: Profile,
        /// Cluster configuration YAML sent in CONNECTED.
        #[arg(long, value_name = "FILE")]
        configuration: Option<PathBuf>,
        /// Print every frame's payload too.
        #[arg(long)]
        verbose: bool,
    },
    /// Start an instance: from a START payload file, or built from flags.
    Start {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        spec: Box<StartArgs>,
    },
    /// Stop an instance (2016: STOP, kept as exited; 2018: DELETE with stop).
    Stop {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// Boot a stopped instance again from its stored configuration (2016 profile).
    Restart {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// Delete an instance and all its files.
    Delete {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
    },
    /// Hot-plug a volume (the file volumes/VOLUME in the node's data directory) into an instance (2018 profile).
    Attach {
        #[command(flatten)]
        target: Target,
        #[arg(value_name = "INSTANCE")]
        instance: String,
        #[arg(value_name = "VOLUME")]
        volume: String,
    },
    /// List the instances of every connected launcher (from their last STATS): state, memory, disk, CPU and the SSH address reported (for a --user-net VM, the 127.0.0.1 port forwarded to its port 22).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Show node statistics of every connected launcher (from their last STATS).
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Print events, errors and status changes as they arrive, until interrupted (with --node: only that launcher's, and rejected connections).
    Watch {
        #[command(flatten)]
        target: Target,
    },
    /// Put a launcher in maintenance and move its instances away (2018 profile).
    Evacuate {
        #[command(flatten)]
        target: Target,
    },
    /// Take a launcher out of maintenance (2018 profile).
    Restore {
        #[command(flatten)]
        target: Target,
    },
    /// Print the status file of the launcher on this node (no scheduler needed): how old it is, whether that launcher still runs, its connection, node UUID, READY/FULL/MAINTENANCE, instances by state and last error.
    NodeStatus {
        /// The launcher's data directory (its -data-dir).
        #[arg(long, value_name = "DIR", default_value = "/var/lib/ciao")]
        data_dir: PathBuf,
    },
}

/// The flags of `ciao-lc start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// A START payload (YAML, as a scheduler sends it); flags are ignored then.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A simulated instance (for launchers run with -simulation): no image needed.
    #[arg(long)]
    pub sim: bool,
    /// Backing image UUID of a VM (the file images/UUID in the node's data directory).
    #[arg(long, value_name = "UUID")]
    pub image: Option<String>,
    /// Run a container of this image instead of a VM.
    #[arg(long = "docker-image", value_name = "IMAGE")]
    pub docker_image: Option<String>,
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long = "mem-mb", value_name = "MB", default_value_t = 128)]
    pub mem_mb: u64,
    #[arg(long = "disk-mb", value_name = "MB", default_value_t = 0)]
    pub disk_mb: u64,
    /// Boot the VM with legacy BIOS instead of EFI.
    #[arg(long)]
    pub legacy: bool,
    /// cloud-init user data file (default: a #cloud-config with no commands).
    #[arg(long = "user-data", value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// Instance UUID (default: a new random one).
    #[arg(long, value_name = "UUID")]
    pub instance: Option<String>,
    /// Tenant UUID (default: a new random one); instances of one tenant
    /// subnet share its bridge on the node.
    #[arg(long, value_name = "UUID")]
    pub tenant: Option<String>,
    /// Tenant networking: the instance's subnet (e.g. 172.16.0.0/24); needs
    /// --private-ip, --vnic-mac, --concentrator-uuid and --concentrator-ip
    /// (for launchers run with -network cn).
    #[arg(long, value_name = "CIDR", requires_all = ["private_ip", "vnic_mac", "concentrator_uuid", "concentrator_ip"])]
    pub subnet: Option<String>,
    /// The instance's address in --subnet.
    #[arg(long = "private-ip", value_name = "IP", requires = "subnet")]
    pub private_ip: Option<String>,
    /// The guest's MAC address (tenant VNIC, or a CNCI's macvtap).
    #[arg(long = "vnic-mac", value_name = "MAC")]
    pub vnic_mac: Option<String>,
    /// The VNIC's UUID (default: a new random one when --vnic-mac is given).
    #[arg(long = "vnic-uuid", value_name = "UUID")]
    pub vnic_uuid: Option<String>,
    /// The subnet's concentrator (CNCI) instance UUID.
    #[arg(long = "concentrator-uuid", value_name = "UUID", requires = "subnet")]
    pub concentrator_uuid: Option<String>,
    /// The concentrator's address on the compute network (the tunnel's far end).
    #[arg(long = "concentrator-ip", value_name = "IP", requires = "subnet")]
    pub concentrator_ip: Option<String>,
    /// Start a concentrator (CNCI) VM: for launchers run with -network nn;
    /// needs --vnic-mac.
    #[arg(long, requires = "vnic_mac", conflicts_with = "subnet")]
    pub cnci: bool,
}
