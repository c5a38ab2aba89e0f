//! The normalised configuration of one instance: what a START payload (either
//! shape) becomes after validation, and what the launcher persists in the
//! instance's `state` file. RESTART boots an instance again from it.

use serde::{Deserialize, Serialize};

/// Which virtualizer runs the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VmType {
    #[default]
    Qemu,
    Docker,
}

impl VmType {
    /// For log lines.
    pub fn name(self) -> &'static str {
        match self {
            VmType::Qemu => "VM",
            VmType::Docker => "container",
        }
    }
}

/// Guest firmware (`fw_type`: "" and `efi` mean EFI, `legacy` means BIOS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Efi,
    Legacy,
}

/// Tenant networking of the instance (START `networking`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Networking {
    pub vnic_mac: String,
    pub vnic_uuid: String,
    pub concentrator_uuid: String,
    pub concentrator_ip: String,
    pub subnet: String,
    pub private_ip: String,
}

/// A volume attached to the instance (2018 `storage`, or AttachVolume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Volume {
    pub uuid: String,
    pub bootable: bool,
}

impl InstanceConfig {
    /// The SSH address STATS reports (`ssh_ip`, `ssh_port`): the forward to
    /// the guest when it has one, else the concentrator's address and the
    /// port derived from the private IP.
    pub fn ssh_address(&self) -> (String, u16) {
        match self.ssh_forward {
            Some(a) => (a.ip().to_string(), a.port()),
            None => (self.networking.concentrator_ip.clone(), self.ssh_port),
        }
    }
}

/// Everything the launcher keeps about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct InstanceConfig {
    /// Canonical lower-case hyphenated UUID (validated: safe as a path component).
    pub instance_uuid: String,
    pub tenant_uuid: String,
    /// Backing image of a VM (2016 `image_uuid`; empty when booting from a volume).
    pub image_uuid: String,
    /// Image of a container (`docker_image`).
    pub docker_image: String,
    pub vm_type: VmType,
    pub firmware: Firmware,
    pub vcpus: u32,
    pub mem_mb: u64,
    pub disk_mb: u64,
    pub network_node: bool,
    pub privileged: bool,
    pub networking: Networking,
    /// 33000 + the last two octets of `private_ip` (0 for network nodes).
    pub ssh_port: u16,
    /// The loopback address forwarded to the guest's port 22 (a VM with a
    /// user-mode NIC, `--user-net`): what STATS reports as its SSH address
    /// instead of the concentrator's, also after a launcher restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_forward: Option<std::net::SocketAddr>,
    pub volumes: Vec<Volume>,
    /// 2018: START of an instance that ran elsewhere (echoed in StartFailure).
    pub restart: bool,
    /// The cloud-init user data and JSON meta data documents of the START payload.
    pub user_data: String,
    pub meta_data: String,
}
