//! What a guest sees of its definition, so that a migration may change how
//! a host provides it (image paths, bridges, cache modes, the serial log's
//! file) but never what runs inside: `migrate --xml` is checked with
//! [`DomainDefinition::guest_abi_changes`].

use super::DomainDefinition;

impl DomainDefinition {
    /// The MAC address of every NIC as the guest sees it: a NIC without
    /// one gets it from the domain's name, so renaming the domain would
    /// change it. Pinned before a rename.
    pub fn pin_macs(&mut self) {
        let name = self.name.to_string();
        for (index, nic) in self.nics.iter_mut().enumerate() {
            if nic.mac.is_none() {
                nic.mac = Some(nic.mac_address(&name, index));
            }
        }
    }

    /// How `other` would change what the guest sees, one entry per change
    /// (`memory_mib 64 -> 128`); empty if nothing the guest sees differs.
    /// Host-side settings (image paths and formats, cache modes, shared
    /// storage, bridges, the serial log, the kernel's files, labels) may
    /// differ.
    pub fn guest_abi_changes(&self, other: &DomainDefinition) -> Vec<String> {
        let mut changes = Vec::new();
        let mut differ = |what: &str, a: String, b: String| {
            if a != b {
                changes.push(format!("{what} {a} -> {b}"));
            }
        };
        differ(
            "memory_mib",
            self.memory_mib.to_string(),
            other.memory_mib.to_string(),
        );
        differ("vcpus", self.vcpus.to_string(), other.vcpus.to_string());
        differ("accel", self.accel.to_string(), other.accel.to_string());
        differ("machine", self.machine.clone(), other.machine.clone());
        differ(
            "cpu",
            self.cpu.clone().unwrap_or_else(|| "(default)".into()),
            other.cpu.clone().unwrap_or_else(|| "(default)".into()),
        );
        let cmdline = |d: &DomainDefinition| {
            d.kernel
                .as_ref()
                .map_or("(no kernel)".to_string(), |k| format!("{:?}", k.cmdline))
        };
        differ("kernel cmdline", cmdline(self), cmdline(other));
        let disks = |d: &DomainDefinition| {
            let targets: Vec<String> = d
                .disks
                .iter()
                .enumerate()
                .map(|(i, disk)| disk.target_name(i))
                .collect();
            format!("[{}]", targets.join(", "))
        };
        differ("disks", disks(self), disks(other));
        let macs = |d: &DomainDefinition| {
            let macs: Vec<String> = d
                .nics
                .iter()
                .enumerate()
                .map(|(i, nic)| nic.mac_address(d.name.as_str(), i))
                .collect();
            format!("[{}]", macs.join(", "))
        };
        differ("nics", macs(self), macs(other));
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(extra: &str) -> DomainDefinition {
        DomainDefinition::from_toml(&format!(
            "name = \"vm\"\nmemory_mib = 64\n[kernel]\npath = \"/k/vmlinuz\"\ncmdline = \"quiet\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn host_side_settings_may_change_and_what_the_guest_sees_may_not() {
        let here = def(
            "[[disks]]\npath = \"/a/vm.raw\"\n[[nics]]\nnetwork = \"bridge\"\nbridge = \"br0\"\n",
        );
        let there = def(
            "[serial]\nlog = \"/logs/vm.log\"\n[[disks]]\npath = \"/b/vm.qcow2\"\nformat = \"qcow2\"\n\
             [[nics]]\nnetwork = \"bridge\"\nbridge = \"br1\"\n",
        );
        assert_eq!(here.guest_abi_changes(&there), Vec::<String>::new());

        let mut bigger = there.clone();
        bigger.memory_mib = 128;
        bigger.disks.pop();
        assert_eq!(
            here.guest_abi_changes(&bigger),
            ["memory_mib 64 -> 128", "disks [vda] -> []"]
        );
    }

    #[test]
    fn a_rename_keeps_the_nics_macs_once_pinned() {
        let mut here = def("[[nics]]\nnetwork = \"user\"\n");
        let mut renamed = here.clone();
        renamed.name = "other".parse().unwrap();
        assert_eq!(here.guest_abi_changes(&renamed).len(), 1, "the MAC moved");
        here.pin_macs();
        let mut renamed = here.clone();
        renamed.name = "other".parse().unwrap();
        assert!(here.guest_abi_changes(&renamed).is_empty());
    }
}
