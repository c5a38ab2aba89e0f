//! Command line of the binaries.
//!
//! ciao's Go tools take single-dash long flags (`-cacert=x`, `-v 2`,
//! `-network=false`); clap only knows `--long`. [`normalize_args`] rewrites
//! `-name` and `-name=value` to `--name…` for the long names (and aliases) a
//! clap command declares, and leaves everything else alone: short flags,
//! unknown words (clap then reports them), and all arguments after `--`.
//!
//! [`LauncherCli`] is `ciao-launcher`'s command line; [`parse_launcher_args`]
//! turns `argv` into a validated [`Config`] with every default resolved. The
//! man pages' hand-written prose lives beside them in `man/` (see
//! `examples/gen-man.rs`).

use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};
use log::LevelFilter;

use crate::network::TunnelKind;
use crate::ssntp::Profile;
use crate::virt::qemu::ChildUser;

/// Rewrites Go-style single-dash long flags known to `cmd`.
pub fn normalize_args(
    cmd: &clap::Command,
    args: impl IntoIterator<Item = OsString>,
) -> Vec<OsString> {
    let mut longs: Vec<String> = Vec::new();
    collect_longs(cmd, &mut longs);
    let mut out = Vec::new();
    let mut rest = false;
    for a in args {
        if rest {
            out.push(a);
            continue;
        }
        let Some(s) = a.to_str() else {
            out.push(a);
            continue;
        };
        if s == "--" {
            rest = true;
            out.push(a);
            continue;
        }
        let rewritten = s
            .strip_prefix('-')
            .filter(|r| !r.starts_with('-'))
            .and_then(|r| {
                let name = r.split_once('=').map_or(r, |(n, _)| n);
                longs.iter().any(|l| l == name).then(|| format!("--{r}"))
            });
        out.push(rewritten.map_or(a, OsString::from));
    }
    out
}

fn collect_longs(cmd: &clap::Command, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        if let Some(l) = arg.get_long() {
            // A one-letter long name would shadow a short flag.
            if l.len() > 1 {
                out.push(l.to_string());
            }
        }
        if let Some(aliases) = arg.get_all_aliases() {
            out.extend(
                aliases
                    .into_iter()
                    .filter(|a| a.len() > 1)
                    .map(str::to_string),
            );
        }
    }
    for sub in cmd.get_subcommands() {
        collect_longs(sub, out);
    }
}

/// Help headings: clap groups `--help` by them and clap_mangen makes each a
/// man page section.
const NODE: &str = "Node options";
const LOGGING: &str = "Logging options (glog style)";

/// `ciao-launcher`'s command line, as clap sees it. Use
/// [`parse_launcher_args`] (Go-style flags, validation, resolved defaults)
/// rather than parsing this directly.
#[derive(Debug, Parser)]
#[command(
    name = "ciao-launcher",
    version = crate::build_info::VERSION,
    override_usage = "ciao-launcher [OPTIONS] [--cacert FILE] [--cert FILE]\n       ciao-launcher [OPTIONS] --hard-reset",
    about = "The compute-node agent of the CIAO cloud orchestrator",
    long_about = "ciao-launcher runs on every compute node (and network node) of a CIAO cloud. \
It keeps one mutually authenticated TLS connection (SSNTP) to the ciao scheduler, \
reports the node's capacity and its instances' statistics, and starts, stops and \
deletes the virtual machines and containers the scheduler asks for.

Its role (agent and/or netagent) comes from its certificate. Without --server it \
dials the names in the CA certificate's subject alternative names, then localhost, \
on port 8888, and keeps reconnecting for as long as it runs.

Flags may be written the Go way, with one dash (-cacert=FILE, -v 2, -network=false, \
-log_dir DIR), or the GNU way (--cacert FILE). Boolean flags take an optional \
=true or =false (also 1, t, T, TRUE, True and their false forms), as Go's flag \
package does; a bare flag means true."
)]
pub struct LauncherCli {
    /// Scheduler address (default: the CA certificate's IP then DNS subject alternative names, then localhost; port 8888).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub server: Option<String>,

    /// CA certificate (PEM) that the scheduler's certificate must lead to (default: /etc/pki/ciao/CAcert-server-localhost.pem, as the Go launcher had it).
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,

    /// This node's certificate and private key in one PEM file; it must carry the agent and/or netagent role (default: /etc/pki/ciao/cert-client-localhost.pem, as the Go launcher had it).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Protocol profile: the ciao generation of the scheduler (see PROTOCOL PROFILES in ciao-launcher(8)).
    #[arg(long, value_name = "PROFILE", default_value = "2016", value_parser = profile_parser())]
    pub protocol: Profile,

    /// Require the scheduler's certificate to name the address dialled: an IP subject alternative name for an IP address, a DNS one for a host name, as Go checks it. On by default with --protocol 2018 (ciao master's launcher always checks); off by default with 2016 (its launchers did not, and older certificates may carry no names). A mismatch stops the launcher with exit status 4. -verify-hostname=false turns the check off, with a warning.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub verify_hostname: Option<bool>,

    /// Root of the launcher's files: instances, images, node UUID, logs, lock file.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ciao")]
    pub data_dir: PathBuf,

    /// Run with a simulated virtualizer: instances are pretend, nothing is started on the host.
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub simulation: bool,

