//! A communicator's configuration: the core's settings and those of every transport built
//! in, each declared once beside its code (docs/settings.md).

use std::ops::Deref;

use oxccl_core::config::Config as Core;
use oxccl_core::Result;

use crate::registry;

/// Every `OXCCL_*` setting: the core's (read through the fields this derefs to: `timeout`,
/// `class`, `budget`, ...) and each transport's (read by the transport). Changed only
/// through [`Config::set`], which checks the new value. Values come from the
/// defaults, then the TOML file `OXCCL_CONFIG_FILE` names, then the environment, then
/// [`Config::set`]; every value is checked when it is read, with an error naming the setting.
#[derive(Debug, Clone)]
pub struct Config(Core);

impl Config {
    /// Defaults < `OXCCL_CONFIG_FILE` < environment.
    pub fn from_env() -> Result<Config> {
        Config::from_sources(|k| std::env::var(k).ok())
    }

    /// Defaults only.
    pub fn defaults() -> Config {
        Config::from_sources(|_| None).expect("the defaults are valid")
    }

    /// Defaults < `OXCCL_CONFIG_FILE` < `env`.
    pub fn from_sources(env: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let c = Core::with_knobs(&registry::knob_tables(), env)?;
        registry::check(&c)?;
        Ok(Config(c))
    }

    /// Sets a setting from code (highest precedence), checking every value again.
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        let mut c = self.0.clone();
        c.set(name, value)?;
        registry::check(&c)?;
        self.0 = c;
        Ok(())
    }

    /// Uses `auth` (a job secret given in code, e.g. one an NCCL unique id carries) instead
    /// of what `OXCCL_JOB_SECRET` and its kin say.
    pub fn set_auth(&mut self, auth: oxccl_core::auth::Auth) {
        self.0.auth = auth;
    }

    /// The core's view (what transports and the engine read).
    pub fn core(&self) -> &Core {
        &self.0
    }

    pub(crate) fn from_core(c: Core) -> Config {
        Config(c)
    }

    pub(crate) fn into_core(self) -> Core {
        self.0
    }
}

impl Deref for Config {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_settings_are_known_checked_and_listed() {
        let c = Config::from_sources(|k| (k == "OXCCL_TCP_STREAMS").then(|| "8".into())).unwrap();
        assert!(c.describe().iter().any(|(k, v, _)| k.name == "OXCCL_TCP_STREAMS" && v == "8"));
        assert!(c.describe().iter().any(|(k, _, _)| k.name == "OXCCL_LIBFABRIC_PROVIDER"));
        let e = Config::from_sources(|k| (k == "OXCCL_TCP_STREAMS").then(|| "100".into())).unwrap_err();
        assert!(e.to_string().contains("OXCCL_TCP_STREAMS") && e.to_string().contains("1 to 64"), "{e}");
        let e = Config::from_sources(|k| (k == "OXCCL_STAGING_BYTES").then(|| "10001".into())).unwrap_err();
        assert!(e.to_string().contains("OXCCL_STAGING_BYTES"), "{e}");
        for (k, v) in
            [("OXCCL_CHUNK_BYTES", "10001"), ("OXCCL_TCP_CHUNK_BYTES", "1K"), ("OXCCL_TCP_CHUNK_BYTES", "lots")]
        {
            let e = Config::from_sources(|name| (name == k).then(|| v.into())).unwrap_err();
            assert!(e.to_string().contains(k) && e.to_string().contains("multiple of 64"), "{k}={v}: {e}");
        }
        let c = Config::from_sources(|k| (k == "OXCCL_TCP_CHUNK_BYTES").then(|| "64K".into())).unwrap();
        assert!(c.describe().iter().any(|(k, v, _)| k.name == "OXCCL_TCP_CHUNK_BYTES" && v == "64K"));
        let e = Config::from_sources(|k| (k == "OXCCL_SOCKET_IFNAME").then(|| "no-such-if0".into())).unwrap_err();
        assert!(e.to_string().contains("OXCCL_SOCKET_IFNAME=no-such-if0"), "{e}");
        let mut c = Config::defaults();
        assert!(c.set("OXCCL_NOPE", "1").is_err());
        assert!(c.set("OXCCL_NET", "carrier-pigeon").is_err());
        assert_eq!(c.net, None, "a refused value changes nothing (the default: every one built in)");
        c.set("OXCCL_LIBFABRIC_REGISTER", "always").unwrap();
        assert!(c.is_set("OXCCL_LIBFABRIC_REGISTER"));
    }
}
