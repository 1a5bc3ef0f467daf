//! Host identity: which ranks share memory.

/// This host's identity: `OXCCL_HOST_ID` if set, else hostname plus kernel boot id (two
/// machines with the same hostname, or one machine rebooted, differ).
pub fn host_id(override_id: Option<&str>) -> String {
    if let Some(id) = override_id {
        return id.to_string();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".to_string());
    let boot =
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default();
    if boot.is_empty() {
        host
    } else {
        format!("{host}/{boot}")
    }
}

/// This process's process-id space: kernel boot id and PID namespace (`/proc/self/ns/pid`).
/// Two processes with the same one can watch each other by pid. Empty when unknown.
pub fn pid_space() -> String {
    let boot =
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    if boot.is_empty() || ns.is_empty() {
        String::new()
    } else {
        format!("{boot}/{ns}")
    }
}