    /// Stop and delete every instance this launcher knows in the data directory, then exit without connecting. Needs neither --cacert nor --cert.
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool)]
    pub hard_reset: bool,

    /// Tenant networking: none, cn (compute node: a bridge and a GRE tunnel to the concentrator per tenant subnet, a tap for every VM) or nn (network node: a macvtap for every concentrator VM). -network=false means none, -network=true or a bare -network means cn.
    // No require_equals: the 2016 launcher's string flag was written `-network nn`,
    // and with no positional arguments a following word can only be its value.
    #[arg(long, value_name = "MODE", default_value = "none", num_args = 0..=1,
          default_missing_value = "cn", action = ArgAction::Set, ignore_case = true, help_heading = NODE)]
    pub network: NetworkMode,

    /// Give every virtual machine a QEMU user-mode NIC for single-node use: the guest can reach nothing outside QEMU (restrict=on), and its SSH port 22 is forwarded from a free port on 127.0.0.1, which STATS reports as the instance's ssh_ip and ssh_port (ciao-lc list shows it). Only with --network none.
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool, help_heading = NODE)]
    pub user_net: bool,

    /// Largest number of instances the node accepts; a START beyond it is refused with full_cn (default: 32 with --protocol 2016, the open-file limit / 5 with 2018).
    #[arg(long, value_name = "N", help_heading = NODE)]
    pub max_vm: Option<u32>,

    /// Compute (tenant) network of this node; repeat the flag for several.
    #[arg(long, value_name = "CIDR", action = ArgAction::Append, help_heading = NODE)]
    pub compute_net: Vec<String>,

    /// The device that carries a tenant subnet to its concentrator: gretap (production), or veth, a stand-in that carries nothing, for test nodes whose kernel has no GRE.
    #[arg(long, value_name = "KIND", default_value = "gretap", help_heading = NODE)]
    pub tunnel_kind: TunnelKindArg,

    /// Management network of this node; repeat the flag for several.
    #[arg(long, value_name = "CIDR", action = ArgAction::Append, help_heading = NODE)]
    pub mgmt_net: Vec<String>,

    /// Check available disk space against --disk-limit-mb.
    #[arg(long, value_name = "BOOL", default_value = "true", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool, help_heading = NODE)]
    pub disk_limit: bool,

    /// Report the node FULL when less than N MB of disk is available.
    #[arg(long, value_name = "N", default_value_t = 80_000, help_heading = NODE)]
    pub disk_limit_mb: u64,

    /// Check available memory against --mem-limit-mb.
    #[arg(long, value_name = "BOOL", default_value = "true", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool, help_heading = NODE)]
    pub mem_limit: bool,

    /// Report the node FULL when less than N MB of memory is available.
    #[arg(long, value_name = "N", default_value_t = 1_000, help_heading = NODE)]
    pub mem_limit_mb: u64,

    /// Seconds between STATUS and STATS reports, fractions allowed (default: 30 with --protocol 2016, 6 with 2018).
    #[arg(long, value_name = "SECONDS", help_heading = NODE)]
    pub stats_interval: Option<f64>,

    /// User interface of virtual machines: none (headless), nc (serial console on a TCP port, for netcat) or spice. A bare -with-ui means nc, the Go launcher's default.
    // No require_equals: Go's string flag was written `-with-ui spice`.
    #[arg(long, value_name = "UI", default_value = "none", num_args = 0..=1,
          default_missing_value = "nc", action = ArgAction::Set, help_heading = NODE)]
    pub with_ui: UiMode,

    /// Stack size of each instance thread, in KiB.
    #[arg(long, value_name = "N", default_value_t = 128, help_heading = NODE)]
    pub instance_stack_kib: usize,

    /// The Docker engine's API socket (containers: vm_type docker).
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock", help_heading = NODE)]
    pub docker_socket: PathBuf,

    /// Seconds between samples of each instance's CPU, memory and disk use (fractions allowed).
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0, help_heading = NODE)]
    pub usage_interval: f64,

    /// Seconds a STOP waits for an instance to shut down before it is killed.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, help_heading = NODE)]
    pub stop_timeout: u64,

    /// Accelerator of virtual machines: auto (KVM where /dev/kvm can run guests, else TCG emulation), kvm or tcg.
    #[arg(long, value_name = "ACCEL", default_value = "auto", help_heading = NODE)]
    pub qemu_accel: QemuAccel,

    /// The QEMU system emulator run for virtual machines (searched in PATH unless it contains a slash).
    #[arg(long, value_name = "PROGRAM", default_value = "qemu-system-x86_64", help_heading = NODE)]
    pub qemu: PathBuf,

    /// The qemu-img program (image inspection and overlays).
    #[arg(long, value_name = "PROGRAM", default_value = "qemu-img", help_heading = NODE)]
    pub qemu_img: PathBuf,

    /// Run QEMU, qemu-img and xorriso as this user (a name, or the uid of an existing user) and its primary group; QEMU drops to it once it has opened its files and devices. Wins over the cluster configuration's launcher.child_user (2018). An unknown user is a command-line error. Default: the launcher's own user, root.
    #[arg(long, value_name = "USER", help_heading = NODE)]
    pub child_user: Option<String>,

    /// EFI firmware for fw_type efi: a combined OVMF.fd, or an OVMF_CODE file whose OVMF_VARS sibling is copied per VM (default: searched in /usr/share/OVMF, /usr/share/qemu, /usr/share/edk2/ovmf).
    #[arg(long, value_name = "FILE", help_heading = NODE)]
    pub ovmf: Option<PathBuf>,

    /// Verbosity: 0 logs information, 1 and 2 add debugging, 3 and more trace everything.
    #[arg(short = 'v', long = "v", value_name = "N", default_value_t = 0, help_heading = LOGGING)]
    pub verbosity: u8,

    /// Log to standard error instead of files.
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool, help_heading = LOGGING)]
    pub logtostderr: bool,

    /// Log to standard error as well as to files.
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", action = ArgAction::Set, value_parser = parse_go_bool, help_heading = LOGGING)]
    pub alsologtostderr: bool,

    /// Directory of the log files (default: DIR/logs, DIR being --data-dir). Also spelt --log_dir, as in Go.
    #[arg(long, value_name = "DIR", alias = "log_dir", help_heading = LOGGING)]
    pub log_dir: Option<PathBuf>,

    /// glog's per-module verbosity (pattern=N,...): accepted so that Go command lines work, and ignored with a warning; -v applies to every module.
    #[arg(long, value_name = "PATTERN=N,...", help_heading = LOGGING)]
    pub vmodule: Option<String>,

    /// glog's stack trace at a log line (FILE:LINE): accepted so that Go command lines work, and ignored with a warning. Also spelt --log_backtrace_at.
    #[arg(long, value_name = "FILE:LINE", alias = "log_backtrace_at", help_heading = LOGGING)]
    pub log_backtrace_at: Option<String>,

    /// Messages at or above this severity also go to standard error: INFO, WARNING, ERROR, FATAL or 0 to 3.
    #[arg(long, value_name = "LEVEL", default_value = "ERROR", ignore_case = true,
          hide_possible_values = true, help_heading = LOGGING)]
    pub stderrthreshold: Severity,
}

