//! Skipping a test honestly.
//!
//! A test that needs something this machine lacks (libfabric, root for network namespaces,
//! NVRTC, a GPU) calls [`skip`] and returns: it prints `skipped: <why>`, so a run never
//! passes silently. Where the environment promises that need — `OXCCL_TEST_REQUIRE` names it,
//! as `scripts/test` does for everything it installs — [`skip`] fails the test instead, so a
//! missing install step cannot hide behind a green run. The test harness shows a passing
//! test's output only with `--nocapture`, so each skip is also appended, with the test's
//! name, to the file `OXCCL_TEST_SKIP_LOG` names (`scripts/test` lists them at the end).

use std::fmt::Display;

/// Something a test may need from the machine. The one-line summary of what
/// [`crate::testing`] does: see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// libfabric: the `libfabric` feature built, `fi_info` and the `tcp`/`shm` providers.
    Libfabric,
    /// Network namespaces: root and iproute2.
    Netns,
    /// NVRTC (`libnvrtc.so.12`) on the loader path.
    Nvrtc,
    /// A CUDA GPU and its driver.
    Gpu,
    /// At least two CPUs this process may run on (timing tests of two ranks).
    Cpus,
}

impl Need {
    /// The name `OXCCL_TEST_REQUIRE` uses.
    pub fn name(self) -> &'static str {
        match self {
            Need::Libfabric => "libfabric",
            Need::Netns => "netns",
            Need::Nvrtc => "nvrtc",
            Need::Gpu => "gpu",
            Need::Cpus => "cpus",
        }
    }
}

/// Whether `list` (comma- or space-separated, as in `OXCCL_TEST_REQUIRE`) names `need`.
pub fn required_by(list: &str, need: Need) -> bool {
    list.split([',', ' ']).any(|w| w.trim() == need.name())
}

/// Says why the calling test does not run, or fails it when `OXCCL_TEST_REQUIRE` names `need`.
/// The caller returns after it.
#[track_caller]
pub fn skip(need: Need, why: impl Display) {
    let why = why.to_string();
    skip_unless_required(&std::env::var("OXCCL_TEST_REQUIRE").unwrap_or_default(), need, &why);
    if let Some(path) = std::env::var_os("OXCCL_TEST_SKIP_LOG") {
        use std::io::Write;
        let test = std::thread::current().name().unwrap_or("?").to_string();
        let line = format!("{test}: {why}\n");
        // One write per line (O_APPEND): lines of parallel tests do not interleave.
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).create(true).open(path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

#[track_caller]
fn skip_unless_required(list: &str, need: Need, why: impl Display) {
    if required_by(list, need) {
        panic!(
            "this test cannot run: {why}; but OXCCL_TEST_REQUIRE={list} says this machine has {} \
             (scripts/test sets it for what it installs; OXCCL_TEST_ALLOW_SKIP lets it skip)",
            need.name()
        );
    }
    println!("skipped: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_require_list_names_needs_exactly() {
        assert!(required_by("libfabric,nvrtc,netns", Need::Netns));
        assert!(required_by("libfabric nvrtc", Need::Nvrtc));
        assert!(!required_by("libfabric,nvrtc", Need::Gpu));
        assert!(!required_by("", Need::Libfabric));
        assert!(!required_by("libfabrics", Need::Libfabric));
    }

    #[test]
    fn a_required_need_fails_and_says_why() {
        skip_unless_required("libfabric", Need::Gpu, "no GPU here");
        let e = std::panic::catch_unwind(|| skip_unless_required("libfabric,gpu", Need::Gpu, "no GPU here"))
            .expect_err("a required need must fail the test");
        let msg = e.downcast_ref::<String>().expect("a formatted message");
        assert!(msg.contains("no GPU here") && msg.contains("OXCCL_TEST_REQUIRE=libfabric,gpu"), "{msg}");
    }
}