/// Accelerator of virtual machines (`--qemu-accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QemuAccel {
    /// KVM when /dev/kvm is read-write and backed by kvm_intel or kvm_amd, else TCG.
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// Tenant networking mode (`--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkMode {
    /// No tenant networking (also -network=false).
    #[value(aliases = ["false", "0", "f"])]
    None,
    /// Compute node: tenant bridges for instances (also -network=true).
    #[value(aliases = ["true", "1", "t"])]
    Cn,
    /// Network node: hosts the tenants' concentrator instances (CNCIs).
    Nn,
}

/// Tunnel device of the tenant subnets (`--tunnel-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TunnelKindArg {
    /// Keyed Ethernet over GRE, as ciao.
    Gretap,
    /// A veth stand-in (tests on kernels without GRE).
    Veth,
}

/// How virtual machines are displayed (`--with-ui`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UiMode {
    /// Headless.
    None,
    /// Serial console on a TCP port (reach it with netcat).
    Nc,
    /// SPICE display.
    Spice,
}

/// glog severities (`--stderrthreshold`); glog also accepts their numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Severity {
    #[value(name = "INFO", alias = "0")]
    Info,
    #[value(name = "WARNING", alias = "1")]
    Warning,
    #[value(name = "ERROR", alias = "2")]
    Error,
    #[value(name = "FATAL", alias = "3")]
    Fatal,
}

impl Severity {
    /// `log` has no fatal level: fatal messages are logged as errors, so
    /// FATAL lets errors through as ERROR does.
    pub fn level_filter(self) -> LevelFilter {
        match self {
            Severity::Info => LevelFilter::Info,
            Severity::Warning => LevelFilter::Warn,
            Severity::Error | Severity::Fatal => LevelFilter::Error,
        }
    }
}

/// Go's `strconv.ParseBool`, which is what `-flag=value` accepts in Go.
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err("expected true or false (or 1, t, T, TRUE, True, 0, f, F, FALSE, False)".into()),
    }
}

/// `--protocol`: listing the values lets `--help` and the man page show them.
fn profile_parser() -> impl TypedValueParser<Value = Profile> {
    PossibleValuesParser::new([
        PossibleValue::new("2016").help("ciao of April 2016 (commit e7061307)"),
        PossibleValue::new("2018").help("ciao master, the last ciao release line"),
    ])
    .try_map(|s| s.parse::<Profile>())
}

/// An IP network (`--compute-net`, `--mgmt-net`), host bits cleared as Go's
/// `net.ParseCIDR` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in this network (never across address families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.network
            }
            _ => false,
        }
    }
}

/// `ip` with every bit after the first `prefix` cleared (`prefix` is in range).
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or("expected ADDRESS/PREFIX, e.g. 192.168.1.0/24")?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix length {prefix:?} is not a number from 0 to {max}"))?;
        Ok(Cidr {
            network: mask(addr, prefix),
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// What the launcher has been asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Connect to the scheduler and manage instances.
    Run { cacert: PathBuf, cert: PathBuf },
    /// Remove every instance and exit (`--hard-reset`).
    HardReset,
}

/// Logging settings, glog's flags resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// From `-v`: 0 → Info, 1–2 → Debug, ≥ 3 → Trace.
    pub verbosity: LevelFilter,
    pub logtostderr: bool,
    pub alsologtostderr: bool,
    /// `--log-dir`, else `<data-dir>/logs`.
    pub dir: PathBuf,
    /// `--stderrthreshold` (FATAL is Error: `log` has no fatal level).
    pub stderr_threshold: LevelFilter,
}

impl LogConfig {
    /// Standard error only, from `level` (`ciao-lc`): no log file.
    pub fn stderr_only(level: LevelFilter) -> LogConfig {
        LogConfig {
            verbosity: level,
            logtostderr: true,
            alsologtostderr: false,
            dir: PathBuf::new(),
            stderr_threshold: level,
        }
    }
}

/// The launcher's validated configuration, every default resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    /// `--server` as given (trimmed); `None`: dial the CA certificate's names.
    pub server: Option<String>,
    pub protocol: Profile,
    /// `--verify-hostname`, else true in the 2018 profile, false in 2016.
    pub verify_hostname: bool,
    pub data_dir: PathBuf,
    pub simulation: bool,
    pub network: NetworkMode,
    /// `--user-net` (only with `network` none).
    pub user_net: bool,
    /// At least 1; `None`: the profile's default (32 in 2016, the open-file
    /// limit / 5 in 2018, known only once the limit is raised).
    pub max_vm: Option<u32>,
    pub compute_net: Vec<Cidr>,
    pub mgmt_net: Vec<Cidr>,
    pub tunnel_kind: TunnelKind,
    pub disk_limit: bool,
    /// FULL when less disk than this is available (MB), if `disk_limit`.
    pub disk_limit_mb: u64,
    pub mem_limit: bool,
    /// FULL when less memory than this is available (MB), if `mem_limit`.
    pub mem_limit_mb: u64,
    /// `--stats-interval`, else the profile's period.
    pub stats_interval: Duration,
    pub with_ui: UiMode,
    /// Stack size of instance threads, in bytes.
    pub instance_stack_size: usize,
    pub docker_socket: PathBuf,
    pub stop_timeout: Duration,
    pub qemu_accel: QemuAccel,
    pub qemu: PathBuf,
    pub qemu_img: PathBuf,
    pub ovmf: Option<PathBuf>,
    /// `--child-user`, looked up; `None`: not given (or "").
    pub child_user: Option<ChildUser>,
    pub usage_interval: Duration,
    pub log: LogConfig,
    /// Go flags accepted but not acted on (`-vmodule=…`, `-log_backtrace_at=…`),
    /// as given, for a warning once logging is up.
    pub ignored: Vec<String>,
}

/// `--cacert` when not given: the Go launcher's default.
pub const DEFAULT_CACERT: &str = "/etc/pki/ciao/CAcert-server-localhost.pem";
/// `--cert` when not given: the Go launcher's default.
pub const DEFAULT_CERT: &str = "/etc/pki/ciao/cert-client-localhost.pem";

/// The smallest `--instance-stack-kib` accepted: below it, instance threads
/// would overflow their stacks at once.
pub const MIN_INSTANCE_STACK_KIB: usize = 16;

/// Why the command line was not turned into a [`Config`].
#[derive(Debug)]
pub enum CliError {
    /// clap's own outcome: a usage error, or `--help`/`--version` (see
    /// [`CliError::is_help_or_version`]).
    Clap(clap::Error),
    /// A required flag (the one named) is missing. (`--cacert` and `--cert`
    /// have defaults, the Go launcher's paths.)
    Missing(&'static str),
    /// A flag's value is out of range or malformed.
    Invalid {
        flag: &'static str,
        value: String,
        reason: String,
    },
}

impl CliError {
    /// `--help` or `--version`: print it ([`CliError::print`]) and exit 0.
    pub fn is_help_or_version(&self) -> bool {
        matches!(self, CliError::Clap(e) if !e.use_stderr())
    }

    /// 0 after `--help`/`--version`, 2 (command-line error) otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.is_help_or_version() { 0 } else { 2 }
    }

    /// Prints help or version to stdout, errors (with the usage line) to stderr.
    pub fn print(&self) -> std::io::Result<()> {
        match self {
            CliError::Clap(e) => e.print(),
            other => {
                let kind = match other {
                    CliError::Missing(_) => ErrorKind::MissingRequiredArgument,
                    _ => ErrorKind::ValueValidation,
                };
                LauncherCli::command()
                    .error(kind, other.to_string())
                    .print()
            }
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Clap(e) => write!(f, "{}", e.render()),
            CliError::Missing(flag) => write!(f, "{flag} is required (unless --hard-reset)"),
            CliError::Invalid {
                flag,
                value,
                reason,
            } => write!(f, "invalid value '{value}' for '{flag}': {reason}"),
        }
    }
}

impl std::error::Error for CliError {}

impl From<clap::Error> for CliError {
    fn from(e: clap::Error) -> CliError {
        CliError::Clap(e)
    }
}

fn invalid(flag: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> CliError {
    CliError::Invalid {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn parse_cidrs(flag: &'static str, values: Vec<String>) -> Result<Vec<Cidr>, CliError> {
    values
        .into_iter()
        .map(|v| v.parse::<Cidr>().map_err(|r| invalid(flag, &v, r)))
        .collect()
}

/// Catches what would only fail later when dialling: an empty host or a
/// port that is not a number. Bare IPv6 addresses (`::1`) are allowed, as
/// the dialler adds the port to them.
fn check_server(s: &str) -> Result<(), String> {
    if s.chars().any(char::is_whitespace) {
        return Err("contains white space".into());
    }
    if s.parse::<std::net::SocketAddr>().is_ok()
        || s.trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .is_ok()
    {
        return Ok(());
    }
    match s.rsplit_once(':') {
        None => Ok(()),
        Some(("", _)) => Err("no host before the port".into()),
        Some((_, port)) if port.parse::<u16>().is_err() => {
            Err(format!("port {port:?} is not a number from 0 to 65535"))
        }
        Some((host, _)) if host.contains(':') => {
            Err("write an IPv6 address with a port as [ADDRESS]:PORT".into())
        }
        Some(_) => Ok(()),
    }
}

impl LauncherCli {
    /// Validates the command line and resolves its defaults.
    pub fn into_config(self) -> Result<Config, CliError> {
        let mode = if self.hard_reset {
            Mode::HardReset
        } else {
            Mode::Run {
                cacert: self.cacert.unwrap_or_else(|| DEFAULT_CACERT.into()),
                cert: self.cert.unwrap_or_else(|| DEFAULT_CERT.into()),
            }
        };
        // Go's default was "": an empty -server means "not given".
        let server = self
            .server
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        if let Some(s) = &server {
            check_server(s).map_err(|r| invalid("--server", s, r))?;
        }
        if self.max_vm == Some(0) {
            return Err(invalid(
                "--max-vm",
                0,
                "the node must accept at least 1 instance",
            ));
        }
        let stats_interval = match self.stats_interval {
            None => self.protocol.stats_interval(),
            Some(s) if !(0.01..=86_400.0).contains(&s) => {
                return Err(invalid(
                    "--stats-interval",
                    s,
                    "must be between 0.01 and 86400 seconds",
                ));
            }
            Some(s) => Duration::from_secs_f64(s),
        };
        if !(0.01..=86_400.0).contains(&self.usage_interval) {
            return Err(invalid(
                "--usage-interval",
                self.usage_interval,
                "must be between 0.01 and 86400 seconds",
            ));
        }
        let usage_interval = Duration::from_secs_f64(self.usage_interval);
        // A user-mode NIC bypasses the tenant network: never both.
        if self.user_net && self.network != NetworkMode::None {
            return Err(invalid(
                "--user-net",
                "true",
                format!(
                    "is for single-node use without tenant networking, not with --network {}",
                    format!("{:?}", self.network).to_lowercase()
                ),
            ));
        }
        // Go's default was "": an empty value means "not given".
        let child_user = match self.child_user.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(name) => {
                Some(ChildUser::lookup(name).map_err(|r| invalid("--child-user", name, r))?)
            }
        };
        let instance_stack_size = Some(self.instance_stack_kib)
            .filter(|k| *k >= MIN_INSTANCE_STACK_KIB)
            .and_then(|k| k.checked_mul(1024))
            .ok_or_else(|| {
                invalid(
                    "--instance-stack-kib",
                    self.instance_stack_kib,
                    format!(
                        "must be from {MIN_INSTANCE_STACK_KIB} to {}",
                        usize::MAX / 1024
                    ),
                )
            })?;
        let verbosity = match self.verbosity {
            0 => LevelFilter::Info,
            1 | 2 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        };
        let log = LogConfig {
            verbosity,
            logtostderr: self.logtostderr,
            alsologtostderr: self.alsologtostderr,
            dir: self.log_dir.unwrap_or_else(|| self.data_dir.join("logs")),
            stderr_threshold: self.stderrthreshold.level_filter(),
        };
        let ignored = [
            self.vmodule.map(|v| format!("-vmodule={v}")),
            self.log_backtrace_at
                .map(|v| format!("-log_backtrace_at={v}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        Ok(Config {
            ignored,
            mode,
            server,
            protocol: self.protocol,
            verify_hostname: self
                .verify_hostname
                .unwrap_or(self.protocol == Profile::P2018),
            simulation: self.simulation,
            network: self.network,
            user_net: self.user_net,
            max_vm: self.max_vm,
            compute_net: parse_cidrs("--compute-net", self.compute_net)?,
            mgmt_net: parse_cidrs("--mgmt-net", self.mgmt_net)?,
            tunnel_kind: match self.tunnel_kind {
                TunnelKindArg::Gretap => TunnelKind::GreTap,
                TunnelKindArg::Veth => TunnelKind::VethStandIn,
            },
            disk_limit: self.disk_limit,
            disk_limit_mb: self.disk_limit_mb,
            mem_limit: self.mem_limit,
            mem_limit_mb: self.mem_limit_mb,
            stats_interval,
            with_ui: self.with_ui,
            instance_stack_size,
            docker_socket: self.docker_socket,
            usage_interval,
            stop_timeout: Duration::from_secs(self.stop_timeout),
            qemu_accel: self.qemu_accel,
            qemu: self.qemu,
            qemu_img: self.qemu_img,
            ovmf: self.ovmf,
            child_user,
            log,
            data_dir: self.data_dir,
        })
    }
}

/// A `-word` left over by [`normalize_args`] that is no known long name and
/// does not start with a known short flag (`-v3` does), before any `--`.
fn unknown_single_dash_word(cmd: &clap::Command, args: &[OsString]) -> Option<String> {
    args.iter()
        .skip(1)
        .map_while(|a| a.to_str().filter(|s| *s != "--"))
        .find(|s| {
            let Some(rest) = s.strip_prefix('-').filter(|r| !r.starts_with('-')) else {
                return false;
            };
            let mut chars = rest.chars();
            chars.next().is_some_and(|c| {
                chars.next().is_some() && !cmd.get_arguments().any(|a| a.get_short() == Some(c))
            })
        })
        .map(str::to_string)
}

/// `argv` (program name first) → [`Config`]: Go-style flags are normalized,
/// clap parses, [`LauncherCli::into_config`] validates. On error, call
/// [`CliError::print`] and exit with [`CliError::exit_code`] (0 after
/// `--help`/`--version`).
pub fn parse_launcher_args(args: impl IntoIterator<Item = OsString>) -> Result<Config, CliError> {
    let mut cmd = LauncherCli::command();
    // Building adds --help and --version, so that -help and -version work too.
    cmd.build();
    let args = normalize_args(&cmd, args);
    if let Some(word) = unknown_single_dash_word(&cmd, &args) {
        // clap would name only its first letter (`unexpected argument '-b'`).
        let msg = format!("unexpected argument '{word}' found");
        return Err(cmd.error(ErrorKind::UnknownArgument, msg).into());
    }
    let matches = cmd.try_get_matches_from_mut(args)?;
    LauncherCli::from_arg_matches(&matches)?.into_config()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn cmd() -> Command {
        Command::new("t")
            .arg(Arg::new("cacert").long("cacert"))
            .arg(Arg::new("log-dir").long("log-dir").alias("log_dir"))
            .arg(Arg::new("v").short('v').long("v"))
            .arg(
                Arg::new("hard-reset")
                    .long("hard-reset")
                    .action(ArgAction::SetTrue),
            )
    }

    fn norm(args: &[&str]) -> Vec<String> {
        normalize_args(&cmd(), args.iter().map(OsString::from))
            .into_iter()
            .map(|a| a.into_string().expect("utf8"))
            .collect()
    }

    #[test]
    fn go_style_flags_become_gnu_style() {
        assert_eq!(
            norm(&[
                "prog",
                "-cacert=/a.pem",
                "-log_dir",
                "/l",
                "-hard-reset",
                "-v",
                "2",
                "--cacert",
                "x"
            ]),
            [
                "prog",
                "--cacert=/a.pem",
                "--log_dir",
                "/l",
                "--hard-reset",
                "-v",
                "2",
                "--cacert",
                "x"
            ]
        );
    }

    #[test]
    fn unknown_words_and_after_double_dash_are_kept() {
        assert_eq!(
            norm(&["prog", "-bogus", "--", "-cacert"]),
            ["prog", "-bogus", "--", "-cacert"]
        );
    }

    // ---- LauncherCli ----

    fn os(args: &[&str]) -> Vec<OsString> {
        std::iter::once("ciao-launcher")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn parse(args: &[&str]) -> Config {
        match parse_launcher_args(os(args)) {
            Ok(c) => c,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn parse_err(args: &[&str]) -> CliError {
        match parse_launcher_args(os(args)) {
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
            Err(e) => e,
        }
    }

    const CERTS: [&str; 4] = ["-cacert", "/ca.pem", "-cert", "/c.pem"];

    fn with_certs(args: &[&str]) -> Config {
        let mut v = CERTS.to_vec();
        v.extend_from_slice(args);
        parse(&v)
    }

    #[test]
    fn commands_are_well_formed() {
        LauncherCli::command().debug_assert();
        crate::lc::LcCli::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = with_certs(&[]);
        assert_eq!(
            c.mode,
            Mode::Run {
                cacert: "/ca.pem".into(),
                cert: "/c.pem".into()
            }
        );
        assert_eq!(c.server, None);
        assert_eq!(c.protocol, Profile::P2016);
        assert!(!c.verify_hostname);
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/ciao"));
        assert!(!c.simulation);
        assert_eq!(c.network, NetworkMode::None);
        assert_eq!(c.max_vm, None);
        assert!(c.compute_net.is_empty() && c.mgmt_net.is_empty());
        assert!(c.disk_limit && c.mem_limit);
        assert_eq!((c.disk_limit_mb, c.mem_limit_mb), (80_000, 1_000));
        assert_eq!(c.stats_interval, Duration::from_secs(30));
        assert_eq!(c.with_ui, UiMode::None);
        assert_eq!(c.instance_stack_size, 128 * 1024);
        assert_eq!(
            c.log,
            LogConfig {
                verbosity: LevelFilter::Info,
                logtostderr: false,
                alsologtostderr: false,
                dir: "/var/lib/ciao/logs".into(),
                stderr_threshold: LevelFilter::Error,
            }
        );
    }

    #[test]
    fn profile_sets_stats_interval_unless_given() {
        assert_eq!(
            with_certs(&["--protocol", "2018"]).stats_interval,
            Duration::from_secs(6)
        );
        let c = with_certs(&["-protocol=2018", "-stats-interval", "10"]);
        assert_eq!(c.protocol, Profile::P2018);
        assert_eq!(c.stats_interval, Duration::from_secs(10));
        assert!(matches!(parse_err(&["-protocol=2017"]), CliError::Clap(_)));
    }

    #[test]
    fn log_dir_follows_data_dir() {
        let c = with_certs(&["-data-dir", "/tmp/x"]);
        assert_eq!(c.log.dir, PathBuf::from("/tmp/x/logs"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
    }

    /// The same settings spelt the Go way and the GNU way give the same Config.
    #[test]
    fn go_and_gnu_spellings_agree() {
        let go = [
            "-server=sched:8889",
            "-cacert=/ca.pem",
            "-cert",
            "/c.pem",
            "-protocol",
            "2018",
            "-verify-hostname",
            "-data-dir=/d",
            "-simulation",
            "-network=nn",
            "-max-vm=7",
            "-compute-net=10.0.0.0/8",
            "-compute-net",
            "192.168.1.7/24",
            "-mgmt-net=fd00::/64",
            "-disk-limit=false",
            "-disk-limit-mb=100",
            "-mem-limit=0",
            "-mem-limit-mb",
            "200",
            "-stats-interval=3",
            "-with-ui=spice",
            "-instance-stack-kib=256",
            "-v=2",
            "-logtostderr",
            "-alsologtostderr=true",
            "-log_dir=/l",
            "-stderrthreshold=WARNING",
        ];
        let gnu = [
            "--server",
            "sched:8889",
            "--cacert",
            "/ca.pem",
            "--cert=/c.pem",
            "--protocol=2018",
            "--verify-hostname",
            "--data-dir",
            "/d",
            "--simulation=true",
            "--network",
            "nn",
            "--max-vm",
            "7",
            "--compute-net",
            "10.0.0.0/8",
            "--compute-net=192.168.1.7/24",
            "--mgmt-net",
            "fd00::/64",
            "--disk-limit=false",
            "--disk-limit-mb",
            "100",
            "--mem-limit=false",
            "--mem-limit-mb=200",
            "--stats-interval",
            "3",
            "--with-ui",
            "spice",
            "--instance-stack-kib",
            "256",
            "--v",
            "2",
            "--logtostderr=true",
            "--alsologtostderr",
            "--log-dir",
            "/l",
            "--stderrthreshold",
            "1",
        ];
        let c = parse(&go);
        assert_eq!(c, parse(&gnu));
        assert_eq!(c.server.as_deref(), Some("sched:8889"));
        assert_eq!(c.protocol, Profile::P2018);
        assert!(c.verify_hostname && c.simulation);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.network, NetworkMode::Nn);
        assert_eq!(c.max_vm, Some(7));
        let nets: Vec<String> = c.compute_net.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.168.1.0/24"]);
        assert_eq!(c.mgmt_net[0].to_string(), "fd00::/64");
        assert!(!c.disk_limit && !c.mem_limit);
        assert_eq!((c.disk_limit_mb, c.mem_limit_mb), (100, 200));
        assert_eq!(c.stats_interval, Duration::from_secs(3));
        assert_eq!(c.with_ui, UiMode::Spice);
        assert_eq!(c.instance_stack_size, 256 * 1024);
        assert_eq!(c.log.verbosity, LevelFilter::Debug);
        assert!(c.log.logtostderr && c.log.alsologtostderr);
        assert_eq!(c.log.dir, PathBuf::from("/l"));
        assert_eq!(c.log.stderr_threshold, LevelFilter::Warn);
    }

    #[test]
    fn verify_hostname_defaults_per_profile_and_every_spelling() {
        let v = |a: &[&str]| with_certs(a).verify_hostname;
        assert!(!v(&[]));
        assert!(!v(&["--protocol", "2016"]));
        assert!(v(&["--protocol", "2018"]));
        for (arg, want) in [
            ("--verify-hostname", true),
            ("-verify-hostname", true),
            ("--verify-hostname=true", true),
            ("-verify-hostname=true", true),
            ("-verify-hostname=1", true),
            ("--verify-hostname=false", false),
            ("-verify-hostname=false", false),
            ("-verify-hostname=F", false),
        ] {
            assert_eq!(v(&["-protocol=2016", arg]), want, "2016 {arg}");
            assert_eq!(v(&["-protocol=2018", arg]), want, "2018 {arg}");
        }
        assert!(matches!(
            parse_err(&["-cacert=/a", "-cert=/b", "-verify-hostname=maybe"]),
            CliError::Clap(_)
        ));
    }

    #[test]
    fn network_accepts_modes_and_go_booleans() {
        let net = |a: &[&str]| with_certs(a).network;
        assert_eq!(net(&["-network=false"]), NetworkMode::None);
        assert_eq!(net(&["-network=0"]), NetworkMode::None);
        assert_eq!(net(&["-network=true"]), NetworkMode::Cn);
        assert_eq!(net(&["-network"]), NetworkMode::Cn);
        // A bare -network followed by another flag.
        assert_eq!(net(&["-network", "-simulation"]), NetworkMode::Cn);
        assert_eq!(net(&["-network", "nn"]), NetworkMode::Nn);
        assert_eq!(net(&["--network", "cn"]), NetworkMode::Cn);
        assert_eq!(net(&["--network=NONE"]), NetworkMode::None);
        assert!(matches!(parse_err(&["-network=dual"]), CliError::Clap(_)));
    }

    #[test]
    fn user_net_is_opt_in_and_only_without_tenant_networking() {
        let user_net = |a: &[&str]| with_certs(a).user_net;
        assert!(!user_net(&[]));
        assert!(user_net(&["-user-net"]));
        assert!(user_net(&["--user-net=true"]));
        assert!(!user_net(&["-user-net=false"]));
        assert!(user_net(&["-user-net", "-network=none"]));
        for mode in ["-network=cn", "-network=nn", "-network"] {
            let mut v = CERTS.to_vec();
            v.extend_from_slice(&["-user-net", mode]);
            match parse_err(&v) {
                CliError::Invalid { flag, reason, .. } => {
                    assert_eq!(flag, "--user-net");
                    assert!(reason.contains("--network"), "{reason}");
                }
                e => panic!("{mode}: {e}"),
            }
        }
        // Without --user-net, every mode is fine.
        assert!(!user_net(&["-user-net=false", "-network=cn"]));
    }

    #[test]
    fn go_booleans() {
        for (arg, want) in [
            ("-simulation", true),
            ("--simulation", true),
            ("-simulation=true", true),
            ("-simulation=T", true),
            ("-simulation=1", true),
            ("-simulation=false", false),
            ("--simulation=False", false),
            ("-simulation=f", false),
        ] {
            assert_eq!(with_certs(&[arg]).simulation, want, "{arg}");
        }
        // Go stops at `false` here; we refuse it rather than guess.
        assert!(matches!(
            parse_err(&["-cacert=/a", "-cert=/b", "-simulation", "false"]),
            CliError::Clap(_)
        ));
        assert!(matches!(
            parse_err(&["-cacert=/a", "-cert=/b", "-simulation=yes"]),
            CliError::Clap(_)
        ));
    }

    #[test]
    fn verbosity_levels() {
        let v = |a: &[&str]| with_certs(a).log.verbosity;
        assert_eq!(v(&["-v=0"]), LevelFilter::Info);
        assert_eq!(v(&["-v", "1"]), LevelFilter::Debug);
        assert_eq!(v(&["-v=2"]), LevelFilter::Debug);
        assert_eq!(v(&["-v3"]), LevelFilter::Trace);
        assert_eq!(v(&["--v=9"]), LevelFilter::Trace);
    }

    #[test]
    fn stderr_thresholds() {
        let t = |s: &str| with_certs(&["-stderrthreshold", s]).log.stderr_threshold;
        assert_eq!(t("INFO"), LevelFilter::Info);
        assert_eq!(t("info"), LevelFilter::Info);
        assert_eq!(t("0"), LevelFilter::Info);
        assert_eq!(t("Warning"), LevelFilter::Warn);
        assert_eq!(t("2"), LevelFilter::Error);
        assert_eq!(t("FATAL"), LevelFilter::Error);
        assert_eq!(t("3"), LevelFilter::Error);
        assert!(matches!(
            parse_err(&["-cacert=/a", "-cert=/b", "-stderrthreshold=4"]),
            CliError::Clap(_)
        ));
    }

    #[test]
    fn hard_reset_needs_no_certificates() {
        assert_eq!(parse(&["-hard-reset"]).mode, Mode::HardReset);
        assert_eq!(
            parse(&["--hard-reset=true", "-cacert=/a"]).mode,
            Mode::HardReset
        );
        assert!(matches!(
            parse(&["-hard-reset=false"]).mode,
            Mode::Run { .. }
        ));
    }

    /// `ciao-launcher -server X` on a node set up the Go way.
    #[test]
    fn certificates_default_to_the_go_launchers_paths() {
        let run = |cacert: &str, cert: &str| Mode::Run {
            cacert: cacert.into(),
            cert: cert.into(),
        };
        assert_eq!(
            parse(&["-server", "sched"]).mode,
            run(
                "/etc/pki/ciao/CAcert-server-localhost.pem",
                "/etc/pki/ciao/cert-client-localhost.pem"
            )
        );
        assert_eq!(
            parse(&["-cacert=/a"]).mode,
            run("/a", "/etc/pki/ciao/cert-client-localhost.pem")
        );
        assert_eq!(
            parse(&["-cert", "/c"]).mode,
            run("/etc/pki/ciao/CAcert-server-localhost.pem", "/c")
        );
    }

    #[test]
    fn glogs_vmodule_and_log_backtrace_at_are_accepted_and_ignored() {
        let c = with_certs(&[
            "-vmodule=overseer=2,qemu*=3",
            "-log_backtrace_at=main.go:42",
        ]);
        assert_eq!(
            c.ignored,
            [
                "-vmodule=overseer=2,qemu*=3",
                "-log_backtrace_at=main.go:42"
            ]
        );
        // Other spellings, and nothing else changes.
        let d = with_certs(&[
            "--vmodule",
            "overseer=2,qemu*=3",
            "--log-backtrace-at=main.go:42",
        ]);
        assert_eq!(c, d);
        assert_eq!(with_certs(&["-vmodule", "x=1"]).ignored, ["-vmodule=x=1"]);
        assert_eq!(c.log.verbosity, with_certs(&[]).log.verbosity);
        assert!(with_certs(&[]).ignored.is_empty());
    }

    #[test]
    fn with_ui_bare_is_nc_as_in_go() {
        let ui = |a: &[&str]| with_certs(a).with_ui;
        assert_eq!(ui(&[]), UiMode::None);
        assert_eq!(ui(&["-with-ui"]), UiMode::Nc);
        assert_eq!(ui(&["-with-ui", "-simulation"]), UiMode::Nc);
        assert_eq!(ui(&["-with-ui", "spice"]), UiMode::Spice);
        assert_eq!(ui(&["-with-ui=none"]), UiMode::None);
        assert_eq!(ui(&["--with-ui=nc"]), UiMode::Nc);
        assert!(matches!(parse_err(&["-with-ui=vnc"]), CliError::Clap(_)));
    }

    #[test]
    fn version_names_the_commit_and_crypto_provider() {
        let CliError::Clap(e) = parse_err(&["-version"]) else {
            panic!("not a clap error")
        };
        let v = e.render().to_string();
        assert!(
            v.starts_with(&format!(
                "ciao-launcher {} (commit ",
                env!("CARGO_PKG_VERSION")
            )),
            "{v}"
        );
        assert!(v.contains(crate::build_info::CRYPTO_PROVIDER), "{v}");
    }

    fn invalid_flag(args: &[&str]) -> (&'static str, String) {
        let mut v = CERTS.to_vec();
        v.extend_from_slice(args);
        match parse_err(&v) {
            CliError::Invalid { flag, value, .. } => (flag, value),
            e => panic!("{args:?}: {e}"),
        }
    }

    #[test]
    fn values_out_of_range_are_refused() {
        assert_eq!(invalid_flag(&["-max-vm=0"]), ("--max-vm", "0".into()));
        assert_eq!(
            invalid_flag(&["-stats-interval=0"]),
            ("--stats-interval", "0".into())
        );
        assert_eq!(
            invalid_flag(&["-instance-stack-kib=8"]),
            ("--instance-stack-kib", "8".into())
        );
        for bad in ["10.0.0.0", "10.0.0/8", "10.0.0.0/33", "fd00::/129", "x/8"] {
            assert_eq!(
                invalid_flag(&["-compute-net", "10.0.0.0/8", "-compute-net", bad]),
                ("--compute-net", bad.into())
            );
        }
        assert_eq!(
            invalid_flag(&["-mgmt-net=192.168.0.0/-1"]),
            ("--mgmt-net", "192.168.0.0/-1".into())
        );
        let mut v = CERTS.to_vec();
        v.push("-compute-net=10.0.0.0/99");
        let msg = parse_err(&v).to_string();
        assert!(
            msg.contains("'10.0.0.0/99'") && msg.contains("--compute-net"),
            "{msg}"
        );
        for bad in ["host:port", ":8888", "a b", "::1:99999", "host:70000"] {
            assert_eq!(invalid_flag(&["-server", bad]), ("--server", bad.into()));
        }
        // Clap refuses what does not even parse as a number.
        assert!(matches!(
            parse_err(&["-cacert=/a", "-cert=/b", "-max-vm=-1"]),
            CliError::Clap(_)
        ));
    }

    #[test]
    fn child_user_is_looked_up() {
        assert_eq!(with_certs(&[]).child_user, None);
        assert_eq!(with_certs(&["-child-user="]).child_user, None);
        let root = with_certs(&["-child-user=root"]).child_user.expect("root");
        assert_eq!((root.name.as_str(), root.uid, root.gid), ("root", 0, 0));
        assert_eq!(with_certs(&["--child-user", "0"]).child_user, Some(root));
        let bad = "no-such-user-ciao-x";
        assert_eq!(
            invalid_flag(&["-child-user", bad]),
            ("--child-user", bad.into())
        );
        let mut v = CERTS.to_vec();
        v.extend(["--child-user", bad]);
        let e = parse_err(&v);
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("no user"), "{e}");
    }

    #[test]
    fn server_forms() {
        for ok in [
            "sched",
            "sched:8888",
            "10.0.0.1",
            "10.0.0.1:1",
            "[::1]:8888",
            "::1",
            "[::1]",
        ] {
            assert_eq!(with_certs(&["-server", ok]).server.as_deref(), Some(ok));
        }
        // Go's default was "": an empty value means "not given".
        assert_eq!(with_certs(&["-server="]).server, None);
    }

    #[test]
    fn unknown_flags_are_usage_errors() {
        let e = parse_err(&["-cacert=/a", "-cert=/b", "-bogus"]);
        assert!(matches!(e, CliError::Clap(_)));
        assert!(e.to_string().contains("'-bogus'"), "{e}");
        assert!(!e.is_help_or_version());
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn help_and_version_exit_zero() {
        for arg in ["--help", "-help", "-h", "--version", "-version", "-V"] {
            let e = parse_err(&[arg]);
            assert!(e.is_help_or_version(), "{arg}");
            assert_eq!(e.exit_code(), 0, "{arg}");
        }
        let CliError::Clap(e) = parse_err(&["--help"]) else {
            panic!("not a clap error")
        };
        let help = e.render().to_string();
        assert!(help.contains("Logging options"), "{help}");
    }

    #[test]
    fn cidr_masks_and_contains() {
        let c: Cidr = "192.168.1.77/24".parse().expect("cidr");
        assert_eq!(c.to_string(), "192.168.1.0/24");
        assert_eq!(c.prefix(), 24);
        assert!(c.contains("192.168.1.200".parse().expect("ip")));
        assert!(!c.contains("192.168.2.1".parse().expect("ip")));
        assert!(!c.contains("::1".parse().expect("ip")));
        let all: Cidr = "0.0.0.0/0".parse().expect("cidr");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let host: Cidr = "fd00::1/128".parse().expect("cidr");
        assert_eq!(host.to_string(), "fd00::1/128");
    }

    #[test]
    fn go_bool_forms() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_go_bool(t), Ok(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_go_bool(f), Ok(false));
        }
        assert!(parse_go_bool("yes").is_err());
    }
}
